"""Check a bitsandbytes 4-bit Hugging Face model directory against an independent quantization.
Run from the repository root:

    /work/refvenv/bin/python scripts/reference/check_bnb_dir.py QUANT_DIR ORIG_DIR [--dtype float32|bfloat16|float16]

QUANT_DIR is a directory as transformers' `save_pretrained` writes it for a model loaded with
`BitsAndBytesConfig(load_in_4bit=True, ...)` (or as `qpeft quantize --format nf4|fp4 [--double-quant]`
writes it); ORIG_DIR is the unquantized HF directory it was made from (safetensors, single file or
sharded). Format notes: docs/formats/bnb4-hf-dir.md. Needs torch, transformers, safetensors and
bitsandbytes 0.50.2 (its CPU quantize_4bit); no GPU.

What it verifies (exit code 1 and a final `FAIL: ...` line on any mismatch, else `OK: N layers bit-exact`):
  1. transformers loads QUANT_DIR on CPU with no quantization_config argument (it must come from
     QUANT_DIR/config.json), reports no missing / unexpected / mismatched keys, and every Linear
     except lm_head is a bitsandbytes Linear4bit.
  2. For each Linear4bit, the weight from ORIG_DIR is cast to --dtype (default: the `dtype` recorded
     in that layer's quant_state JSON) and quantized with bitsandbytes.functional.quantize_4bit
     (blocksize from the quant_state JSON -- config.json has none; quant_type and
     compress_statistics from config.json). Compared bit for bit with the loaded module: packed
     weight bytes (mismatching bytes counted), absmax (uint8 codes when nested, else f32), nested
     absmax, nested offset, quant maps; and dequantize_4bit of both (widened to f32), plus a pure-torch
     f32 dequantization of both (bitsandbytes' default backend; its AVX-512 CPU dequantize_4bit
     mis-indexes absmax when in_features % blocksize != 0, so that layer's `deq!=ref` column says
     `bnb-bug`; informative only).
  3. The on-disk tensors of each quantized linear are exactly what bitsandbytes' QuantState.as_dict
     (packed=True) gives for the independent quantization: same key set, dtypes, shapes and bytes,
     including the text of the `quant_state.bitsandbytes__<type>` JSON (--allow-json-text-diff
     accepts other key order, spacing and float digits when the values are equal, nested_offset
     compared as f32). Every other tensor (embeddings, lm_head, norms) equals the ORIG_DIR tensor
     cast to its saved dtype, bit for bit, and that dtype, the quant_state `dtype` and config.json
     `dtype` are one and the same, as transformers writes them.
  4. A forward pass on a few token ids gives finite logits; printed with their relative difference
     to the unquantized model's (f32) and to a model that uses the exact f32 dequantized weights
     (informative). On CPUs with AVX512-BF16, Linear4bit repacks its weight on the first forward
     and that repacking crashes when in_features % blocksize != 0; it is switched off for such
     layers (the bit-exact checks above run before any forward).
"""
import argparse
import json
import os
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code
from safetensors import safe_open
from transformers import AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StDir:
    """Lazy reader of an HF safetensors directory (single file or sharded)."""

    def __init__(self, d):
        idx = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(idx):
            wm = json.load(open(idx))["weight_map"]
            files = sorted(set(wm.values()))
        else:
            files = ["model.safetensors"]
        self.handles, self.where = {}, {}
        for f in files:
            h = safe_open(os.path.join(d, f), "pt")
            self.handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def keys(self):
        return self.where.keys()

    def __contains__(self, k):
        return k in self.where

    def get(self, k):
        return self.handles[self.where[k]].get_tensor(k)


