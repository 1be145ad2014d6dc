#!/usr/bin/env python3
"""Compile the CUDA kernels here, without a GPU, the way qpeft compiles them at run time: NVRTC (the libnvrtc of the
torch wheel's nvidia packages) on kernels.cu + flash.cu for compute_90, then Triton's ptxas for sm_90 with -v. Prints
registers, stack and spills of the kernels whose names contain FILTER (default: flash), and leaves the PTX and cubin in
OUT_DIR so that `cuobjdump -sass -fun NAME OUT_DIR/kernels.cubin` (Triton's) shows the instructions. Catches compile
errors, register growth and spills before a device call is spent on them.

    /work/refvenv/bin/python scripts/gpu/ptx_check.py [--f16] [--filter flash] [--out /tmp/ptx]

Triton's ptxas may be older than NVRTC: the PTX's .version is lowered to what it accepts (the kernels use no newer
PTX feature; ptxas fails loudly if one appears)."""
import argparse
import os
import re
import subprocess
import sys

import nvrtc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f16", action="store_true", help="compile the f16 mode (QPEFT_F16)")
    ap.add_argument("--filter", default="flash")
    ap.add_argument("--out", default="/tmp/ptx")
    args = ap.parse_args()
    ptx = nvrtc.compile_ptx(nvrtc.source(), "compute_90", args.f16)
    ptxas = nvrtc.find("triton/backends/nvidia/bin/ptxas")
    accepted = re.search(r"current version is '([\d.]+)'", subprocess.run([ptxas, "-arch=sm_90", "-"], input=".version 99.0\n", capture_output=True, text=True).stderr)
    text = ptx.decode()
    if accepted:
        text = re.sub(r"^\.version [\d.]+", f".version {accepted.group(1)}", text, count=1, flags=re.M)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.ptx")
    open(path, "w").write(text)
    r = subprocess.run([ptxas, "-arch=sm_90", "-v", path, "-o", os.path.join(args.out, "kernels.cubin")], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stdout + r.stderr)
    name = None
    for line in (r.stdout + r.stderr).splitlines():
        if "Compiling entry function" in line:
            name = line.split("'")[1]
        elif name and args.filter in name and ("registers" in line or "spill" in line):
            print(f"{name:<22} {line.split('info    :')[-1].strip()}")


if __name__ == "__main__":
    main()
