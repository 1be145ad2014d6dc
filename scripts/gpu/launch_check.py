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
sys.exit(1 if bad else 0)