def bits(t):
    """A view whose elementwise equality is bitwise equality."""
    t = t.detach().contiguous()
    if t.dtype.is_floating_point:
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def mismatches(a, b):
    """Number of differing elements, bit for bit (all of them when shapes or dtypes differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return max(a.numel(), b.numel(), 1)
    return int((bits(a) != bits(b)).sum())


def f32_absmax(qs):
    if qs.nested:
        return (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    return qs.absmax.float()


def ref_dequant(packed, qs):
    """f32 dequantization with bitsandbytes' pure-torch default backend (correct for any layout)."""
    return _dequantize_4bit_compute(packed.reshape(-1), f32_absmax(qs), _get_4bit_code(qs.quant_type, packed.device),
                                    qs.blocksize, qs.shape, torch.float32)


def same_values(a, b):
    """Equal JSON quant states, nested_offset compared as the f32 bitsandbytes turns it into."""
    f32 = lambda d: {k: (torch.tensor(float(v), dtype=torch.float32).item() if k == "nested_offset" else v) for k, v in d.items()}
    return f32(a) == f32(b)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("quant_dir")
    ap.add_argument("orig_dir")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast original weights to this before quantizing "
                    "(default: the dtype recorded in each layer's quant_state JSON)")
    ap.add_argument("--allow-json-text-diff", action="store_true",
                    help="accept a quant_state JSON whose text differs but whose parsed values are equal")
    ap.add_argument("--tokens", default="1,5,9,200,17,42,7,3", help="comma-separated token ids for the forward pass")
    args = ap.parse_args()
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}")
    fails = []

    cfg = json.load(open(os.path.join(args.quant_dir, "config.json")))
    qc = cfg.get("quantization_config")
    if not qc or qc.get("quant_method", "bitsandbytes") != "bitsandbytes" or not qc.get("load_in_4bit"):
        print(f"FAIL: config.json has no bitsandbytes 4-bit quantization_config: {qc}")
        sys.exit(1)
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    nested = bool(qc.get("bnb_4bit_use_double_quant", False))
    print(f"config.json: dtype={cfg.get('dtype', cfg.get('torch_dtype'))} quant_type={quant_type} "
          f"double_quant={nested} compute_dtype={qc.get('bnb_4bit_compute_dtype')} tie_word_embeddings={cfg.get('tie_word_embeddings')}")

    qdir, odir = StDir(args.quant_dir), StDir(args.orig_dir)

    # 1. load with transformers, config from QUANT_DIR only
    model, info = AutoModelForCausalLM.from_pretrained(args.quant_dir, device_map="cpu", output_loading_info=True)
    model.eval()
    info = {k: v for k, v in info.items() if v}
    if info:
        fails.append(f"loading info {info}")
        print("loading info:", info)
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            layers.append((name, mod))
        elif isinstance(mod, torch.nn.Linear):
            if name.split(".")[-1] == "lm_head":
                print(f"{name}: {type(mod).__name__} {mod.weight.dtype} (not quantized, as expected)")
            else:
                fails.append(f"{name} is {type(mod).__name__}, not Linear4bit")
    print(f"loaded {type(model).__name__} dtype={model.dtype}: {len(layers)} Linear4bit")

    # 2./3. independent quantization vs loaded modules and on-disk tensors
    hdr = (f"{'layer':44s} {'shape':>12s} {'dtype':>8s} {'packed':>7s} {'absmax':>6s} {'nested':>6s} {'offset':>6s} "
           f"{'maps':>4s} {'disk':>5s} {'deq':>4s} {'deqf32':>6s} {'deq!=ref':>8s} {'relerr':>8s}")
    print(hdr)
    quant_keys, deq_ref = set(), {}
    n_exact = 0
    for name, mod in layers:
        pre = name + ".weight"
        js_keys = [k for k in qdir.keys() if k.startswith(pre + ".quant_state.bitsandbytes__")]
        disk_keys = {k for k in qdir.keys() if k == pre or k.startswith(pre + ".")}
        quant_keys |= disk_keys
        if len(js_keys) != 1:
            fails.append(f"{name}: {len(js_keys)} quant_state JSON tensors")
            print(f"{name:44s} no quant_state JSON on disk: {sorted(disk_keys)}")
            continue
        js_text = bytes(qdir.get(js_keys[0]).tolist())
        js = json.loads(js_text)
        dt = DTYPES[args.dtype] if args.dtype else getattr(torch, js["dtype"])
        W = odir.get(pre)
        if list(W.shape) != js["shape"] and list(W.shape[::-1]) == js["shape"]:
            W = W.T  # Conv1D-style checkpoint (gpt2): transformers transposes before quantizing
        W = W.to(dt).contiguous()
        packed, st = F.quantize_4bit(W, blocksize=js["blocksize"], compress_statistics=nested, quant_type=quant_type)

        lp, lq = mod.weight.data, mod.weight.quant_state
        row = {}
        row["packed"] = mismatches(lp.reshape(-1), packed.reshape(-1)) + (0 if lp.shape == packed.shape else 1)
        row["absmax"] = mismatches(lq.absmax, st.absmax)
        if st.nested or lq.nested:
            ok = st.nested and lq.nested
            row["nested"] = mismatches(lq.state2.absmax, st.state2.absmax) if ok else 1
            row["offset"] = mismatches(lq.offset.reshape(1).float(), st.offset.reshape(1).float()) if ok else 1
            maps = mismatches(lq.state2.code, st.state2.code) if ok else 1
        else:
            row["nested"] = row["offset"] = "-"
            maps = 0
        row["maps"] = maps + mismatches(lq.code, st.code) + (lq.quant_type != st.quant_type) + \
            (lq.blocksize != st.blocksize) + (lq.dtype != st.dtype) + (tuple(lq.shape) != tuple(st.shape))

        # on-disk tensors vs what bitsandbytes' own serializer gives for the independent state
        expect = {pre: packed, **{f"{pre}.{k}": v for k, v in st.as_dict(packed=True).items()}}
        disk_bad = []
        if set(expect) != disk_keys:
            disk_bad.append(f"keys: missing {sorted(set(expect) - disk_keys)} extra {sorted(disk_keys - set(expect))}")
        for k in sorted(set(expect) & disk_keys):
            got = qdir.get(k)
            if ".quant_state." in k:
                exp_text = bytes(expect[k].tolist())
                if got.dtype != torch.uint8 or got.dim() != 1:
                    disk_bad.append(f"{k}: {got.dtype} {list(got.shape)}")
                elif exp_text != js_text:
                    if not args.allow_json_text_diff or not same_values(json.loads(exp_text), js):
                        disk_bad.append(f"{k}: JSON {js_text!r} != expected {exp_text!r}")
            elif mismatches(got, expect[k]):
                disk_bad.append(f"{k}: {got.dtype} {list(got.shape)} vs expected {expect[k].dtype} "
                                f"{list(expect[k].shape)}, {mismatches(got, expect[k])} elements differ")
        row["disk"] = len(disk_bad)

        d_loaded, d_ind = F.dequantize_4bit(lp, lq).float(), F.dequantize_4bit(packed, st).float()
        row["deq"] = mismatches(d_loaded, d_ind)
        r_loaded, r_ind = ref_dequant(lp, lq), ref_dequant(packed, st)
        row["deqf32"] = mismatches(r_loaded, r_ind)
        native_vs_ref = mismatches(F.dequantize_4bit(packed, st).float(), r_ind.to(st.dtype).float())
        deq_ref[name] = r_loaded
        bad = {k: v for k, v in row.items() if v not in (0, "-")}
        if bad or disk_bad:
            fails.append(f"{name}: {bad}" + (f" {disk_bad}" if disk_bad else ""))
            for m in disk_bad:
                print("   disk:", m)
        else:
            n_exact += 1
        shape = "x".join(map(str, js["shape"]))
        print(f"{name:44s} {shape:>12s} {str(dt)[6:]:>8s} {row['packed']:>7} {row['absmax']:>6} {row['nested']:>6} "
              f"{row['offset']:>6} {row['maps']:>4} {row['disk']:>5} {row['deq']:>4} {row['deqf32']:>6} "
              f"{'bnb-bug' if native_vs_ref else 'same':>8s} {rel(r_ind, W.float()):8.5f}")

    # every other tensor: the original cast to the saved dtype
    other_bad = []
    for k in sorted(set(qdir.keys()) - quant_keys):
        if k not in odir:
            other_bad.append(f"{k}: not in ORIG_DIR")
            continue
        got = qdir.get(k)
        exp = odir.get(k).to(got.dtype)
        if mismatches(got, exp):
            other_bad.append(f"{k}: {got.dtype} {list(got.shape)}, {mismatches(got, exp)} elements differ from the original cast")
    missing = sorted(k for k in set(odir.keys()) - set(qdir.keys())
                     if k[:-len(".weight")] not in dict(layers) and not (k == "lm_head.weight" and cfg.get("tie_word_embeddings")))
    other_bad += [f"{k}: missing from QUANT_DIR" for k in missing]
    cfg_dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    saved = {str(qdir.get(k).dtype)[6:] for k in set(qdir.keys()) - quant_keys}
    recorded = {json.loads(bytes(qdir.get(k).tolist()))["dtype"] for k in quant_keys if ".quant_state." in k}
    if saved | recorded != {cfg_dtype}:
        other_bad.append(f"config.json dtype {cfg_dtype}, unquantized tensors {sorted(saved)}, "
                         f"quant_state dtype {sorted(recorded)}: transformers writes one dtype everywhere")
    n_other = len(set(qdir.keys()) - quant_keys)
    print(f"unquantized tensors: {n_other} ({', '.join(sorted(saved))}), {len(other_bad)} problems")
    for m in other_bad:
        print("   ", m)
    if other_bad:
        fails.append(f"{len(other_bad)} problems with unquantized tensors or dtypes: " + "; ".join(other_bad[:3]))

    # 4. forward pass (informative, except for non-finite logits)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[int(t) % vocab for t in args.tokens.split(",")]])
    switched = []
    for name, mod in layers:
        s = mod.weight.quant_state.shape
        if getattr(mod, "support_avx512bf16_for_cpu", False) and (s[1] % mod.weight.quant_state.blocksize or s[0] % 32):
            mod.support_avx512bf16_for_cpu = False
            switched.append(name)
    if switched:
        print(f"AVX512-BF16 weight repacking switched off for {len(switched)} layers (in_features % blocksize != 0)")
    with torch.no_grad():
        lq = model(ids).logits.float()
        orig = AutoModelForCausalLM.from_pretrained(args.orig_dir, dtype=torch.float32, device_map="cpu").eval()
        lo = orig(ids).logits.float()
        mods = dict(orig.named_modules())
        for name, w in deq_ref.items():
            mods[name].weight.data.copy_(w)
        lr = orig(ids).logits.float()
    if not torch.isfinite(lq).all():
        fails.append("non-finite logits")
    print(f"tokens {ids[0].tolist()}; last-position logits[:6]:")
    print("   quantized (bnb)      ", [round(x, 4) for x in lq[0, -1, :6].tolist()])
    print("   original f32         ", [round(x, 4) for x in lo[0, -1, :6].tolist()])
    print("   f32 exact-dequant    ", [round(x, 4) for x in lr[0, -1, :6].tolist()])
    print(f"relative difference: quantized vs original {rel(lq, lo):.5f}; exact-dequant vs original {rel(lr, lo):.5f}; "
          f"quantized vs exact-dequant {rel(lq, lr):.5f}; argmax agreement with original "
          f"{float((lq.argmax(-1) == lo.argmax(-1)).float().mean()):.3f}")

    if fails:
        print(f"FAIL: {len(fails)} problems; " + "; ".join(fails[:10]))
        sys.exit(1)
    print(f"OK: {n_exact} layers bit-exact")


if __name__ == "__main__":
    main()
