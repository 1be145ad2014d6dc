#!/usr/bin/env python3
"""The fused attention kernels (crates/qpeft/src/backend/cuda/flash.cu) on their own, on the GPU machine: each kernel's
time and TFLOP/s on training shapes next to PyTorch's FlashAttention (SDPA) on the same shape, and each output
against an f32 reference computed by torch from the same rounded operands. Other copies of the kernels (`--variant
NAME=DIR`, DIR holding kernels.cu and flash.cu, e.g. the previous commit's) run on the same inputs, so a kernel change
gets its before/after and its output difference from the tree's in one call.

    scripts/gpu/flash_bench.py [--variant NAME=DIR ...] [--reps 10] [--out DIR] [--case SUBSTR] [--mode f16|bf16]

Needs torch with CUDA (its NVRTC wheel compiles the kernels, as qpeft's NVRTC does at run time) and no Rust build.
Launch geometry and shared memory follow flash.rs (ROWS, TILE, THREADS read from each flash.cu)."""
import argparse
import ctypes
import json
import math
import os
import re
import sys

import torch

import nvrtc


class Attn(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("batch", "q_len", "kv_len", "kv_capacity", "heads", "kv_heads", "head_dim")] + [
        ("scale", ctypes.c_float),
        ("window", ctypes.c_int),
    ]


def check(rc, what):
    if rc != 0:
        sys.exit(f"CUDA driver error {rc} in {what}")


class Kernels:
    """One copy of kernels.cu + flash.cu compiled for this GPU in one precision mode (bf16, or f16 with QPEFT_F16)."""

    def __init__(self, src_dir, f16):
        src = nvrtc.source(src_dir)
        self.geom = {k: int(re.search(rf"#define {k} (\d+)", src).group(1)) for k in ("ROWS", "TILE", "THREADS")}
        # The forward's block size where it has its own (FWD_THREADS, an expression of ROWS and FWD_TILES).
        fwd = re.search(r"#define FWD_THREADS (.+)", src)
        tiles = re.search(r"#define FWD_TILES (\d+)", src)
        expr = fwd.group(1).replace("ROWS", str(self.geom["ROWS"])).replace("FWD_TILES", tiles.group(1)) if fwd else "THREADS"
        self.geom["FWD_THREADS"] = int(eval(expr.replace("/", "//"), {"THREADS": self.geom["THREADS"]}))
        major, minor = torch.cuda.get_device_capability()
        ptx = nvrtc.compile_ptx(src, f"compute_{major}{minor}", f16)
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.module = ctypes.c_void_p()
        check(self.cu.cuModuleLoadData(ctypes.byref(self.module), ptx), "cuModuleLoadData")
        self.f16 = f16

    def launch(self, name, grid, smem, args, threads=None):
        f = ctypes.c_void_p()
        check(self.cu.cuModuleGetFunction(ctypes.byref(f), self.module, name.encode()), f"cuModuleGetFunction {name}")
        check(self.cu.cuFuncSetAttribute(f, 8, smem), "cuFuncSetAttribute")  # max dynamic shared memory
        holders = [a if isinstance(a, (Attn, ctypes.c_int, ctypes.c_longlong)) else ctypes.c_uint64(a) for a in args]
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        threads = threads or self.geom["THREADS"]
        check(self.cu.cuLaunchKernel(f, *grid, threads, 1, 1, smem, stream, params, None), f"launch {name}")

    def smem(self, d, owned, walked, vectors):
        g = self.geom
        return 2 * (owned * g["ROWS"] + walked * g["TILE"]) * (d + 8) + 4 * g["TILE"] * vectors


def f16_shift(x):
    """The f16 mode's power-of-two scale exponent for tensor x (kernels.cu f16_shift_for of its largest magnitude)."""
    bits = x.abs().max().float().view(torch.int32).item()
    b = (bits >> 23) & 255
    e = 15 if b == 255 else -126 if b == 0 else b - 126
    return min(120, max(-120, 15 - e))


def operand(x, f16):
    """x as the backend's 16-bit operand (bf16 RNE, or fp16 of x·2^s) and its largest magnitude."""
    amax = x.abs().max().float()
    return ((x * 2.0 ** f16_shift(x)).half() if f16 else x.bfloat16()), amax


