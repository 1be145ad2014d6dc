"""GPTQ int4 reference fixtures, made with AutoGPTQ 0.7.1's own pure-Python code.
Run from the repository root:

    /work/refvenv/bin/python scripts/reference/make_gptq_fixtures.py

Needs torch, transformers, safetensors and numpy. AutoGPTQ itself is not installed (its sdist needs
CUDA just to build metadata): the script fetches the cp311 manylinux wheel of auto_gptq==0.7.1 with
`pip download --no-deps --only-binary :all: --platform ...` (sha256 pinned, nothing compiled or
installed), unzips three files into ~/.cache/qpeft-ref/auto_gptq-0.7.1/ (idempotent; override with
QPEFT_REF_CACHE) and loads them by path:

    auto_gptq/quantization/quantizer.py            Quantizer (configure, find_params, quantize)
    auto_gptq/quantization/gptq.py                 GPTQ (add_batch, fasterquant)
    auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py   QuantLinear.pack (qweight/qzeros/scales/g_idx)

The parent packages auto_gptq, auto_gptq.quantization, auto_gptq.nn_modules(.qlinear) are replaced
by empty module objects so their __init__ files (the whole modeling stack) never run; transformers
is the real one. On a machine without CUDA, torch.cuda.synchronize (called unconditionally at the
end of fasterquant, for timing) is swapped for a no-op while fasterquant runs. No math is changed.

Writes, under tests/fixtures/gptq/:
  rtn.safetensors + rtn.json    round-to-nearest with a fresh Quantizer per group of G input
                                columns (G in 32/64/128, sym and asym), incl. edge rows
  gptq.safetensors + gptq.json  GPTQ.fasterquant (blocksize 128, percdamp 0.01, group 32, no
                                act-order) on a 64x256 layer with correlated calibration inputs and
                                dead columns, sym and asym; output losses vs RTN; the asym case
                                packed by QuantLinear.pack into the auto-gptq int32 layout.
"""
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

AGPTQ_VERSION = "0.7.1"
WHEEL = "auto_gptq-0.7.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "a372d81d523b8d2f98639bbca63c0c427cab0ed55b8a57bb96706b0942aa01c9"
FILES = [
    "auto_gptq/quantization/quantizer.py",
    "auto_gptq/quantization/gptq.py",
    "auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py",
]
OUT_DIR = Path("tests/fixtures/gptq")
CACHE = Path(os.environ.get("QPEFT_REF_CACHE", Path.home() / ".cache" / "qpeft-ref")) / f"auto_gptq-{AGPTQ_VERSION}"


# ----------------------------------------------------------------------------- AutoGPTQ source

def fetch_autogptq():
    """Unpack the three source files into CACHE (once); returns the directory holding auto_gptq/."""
    stamp = CACHE / "WHEEL_SHA256"
    if stamp.exists() and stamp.read_text().strip() == WHEEL_SHA256 and all((CACHE / f).exists() for f in FILES):
        return CACHE
    with tempfile.TemporaryDirectory() as tmp:
        # The wheel's platform tags are forced so this works from any interpreter; nothing is built.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                        "--implementation", "cp", "--abi", "cp311",
                        f"auto_gptq=={AGPTQ_VERSION}", "-d", tmp], check=True)
        whl = Path(tmp) / WHEEL
        digest = hashlib.sha256(whl.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{WHEEL}: sha256 {digest} != pinned {WHEEL_SHA256}")
        with zipfile.ZipFile(whl) as z:
            for f in FILES + ["auto_gptq-0.7.1.dist-info/LICENSE"]:
                dst = CACHE / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(f))
    stamp.write_text(WHEEL_SHA256 + "\n")
    return CACHE


def load_autogptq(root):
    """Import the three files by path under their real module names, with stub parent packages."""
    for pkg in ["auto_gptq", "auto_gptq.quantization", "auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear"]:
        m = types.ModuleType(pkg)
        m.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[pkg] = m
    mods = {}
    for f in FILES:
        name = f[:-3].replace("/", ".")
        spec = importlib.util.spec_from_file_location(name, root / f)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods[name.rsplit(".", 1)[1]] = mod
    return mods


