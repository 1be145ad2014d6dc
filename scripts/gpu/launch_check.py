#!/usr/bin/env python3
"""Counts each `launch!` call's kernel arguments in backend/cuda/*.rs against the kernel's parameter list in kernels.cu
and flash.cu. A launch with fewer arguments than its kernel has makes the driver read past the argument array: a host
segfault, not an error (session 22). A kernel named by format! (in the launch, or in the nearest `let name = format!(..)`
before it) is checked against every kernel its literal prefix names (flash_forward_16 … _128); other run-time names
are listed as unchecked."""
import glob
import re
import sys

root = "crates/qpeft/src/backend/cuda/"
src = open(root + "kernels.cu").read() + open(root + "flash.cu").read()
# Macro-made kernels (flash.cu's FLASH_KERNELS: `__launch_bounds__(..) flash_forward_##D(..)`, continued lines) count
# under their name with `D` for the head size.
params = {m[1].replace("##", ""): len([p for p in m[2].replace("\\", "").split(",") if p.strip()])
          for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\w+\) )?([\w#]+)\(([^)]*)\)', src)}


def top_level_args(body):
    parts, depth, cur = [], 0, ""
    for c in body:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    return parts + ([cur] if cur.strip() else [])


bad = 0
for f in sorted(glob.glob(root + "*.rs")):
    text = open(f).read()
    i = text.find("launch!(")
    while i >= 0:
        j, depth = i + 8, 1
        while depth:
            depth += (text[j] == "(") - (text[j] == ")")
            j += 1
        args = top_level_args(text[i + 8:j - 1])
        name = re.match(r'\s*"(\w+)"', args[1])
        given = len(args) - 3  # self, name, launch config
        if name and name[1] in params:
            names = [name[1]]
        else:
            fmt = re.match(r'\s*&format!\("(\w+?)\{', args[1])
            if not fmt and args[1].strip() == "&name":
                fmt = list(re.finditer(r'let name = format!\("(\w+?)\{', text[:i]))
                fmt = fmt[-1] if fmt else None
            names = [k for k in params if fmt and k.startswith(fmt[1])]
        for k in names:
            if params[k] != given:
                print(f"{f}: {k} takes {params[k]} parameters, the launch gives {given}")
                bad += 1
        if not names:
            print(f"{f}: unchecked launch of {args[1].strip()} ({given} arguments)")
        i = text.find("launch!(", j)
# scripts/gpu/flash_bench.py launches the flash kernels through ctypes: `kern.launch(f"flash_dq_{d}", grid, smem, ARGS)`
# with ARGS a list or a name bound to one just before. It may pass more arguments than a kernel has (older copies of
# the kernels take fewer; the driver reads only as many as the kernel has), never fewer.
bench = open("scripts/gpu/flash_bench.py").read()
i = bench.find("kern.launch(")
while i >= 0:
    j, depth = i + 12, 1
    while depth:
        depth += (bench[j] in "([{") - (bench[j] in ")]}")
        j += 1
    args = top_level_args(bench[i + 12:j - 1])
    prefix = re.match(r'\s*f"(\w+?)\{', args[0])
    lst = args[3].strip()
    if not lst.startswith("["):
        bound = list(re.finditer(rf"{re.escape(lst)} = (\[.*\])", bench[:i]))
        lst = bound[-1][1] if bound else ""
    given = len(top_level_args(lst.strip()[1:-1])) if lst.startswith("[") else None
    names = [k for k in params if prefix and k.startswith(prefix[1])]
    for k in names:
        if given is None or given < params[k]:
            print(f"scripts/gpu/flash_bench.py: {k} takes {params[k]} parameters, the launch gives {given}")
            bad += 1
    if not names:
        print(f"scripts/gpu/flash_bench.py: unchecked launch of {args[0].strip()}")
    i = bench.find("kern.launch(", j)
sys.exit(1 if bad else 0)