def dkv_split(kv_len, kv_heads, batch, heads, rows):
    blocks = -(-kv_len // rows) * kv_heads * batch
    rep = heads // kv_heads
    return next((p for p in range(rep, 0, -1) if rep % p == 0 and blocks * p <= 264), 1)


def run_kernels(kern, case, inputs):
    """Forward, dQ and dK/dV of one copy; returns outputs and per-kernel milliseconds."""
    b, s, h, kvh, d = case["batch"], case["seq"], case["heads"], case["kv_heads"], case["head_dim"]
    g = kern.geom
    attn = Attn(b, s, s, s, h, kvh, d, 1.0 / math.sqrt(d), 0)
    ops, amax = {}, torch.zeros(4, dtype=torch.float32, device="cuda")
    for i, name in enumerate(("q", "k", "v", "dout")):
        ops[name], amax[i] = operand(inputs[name], kern.f16)
    amax_ptr = amax.data_ptr() if kern.f16 else 0
    mask = inputs["mask"]
    out = torch.zeros(b, s, h, d, device="cuda")
    dq = torch.zeros_like(out)
    stats = torch.zeros(2 * b * h * s, device="cuda")
    split = dkv_split(s, kvh, b, h, g["ROWS"])
    dk_parts = torch.zeros(split, b, s, kvh, d, device="cuda")
    dv_parts = torch.zeros_like(dk_parts)
    rows = -(-s // g["ROWS"])
    p = lambda t: t.data_ptr()  # noqa: E731

    # The kernels' trailing parameters, where a version has them, as the plain path passes them: no log-sum-exp kept
    # (forward's stats null, dq's have_lse 0). A version with fewer parameters ignores the extra arguments.
    def fwd():
        args = [p(ops["q"]), p(ops["k"]), p(ops["v"]), p(mask), attn, p(out), amax_ptr, 0]
        kern.launch(f"flash_forward_{d}", (rows, h, b), kern.smem(d, 1, 4, 2), args, g["FWD_THREADS"])

    def bwd_q():
        kern.launch(
            f"flash_dq_{d}",
            (rows, h, b),
            kern.smem(d, 2, 4, 2),
            [p(ops["q"]), p(ops["k"]), p(ops["v"]), p(mask), attn, p(out), p(inputs["dout"]), p(ops["dout"]), p(dq), p(stats), amax_ptr, ctypes.c_int(0)],
        )

    def bwd_kv():
        kern.launch(
            f"flash_dkv_{d}",
            (rows, kvh * split, b),
            kern.smem(d, 2, 4, 6),
            [p(ops["q"]), p(ops["k"]), p(ops["v"]), p(mask), attn, p(ops["dout"]), p(stats), p(dk_parts), p(dv_parts), amax_ptr, ctypes.c_int(split), ctypes.c_longlong(dk_parts[0].numel())],
        )

    ms = {}
    for name, fn in (("forward", fwd), ("dq", bwd_q), ("dkv", bwd_kv)):
        ms[name] = timed(fn, case["reps"])
    return {"out": out, "dq": dq, "dk": dk_parts.sum(0), "dv": dv_parts.sum(0)}, ms, ops


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def reference(case, inputs, ops, f16):
    """f32 attention (and its gradients through autograd) from the rounded operands, unscaled."""
    deq = {n: ops[n].float() / (2.0 ** f16_shift(inputs[n]) if f16 else 1.0) for n in ("q", "k", "v", "dout")}
    b, s, h, kvh, d = case["batch"], case["seq"], case["heads"], case["kv_heads"], case["head_dim"]
    q = deq["q"].permute(0, 2, 1, 3).requires_grad_()
    k = deq["k"].permute(0, 2, 1, 3).repeat_interleave(h // kvh, 1).detach().requires_grad_()
    v = deq["v"].permute(0, 2, 1, 3).repeat_interleave(h // kvh, 1).detach().requires_grad_()
    seg = inputs["mask"].view(b, s).long()
    causal = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
    visible = (causal[None] & same & (seg[:, None, :] != 0))[:, None]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~visible, float("-inf"))
    prob = torch.softmax(scores, -1).nan_to_num(0.0)
    out = prob @ v
    out.backward(deq["dout"].permute(0, 2, 1, 3))
    fold = lambda t: t.view(b, kvh, h // kvh, s, d).sum(2).permute(0, 2, 1, 3)  # noqa: E731
    return {"out": out.detach().permute(0, 2, 1, 3), "dq": q.grad.permute(0, 2, 1, 3), "dk": fold(k.grad), "dv": fold(v.grad)}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def sdpa_ms(case, reps):
    b, s, h, d = case["batch"], case["seq"], case["heads"], case["head_dim"]
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        fwd = timed(f, reps)
        both = timed(lambda: f().backward(do), reps)
    return {"forward": fwd, "backward": both - fwd}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", default=[], help="NAME=DIR: another kernels.cu and flash.cu to compare with")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--case", default="", help="only the cases whose name contains this")
    ap.add_argument("--mode", choices=("f16", "bf16"), help="only this precision mode")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = [
        dict(name="7B 2048x4", batch=4, seq=2048, heads=32, kv_heads=32, head_dim=128, packed=False),
        dict(name="7B 2048x1", batch=1, seq=2048, heads=32, kv_heads=32, head_dim=128, packed=False),
        dict(name="Qwen1.5B GQA 2048x1", batch=1, seq=2048, heads=12, kv_heads=2, head_dim=128, packed=False),
        dict(name="packed+padded 1024x2 d64", batch=2, seq=1024, heads=6, kv_heads=2, head_dim=64, packed=True),
    ]
    variants = [("tree", nvrtc.CUDA_DIR)] + [tuple(v.split("=", 1)) for v in args.variant]
    results = []
    torch.zeros(1, device="cuda")  # makes the primary context current, which the driver calls below use
    print(torch.cuda.get_device_name(), torch.__version__)
    for f16 in (True, False):
        mode = "f16" if f16 else "bf16"
        if args.mode and args.mode != mode:
            continue
        kerns = {name: Kernels(d, f16) for name, d in variants}
        for case in cases:
            if args.case not in case["name"]:
                continue
            case = dict(case, reps=args.reps)
            b, s, h, kvh, d = case["batch"], case["seq"], case["heads"], case["kv_heads"], case["head_dim"]
            gen = torch.Generator(device="cuda").manual_seed(1)
            inputs = {n: torch.randn(*shape, device="cuda", generator=gen) for n, shape in (("q", (b, s, h, d)), ("k", (b, s, kvh, d)), ("v", (b, s, kvh, d)), ("dout", (b, s, h, d)))}
            seg = torch.ones(b, s, dtype=torch.int32, device="cuda")
            if case["packed"]:
                # Row 0: examples of 300, 500, 200 and 24 positions; row 1: one example then right padding.
                bounds = [0, 300, 800, 1000, s]
                for i in range(4):
                    seg[0, bounds[i] : bounds[i + 1]] = i + 1
                seg[1, 900:] = 0
            inputs["mask"] = seg.view(-1).contiguous()
            flops_pairs = float(((seg.long()[:, :, None] == seg.long()[:, None, :]) & (seg[:, None, :] != 0)).tril().sum()) * h * d
            outs = {}
            for name, kern in kerns.items():
                o, ms, ops = run_kernels(kern, case, inputs)
                outs[name] = o
                row = dict(mode=mode, case=case["name"], kernels=name, ms=ms, tflops={"forward": 4 * flops_pairs / ms["forward"] / 1e9, "dq": 8 * flops_pairs / ms["dq"] / 1e9, "dkv": 8 * flops_pairs / ms["dkv"] / 1e9})
                if s * s * b * h <= 2**28:
                    ref = reference(case, inputs, ops, f16)
                    row["rel_err_vs_torch_f32"] = {k: rel(o[k], ref[k]) for k in o}
                results.append(row)
                print(json.dumps(row))
            for name in outs.keys() - {"tree"}:
                diff = {k: rel(outs[name][k], outs["tree"][k]) for k in outs["tree"]}
                row = dict(mode=mode, case=case["name"], kernels=name, rel_diff_from_tree=diff)
                print(json.dumps(row))
                results.append(row)
            if mode == "bf16" and not case["packed"] and kvh == h:
                sd = sdpa_ms(case, args.reps)
                row = dict(mode="bf16", case=case["name"], kernels="torch SDPA flash", ms=sd, tflops={"forward": 4 * flops_pairs / sd["forward"] / 1e9, "backward": 10 * flops_pairs / sd["backward"] / 1e9})
                print(json.dumps(row))
                results.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flash_bench.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
