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
import ctypes
import glob
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA = os.path.join(HERE, "..", "..", "crates", "qpeft", "src", "backend", "cuda")


def first(pattern):
    for d in sys.path:
        hits = sorted(glob.glob(os.path.join(d, pattern), recursive=True))
        if hits:
            return hits[0]
    sys.exit(f"{pattern} not found on {sys.path} (run with the reference venv's python)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f16", action="store_true", help="compile the f16 mode (QPEFT_F16)")
    ap.add_argument("--filter", default="flash")
    ap.add_argument("--out", default="/tmp/ptx")
    args = ap.parse_args()
    src = "".join(open(os.path.join(CUDA, f)).read() for f in ("kernels.cu", "flash.cu"))
    nvrtc = ctypes.CDLL(first("nvidia/**/libnvrtc.so*"))
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernels.cu", 0, None, None) == 0
    opts = [b"-arch=compute_90"] + ([b"-DQPEFT_F16"] if args.f16 else [])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode())
    if rc != 0:
        sys.exit("NVRTC failed")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    ptxas = first("triton/backends/nvidia/bin/ptxas")
    accepted = re.search(r"current version is '([\d.]+)'", subprocess.run([ptxas, "-arch=sm_90", "-"], input=".version 99.0\n", capture_output=True, text=True).stderr)
    text = ptx.value.decode()
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
