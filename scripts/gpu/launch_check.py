#!/usr/bin/env python3
"""Counts each `launch!` call's kernel arguments in backend/cuda/*.rs against the kernel's parameter list in kernels.cu
and flash.cu. A launch with fewer arguments than its kernel has makes the driver read past the argument array: a host
segfault, not an error (session 22). Kernels named at run time (format!, variables) are listed as unchecked."""
import glob
import re
import sys

root = "crates/qpeft/src/backend/cuda/"
src = open(root + "kernels.cu").read() + open(root + "flash.cu").read()
params = {m[1]: len([p for p in m[2].split(",") if p.strip()])
          for m in re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', src)}


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
            if params[name[1]] != given:
                print(f"{f}: {name[1]} takes {params[name[1]]} parameters, the launch gives {given}")
                bad += 1
        else:
            print(f"{f}: unchecked launch of {args[1].strip()} ({given} arguments)")
        i = text.find("launch!(", j)
sys.exit(1 if bad else 0)