@contextmanager
def cpu_cuda_sync():
    """fasterquant ends with torch.cuda.synchronize() (timing only); make it a no-op without CUDA."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


# ----------------------------------------------------------------------------- helpers

def f16(x):
    return x.half().float()


def n_ties(x, scale):
    """How many x/scale land exactly on k + 0.5 (float32, as Quantizer computes it)."""
    r = x / scale
    return int(((r - torch.floor(r)) == 0.5).sum())


def rtn(Quantizer, W, G, sym):
    """Round-to-nearest: a fresh Quantizer per group, find_params + quantize as fasterquant does."""
    out, inn = W.shape
    assert inn % G == 0
    scales, zeros, qs, whats, ties = [], [], [], [], 0
    for g in range(inn // G):
        x = W[:, g * G:(g + 1) * G]
        qz = Quantizer()
        qz.configure(bits=4, perchannel=True, sym=sym, mse=False)
        qz.find_params(x, weight=True)
        assert qz.ready()
        w_hat = qz.quantize(x)
        q = torch.clamp(torch.round(x / qz.scale) + qz.zero, 0, qz.maxq)  # Quantizer's own formula
        assert torch.equal(w_hat, qz.scale * (q - qz.zero))
        ties += n_ties(x, qz.scale)
        scales.append(qz.scale)
        zeros.append(qz.zero)
        qs.append(q)
        whats.append(w_hat)
    return (torch.cat(scales, 1), torch.cat(zeros, 1), torch.cat(qs, 1).to(torch.int32), torch.cat(whats, 1), ties)


def edge_matrix(gen):
    """[10, 64]: two groups of 32 (or one of 64), every value fp16-representable."""
    s = 0.0625  # a power of two, so the step below is exact and x / step is exact
    rows = []
    rnd = lambda n: torch.randn(n, generator=gen)
    pick = lambda vals, n: torch.tensor(vals)[torch.randint(len(vals), (n,), generator=gen)]
    shuffle = lambda v: v[torch.randperm(len(v), generator=gen)]
    rows.append(rnd(64))                                                     # 0 random
    rows.append(torch.cat([torch.zeros(32), rnd(32)]))                       # 1 first group all zero
    rows.append(0.1 + 2 * torch.rand(64, generator=gen))                     # 2 all positive
    rows.append(-0.1 - 2 * torch.rand(64, generator=gen))                    # 3 all negative
    # 4 asym ties: group range [-8s, 7s] -> scale s, zero 8; the rest sit at (k + 0.5) s
    half = [(k + 0.5) * s for k in range(-8, 7)]
    rows.append(torch.cat([shuffle(torch.cat([torch.tensor([-8 * s, 7 * s]), pick(half, 30)])) for _ in range(2)]))
    # 5 sym (and asym) ties: range [-7.5s, 7.5s] -> scale s (sym: 2*7.5s/15; asym: 15s/15, zero round(7.5)=8)
    half = [(k + 0.5) * s for k in range(-8, 8)]
    rows.append(torch.cat([shuffle(torch.cat([torch.tensor([-7.5 * s, 7.5 * s]), pick(half, 30)])) for _ in range(2)]))
    # 6 asym zero-point tie: range [-2.5s, 12.5s] -> scale s, zero = round(2.5) = 2
    quarter = [k * s / 4 for k in range(-10, 51)]
    rows.append(torch.cat([shuffle(torch.cat([torch.tensor([-2.5 * s, 12.5 * s]), pick(quarter, 30)])) for _ in range(2)]))
    rows.append(torch.zeros(64))                                             # 7 whole row zero
    r = 0.1 + torch.rand(64, generator=gen)                                  # 8 positive + one tiny negative per group
    r[5], r[40] = -1e-3, -2e-3                                               #   (asym zero rounds to 0)
    rows.append(r)
    rows.append(torch.full((64,), 0.3))                                      # 9 constant positive
    return f16(torch.stack(rows))


RTN_EDGE_ROWS = ["random", "first group all zero", "all positive", "all negative",
                 "asym ties: range [-8s,7s], s=1/16, others at (k+0.5)s",
                 "sym+asym ties: range [-7.5s,7.5s], s=1/16, others at (k+0.5)s",
                 "asym zero-point tie: range [-2.5s,12.5s] -> zero round(2.5)=2",
                 "whole row zero", "positive with one tiny negative per group (asym zero 0)",
                 "constant 0.3 (fp16)"]


# ----------------------------------------------------------------------------- RTN fixture

def make_rtn(Quantizer):
    gen = torch.Generator().manual_seed(0)
    w_a = f16(torch.randn(8, 128, generator=gen) * (0.02 + 0.1 * torch.rand(8, 1, generator=gen)))
    w_b = torch.randn(8, 256, generator=gen) * 0.03  # plain float32, not fp16-representable
    w_c = f16(torch.randn(48, 128, generator=gen) * 0.05 + 0.01)
    w_e = edge_matrix(gen)
    specs = [  # name, W, G, fp16-representable, note
        ("a", w_a, 32, True, "random rows with per-row scale"),
        ("b", w_b, 64, False, "random float32"),
        ("c", w_c, 128, True, "out 48, in 128, one group"),
        ("edge32", w_e, 32, True, "edge rows (see rows)"),
        ("edge64", w_e, 64, True, "edge rows (see rows), one group of 64"),
    ]
    tensors, cases = {}, []
    for name, W, G, is16, note in specs:
        for sym in (True, False):
            key = f"{name}_{'sym' if sym else 'asym'}"
            scale, zero, q, w_hat, ties = rtn(Quantizer, W, G, sym)
            tensors[f"{key}.W"] = W.clone()
            tensors[f"{key}.scale"] = scale.contiguous()
            tensors[f"{key}.zero"] = zero.contiguous()
            tensors[f"{key}.q"] = q.contiguous()
            tensors[f"{key}.W_hat"] = w_hat.contiguous()
            c = {"key": key, "out": W.shape[0], "in": W.shape[1], "bits": 4, "group_size": G, "sym": sym,
                 "n_groups": W.shape[1] // G, "fp16_representable": is16, "exact_ties": ties, "note": note}
            if name.startswith("edge"):
                c["rows"] = RTN_EDGE_ROWS
            cases.append(c)
            print(f"rtn {key:12s} W {list(W.shape)} G {G:3d} ties {ties:3d} "
                  f"max|W-W_hat| {float((W - w_hat).abs().max()):.4g}")
    meta = {
        "source": f"auto_gptq {AGPTQ_VERSION} quantization/quantizer.py (Quantizer), via {Path(__file__).name}",
        "method": "for each group g of G input columns: Quantizer().configure(bits=4, perchannel=True, sym=sym, "
                  "mse=False); find_params(W[:, g*G:(g+1)*G], weight=True); W_hat = quantize(...)",
        "formulas": {
            "xmin/xmax": "xmin = min(row_min, 0), xmax = max(row_max, 0); sym: xmax = max(|xmin|, xmax) and, "
                         "only if xmin < 0, xmin = -xmax; if xmin == xmax == 0: xmin, xmax = -1, +1",
            "scale": "(xmax - xmin) / 15 (float32)",
            "zero": "sym: 8.0; asym: round_half_even(-xmin / scale) (float32 holding an integer; -0.0 when "
                    "xmin == 0, i.e. a group row with no negative value: compare by value, not bits)",
            "q": "clamp(round_half_even(W / scale) + zero, 0, 15)",
            "W_hat": "scale * (q - zero)",
        },
        "tensors": "<key>.W [out,in] f32, <key>.scale [out,n_groups] f32, <key>.zero [out,n_groups] f32, "
                   "<key>.q [out,in] i32, <key>.W_hat [out,in] f32",
        "cases": cases,
    }
    return tensors, meta


# ----------------------------------------------------------------------------- GPTQ fixture

def make_gptq(mods):
    GPTQ, Quantizer, QuantLinear = mods["gptq"].GPTQ, mods["quantizer"].Quantizer, mods["qlinear_cuda_old"].QuantLinear
    OUT, IN, N, G = 64, 256, 512, 32
    torch.manual_seed(1)
    W = f16(torch.randn(OUT, IN) * (0.02 + 0.06 * torch.rand(OUT, 1)))
    Z = torch.randn(N, 48)
    M = torch.randn(48, IN) / math.sqrt(48)
    X = (Z @ M + 0.2 * torch.randn(N, IN)) * (0.5 + torch.rand(IN))  # correlated columns, varied scale
    X = f16(X)
    dead = [3, 64, 100, 191, 255]
    X[:, dead] = 0

    def loss(w_hat):
        d = X.double() @ (W.double() - w_hat.double()).t()
        return float((d * d).sum())

    def run_gptq(sym, chunks=1):
        layer = nn.Linear(IN, OUT, bias=False)
        layer.weight.data = W.clone()
        g = GPTQ(layer)
        g.quantizer.configure(bits=4, perchannel=True, sym=sym, mse=False)
        for xc in X.chunk(chunks):
            g.add_batch(xc, None)
        with cpu_cuda_sync():
            scale, zero, g_idx = g.fasterquant(blocksize=128, percdamp=0.01, group_size=G,
                                               actorder=False, static_groups=False)
        return layer.weight.data.clone(), scale, zero, g_idx

    tensors = {"W": W.contiguous(), "X": X.contiguous()}
    cases, summary = [], {}
    for sym in (True, False):
        key = "sym" if sym else "asym"
        w_hat, scale, zero, g_idx = run_gptq(sym)
        q = (torch.round(w_hat / scale.repeat_interleave(G, 1)) + zero.repeat_interleave(G, 1))
        assert torch.equal(w_hat, scale.repeat_interleave(G, 1) * (q - zero.repeat_interleave(G, 1)))
        _, _, _, rtn_hat, _ = rtn(Quantizer, W, G, sym)
        l_gptq, l_rtn = loss(w_hat), loss(rtn_hat)
        # Sensitivity: same data fed as 4 add_batch calls (H summed and scaled differently).
        w_hat4, scale4, zero4, _ = run_gptq(sym, chunks=4)
        q4 = torch.round(w_hat4 / scale4.repeat_interleave(G, 1)) + zero4.repeat_interleave(G, 1)
        n_diff = int((q4 != q).sum())
        # Group scales inside a block come from W with earlier blocks' error feedback only: groups
        # 1..3 (columns 32..127, inside block 0) must match find_params on the untouched W.
        Wd = W.clone()
        Wd[:, dead] = 0
        qz = Quantizer()
        qz.configure(bits=4, perchannel=True, sym=sym, mse=False)
        same = []
        for gi in range(IN // G):
            qz.find_params(Wd[:, gi * G:(gi + 1) * G], weight=True)
            same.append(bool(torch.equal(qz.scale[:, 0], scale[:, gi]) and torch.equal(qz.zero[:, 0], zero[:, gi])))
        tensors[f"{key}.W_hat"] = w_hat.contiguous()
        tensors[f"{key}.scale"] = scale.contiguous()
        tensors[f"{key}.zero"] = zero.contiguous()
        tensors[f"{key}.g_idx"] = g_idx.to(torch.int32).contiguous()
        tensors[f"{key}.loss_gptq"] = torch.tensor([l_gptq], dtype=torch.float64).float()
        tensors[f"{key}.loss_rtn"] = torch.tensor([l_rtn], dtype=torch.float64).float()
        cases.append({"key": key, "sym": sym, "loss_gptq": l_gptq, "loss_rtn": l_rtn,
                      "codes_changed_when_fed_as_4_batches": n_diff,
                      "group_params_equal_rtn_of_W_with_dead_zeroed": same})
        summary[key] = (w_hat, scale, zero, g_idx, q)
        print(f"gptq {key:4s} loss_gptq {l_gptq:.6g} loss_rtn {l_rtn:.6g} ratio {l_gptq / l_rtn:.4f} "
              f"| codes changed (4 add_batch calls) {n_diff}/{q.numel()} "
              f"| groups whose scale/zero = find_params(W): {same}")

    # Pack the asym case as AutoGPTQ's pack_model does: the (fp16) layer after fasterquant.
    w_hat, scale, zero, g_idx, q = summary["asym"]
    lin = nn.Linear(IN, OUT, bias=False).half()
    lin.weight.data = w_hat.half()
    ql = QuantLinear(bits=4, group_size=G, infeatures=IN, outfeatures=OUT, bias=False)
    ql.pack(lin, scale.clone(), zero.clone(), g_idx.clone())
    n_zero0 = int((zero == 0).sum())
    packed = {"qweight": ql.qweight, "qzeros": ql.qzeros, "scales": ql.scales, "g_idx": ql.g_idx}
    assert packed["qweight"].dtype == torch.int32 and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].dtype == torch.float16
    for k, v in packed.items():
        tensors[f"asym.packed.{k}"] = v.contiguous()

    # Check: the documented unpacking reproduces the codes and W_hat.
    qw = packed["qweight"].numpy().view(np.uint32)
    qzr = packed["qzeros"].numpy().view(np.uint32)
    shifts = np.arange(8, dtype=np.uint32) * 4
    q_un = ((qw[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(IN, OUT)          # [in, out]
    z_un = (((qzr[:, :, None] >> shifts[None, None, :]) & 0xF) + 1) & 0xF              # [groups, out/8, 8]
    z_un = z_un.reshape(IN // G, OUT)
    sc = packed["scales"].float().numpy()
    gi = packed["g_idx"].numpy()
    deq = sc[gi, :] * (q_un.astype(np.float32) - z_un[gi, :].astype(np.float32))       # [in, out]
    codes_ok = bool(np.array_equal(q_un.T, q.numpy().astype(np.uint32)))
    zeros_ok = bool(np.array_equal(z_un.T, zero.numpy().astype(np.uint32)))
    max_diff = float(np.abs(deq.T - w_hat.numpy()).max())
    # AutoGPTQ's own CPU dequant path (QuantLinear.forward on an identity input).
    with torch.no_grad():
        own = ql(torch.eye(IN, dtype=torch.float16)).float().numpy()                    # [in, out]
    deq16 = sc.astype(np.float16)[gi, :] * (q_un.astype(np.float16) - z_un[gi, :].astype(np.float16))
    own_exact = bool(np.array_equal(own, deq16.astype(np.float32)))  # it computes scales * (q - z) in fp16
    print(f"pack asym: qweight {list(packed['qweight'].shape)} qzeros {list(packed['qzeros'].shape)} "
          f"scales {list(packed['scales'].shape)} {packed['scales'].dtype} g_idx {list(packed['g_idx'].shape)}; "
          f"codes match {codes_ok}, zeros match {zeros_ok}, zero==0 groups {n_zero0}, "
          f"max|deq - W_hat| {max_diff:.3g}, QuantLinear.forward(I) == fp16 deq {own_exact}")

    meta = {
        "source": f"auto_gptq {AGPTQ_VERSION} quantization/gptq.py (GPTQ), quantizer.py, "
                  f"nn_modules/qlinear/qlinear_cuda_old.py (QuantLinear.pack), via {Path(__file__).name}",
        "layer": {"out": OUT, "in": IN, "bias": False},
        "calibration": {"rows": N, "dead_columns": dead,
                        "how": "X = (Z[512,48] @ M[48,256]/sqrt(48) + 0.2 noise) * per-column scale, rounded "
                               "through fp16, dead columns zeroed; fed as one GPTQ.add_batch(X, None) call"},
        "fasterquant": {"bits": 4, "perchannel": True, "mse": False, "blocksize": 128, "percdamp": 0.01,
                        "group_size": G, "actorder": False, "static_groups": False},
        "loss": "||X W^T - X W_hat^T||_F^2 in float64; loss_rtn uses RTN of W (fresh Quantizer per group, "
                "same sym) without zeroing dead columns",
        "tensors": "W [64,256] f32 (fp16-representable), X [512,256] f32 (fp16-representable); per case "
                   "<sym|asym>.W_hat [64,256] f32 (layer weight after fasterquant), .scale/.zero [64,8] f32, "
                   ".g_idx [256] i32, .loss_gptq/.loss_rtn [1] f32; "
                   "asym.packed.qweight [32,64] i32, .qzeros [8,8] i32, .scales [8,64] f16, .g_idx [256] i32",
        "packing": "QuantLinear(bits=4, group_size=32, infeatures=256, outfeatures=64, bias=False).pack(fp16 "
                   "Linear holding asym.W_hat, scale, zero, g_idx). qweight[i, j] holds input rows 8i..8i+7 of "
                   "output j, row 8i+t in bits 4t..4t+3; qzeros[g, c] holds (zero - 1) & 0xF of outputs "
                   "8c..8c+7 the same way; dequant W[j, i] = scales[g_idx[i], j] * (q[i, j] - "
                   "((qzeros_nibble[g_idx[i], j] + 1) & 0xF))",
        "pack_check": {"codes_match": codes_ok, "zeros_match": zeros_ok, "max_abs_dequant_minus_W_hat": max_diff,
                       "autogptq_cpu_forward_on_identity_equals_fp16_dequant": own_exact,
                       "zero_eq_0_groups": n_zero0},
        "packing_caveat": "pack stores zero - 1 through numpy float -> uint32; a zero of 0 becomes 0xFFFFFFFF and "
                          "its OR sets every higher nibble of that qzeros word (the following outputs then read "
                          "back zero 0). This case has no zero-0 group, so the layout above holds exactly.",
        "cases": cases,
    }
    return tensors, meta


def main():
    torch.set_num_threads(1)
    mods = load_autogptq(fetch_autogptq())
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    t, meta = make_rtn(mods["quantizer"].Quantizer)
    save_file(t, str(OUT_DIR / "rtn.safetensors"))
    json.dump(meta, open(OUT_DIR / "rtn.json", "w"), indent=1)
    t, meta = make_gptq(mods)
    save_file(t, str(OUT_DIR / "gptq.safetensors"))
    json.dump(meta, open(OUT_DIR / "gptq.json", "w"), indent=1)
    for f in sorted(OUT_DIR.iterdir()):
        print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
