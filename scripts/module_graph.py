#!/usr/bin/env python3
"""Derives the library's module graph from its `use` lines and paths, and fails on a cycle.

    scripts/module_graph.py [SRC_DIR] [--dot]

A module is a source file (`a/b.rs` or `a/b/mod.rs` is `a::b`). An edge A -> B means that A names an item of B
(`use crate::b::Item`, `super::Item`, an inline `crate::b::f(...)`); an item that a `mod.rs` re-exports with
`pub use child::Item` is followed to the child that defines it. Two graphs must be acyclic:

- the top-level graph (modules collapsed to their first segment: `model`, `adapters`, ...);
- every directory's sibling graph (files of one directory; a parent module may use its own children, which is how
  Rust composes modules, so only edges between siblings count there).

Exit status 1 lists every cycle found; --dot prints the top-level graph in Graphviz form.
"""

import os
import re
import sys
from collections import defaultdict


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"]."""
    tree = re.sub(r"\s+", "", tree)
    depth, i = 0, 0
    for i, ch in enumerate(tree):
        if ch == "{":
            break
    else:
        return [tree.split(" as ")[0]]
    prefix, body = tree[:i], tree[i + 1 : tree.rindex("}")]
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        if p:
            out += [prefix + q for q in expand_use(p)]
    return out


def load(src):
    modules = {}  # path tuple -> text
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel == ["lib"]:
                rel = []
            with open(os.path.join(root, f), encoding="utf-8") as fh:
                modules[tuple(rel)] = strip_comments(fh.read())
    return modules


def reexports(modules):
    """(module, name) -> the child module that defines it, for `pub use child::...` in a parent."""
    out = {}
    for mod, text in modules.items():
        for m in re.finditer(r"pub\s+use\s+([^;]+);", text):
            for path in expand_use(m.group(1)):
                segs = path.split("::")
                if segs[0] in ("crate", "super", "self"):
                    continue
                child = mod + (segs[0],)
                if child in modules:
                    out[(mod, segs[-1])] = child
    return out


def resolve(mod, path, modules, rexp):
    segs = path.split("::")
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    elif segs[0] == "self":
        base, rest = mod, segs[1:]
    elif segs[0] == "super":
        base = mod
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
        rest = segs
    else:
        return None
    target = base
    for i, s in enumerate(rest):
        if target + (s,) in modules:
            target = target + (s,)
        else:
            if (target, s) in rexp:
                target = rexp[(target, s)]
            break
    return target


def edges(modules):
    rexp = reexports(modules)
    out = defaultdict(set)
    for mod, text in modules.items():
        paths = []
        for m in re.finditer(r"\buse\s+([^;]+);", text):
            paths += expand_use(m.group(1))
        paths += re.findall(r"\b(?:crate|super)(?:::\w+)+", text)
        for p in paths:
            t = resolve(mod, p, modules, rexp)
            if t is not None and t != mod:
                out[mod].add(t)
    return out


def cycles(nodes, adj):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comps


def name(mod):
    return "::".join(mod) or "crate"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "crates", "qpeft", "src")
    modules = load(src)
    adj = edges(modules)

    top = defaultdict(set)
    for a, ts in adj.items():
        for b in ts:
            if a and b and a[0] != b[0]:
                top[a[0]].add(b[0])
    if "--dot" in sys.argv:
        print("digraph modules {")
        for a in sorted(top):
            for b in sorted(top[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")

    found = [("top-level modules", c) for c in cycles({m[0] for m in modules if m}, top)]
    dirs = defaultdict(set)
    for m in modules:
        if m:
            dirs[m[:-1]].add(m)
    for parent, kids in dirs.items():
        sib = defaultdict(set)
        for a in kids:
            for b in adj.get(a, ()):
                # Collapse a target below a sibling to that sibling.
                if len(b) > len(parent) and b[: len(parent)] == parent:
                    s = b[: len(parent) + 1]
                    if s != a and s in kids:
                        sib[a].add(s)
        for c in cycles(kids, sib):
            found.append((f"files of {name(parent)}", [name(x) for x in c]))
    for where, comp in found:
        print(f"import cycle among {where}: {' <-> '.join(comp)}")
    if found:
        sys.exit(1)
    print(f"module graph: {len(modules)} modules, no import cycle")


if __name__ == "__main__":
    main()
