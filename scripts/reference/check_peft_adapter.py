"""Check that an adapter directory written by qpeft loads in Python PEFT and gives qpeft's logits.
Run from the repository root:

    /work/refvenv/bin/python scripts/reference/check_peft_adapter.py MODEL_DIR ADAPTER_DIR LOGITS.safetensors \
        [--tol 1e-4] [--write-reference OUT.safetensors]

MODEL_DIR is an HF model directory (config.json + model.safetensors, f32 or bf16 weights); it is loaded with
transformers in f32, eager attention, eval mode. ADAPTER_DIR is one of:
  (a) a plain PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors), loaded with
      PeftModel.from_pretrained;
  (b) hierarchical adapters (H-QLoRA): subfolders level_0, level_1, ... (contiguous), each a plain PEFT LoRA
      adapter; ADAPTER_DIR/adapter_config.json, if present, is not read. Detected by
      ADAPTER_DIR/level_0/adapter_config.json. level_0 is loaded with PeftModel.from_pretrained, the others
      with load_adapter, and all levels are made active at once with LoraModel.set_adapter([...]) (the
      PeftModel.set_adapter wrapper takes one name only): PEFT's lora.Linear.forward then adds
      lora_B(lora_A(x)) * (lora_alpha / r) of every active adapter to the base output, i.e. the output is the
      base plus the sum of the levels, each with its own scaling.
adapter_config.json may carry an extra top-level "qpeft" object (qpeft's metadata). PEFT 0.21.2 tolerates
unknown keys: PeftConfig.from_peft_type catches the dataclass's "unexpected keyword argument" TypeError, drops
every key that is not a LoraConfig field and warns; the script lists the keys PEFT will drop.

LOGITS.safetensors is what qpeft writes: `input_ids` (int32 [n]) and `logits` (f32 [n, vocab]). The PEFT model
runs on input_ids[None, :] (one row, no attention mask) and its f32 logits are compared with qpeft's.

Checks, each a FAIL (exit 1) when broken:
  1. Every tensor in each adapter_model.safetensors was loaded into the PEFT model and every LoRA parameter of
     that adapter came from the file (round trip through PEFT's own get_peft_model_state_dict: same key set,
     same values after the f32 cast PEFT applies on load). PEFT itself only warns about missing keys and says
     nothing about unused ones.
  2. Every LoRA layer has all the adapter's levels active.
  3. rel = max|peft - qpeft| / max|peft| <= --tol, and all logits are finite.
Printed as well: the number of tokens, max |peft - qpeft|, max |peft|, rel, the fraction of positions whose
argmax agrees (positions that disagree are listed with PEFT's top-2 gap), and how far the adapter moves the
logits from the base model (if that is not well above --tol, the comparison cannot tell the adapter apart from
no adapter, and a WARNING says so).
--write-reference OUT also writes PEFT's logits as {`input_ids`: int32 [n], `logits`: f32 [n, vocab]} (a
fixture to commit), whatever the outcome of the comparison.
"""
import argparse
import json
import os
import re
import sys
import warnings

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def adapter_dirs(adapter_dir):
    """[(adapter_name, path)] for layout (a) or (b)."""
    if os.path.isfile(os.path.join(adapter_dir, "level_0", CONFIG)):
        levels = {}
        for entry in os.listdir(adapter_dir):
            m = re.fullmatch(r"level_(\d+)", entry)
            if m and os.path.isdir(os.path.join(adapter_dir, entry)):
                levels[int(m.group(1))] = entry
        if sorted(levels) != list(range(len(levels))):
            sys.exit(f"FAIL: level folders are not contiguous from level_0: {sorted(levels.values())}")
        for i, name in sorted(levels.items()):
            for f in (CONFIG, WEIGHTS):
                if not os.path.isfile(os.path.join(adapter_dir, name, f)):
                    sys.exit(f"FAIL: {name}/{f} is missing")
        top = os.path.join(adapter_dir, CONFIG)
        print(f"layout: hierarchical, {len(levels)} level{'s' if len(levels) != 1 else ''}"
              + (f" ({CONFIG} at the top level is not read)" if os.path.isfile(top) else ""))
        return [(levels[i], os.path.join(adapter_dir, levels[i])) for i in sorted(levels)]
    for f in (CONFIG, WEIGHTS):
        if not os.path.isfile(os.path.join(adapter_dir, f)):
            sys.exit(f"FAIL: {os.path.join(adapter_dir, f)} is missing (and no level_0/{CONFIG})")
    print("layout: plain PEFT adapter")
    return [("default", adapter_dir)]


def describe_config(name, path):
    with open(os.path.join(path, CONFIG)) as f:
        cfg = json.load(f)
    known = set(LoraConfig.__dataclass_fields__)
    unknown = sorted(k for k in cfg if k not in known)
    print(f"[{name}] peft_type={cfg.get('peft_type')} r={cfg.get('r')} lora_alpha={cfg.get('lora_alpha')} "
          f"use_rslora={cfg.get('use_rslora', False)} use_dora={cfg.get('use_dora', False)} "
          f"targets={sorted(cfg.get('target_modules') or [])}")
    if unknown:
        print(f"[{name}] keys that are not LoraConfig fields (PEFT {peft.__version__} drops them with a warning): "
              f"{unknown}")


def check_round_trip(model, name, path):
    """Problems (strings) between the adapter file and what PEFT holds for that adapter."""
    on_disk = load_file(os.path.join(path, WEIGHTS))
    held = get_peft_model_state_dict(model, adapter_name=name)
    problems = []
    unused = sorted(set(on_disk) - set(held))
    missing = sorted(set(held) - set(on_disk))
    if unused:
        problems.append(f"[{name}] {len(unused)} tensors in the file were not loaded: {unused[:5]}")
    if missing:
        problems.append(f"[{name}] {len(missing)} LoRA parameters are not in the file (left at init): {missing[:5]}")
    for k in sorted(set(on_disk) & set(held)):
        a, b = on_disk[k], held[k].detach().cpu()
        if a.shape != b.shape:
            problems.append(f"[{name}] {k}: file shape {tuple(a.shape)}, model shape {tuple(b.shape)}")
        elif not torch.equal(a.to(b.dtype), b):
            problems.append(f"[{name}] {k}: loaded values differ from the file")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in on_disk.values()})
    print(f"[{name}] {len(on_disk)} tensors in {WEIGHTS} ({', '.join(dtypes)}); "
          f"{len(held)} LoRA parameters in the model; {len(problems)} problems")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("logits", help="qpeft's logits: safetensors with input_ids (int32 [n]) and logits (f32 [n, vocab])")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative error max|diff|/max|peft| (default 1e-4)")
    ap.add_argument("--write-reference", metavar="OUT", help="also write PEFT's logits to OUT.safetensors")
    args = ap.parse_args()
    print(f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")

    with safe_open(args.logits, "pt") as f:
        ids = f.get_tensor("input_ids")
        ref = f.get_tensor("logits")
    if ids.dim() != 1 or ref.dim() != 2 or ref.shape[0] != ids.shape[0]:
        sys.exit(f"FAIL: expected input_ids [n] and logits [n, vocab], got {tuple(ids.shape)} and {tuple(ref.shape)}")
    if ids.dtype != torch.int32 or ref.dtype != torch.float32:
        print(f"note: input_ids is {ids.dtype} and logits {ref.dtype} (expected int32 and float32)")
    ref = ref.float()

    adapters = adapter_dirs(args.adapter_dir)
    for name, path in adapters:
        describe_config(name, path)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    vocab = model.config.vocab_size
    if ref.shape[1] != vocab:
        sys.exit(f"FAIL: qpeft's logits have {ref.shape[1]} columns, the model's vocab is {vocab}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name0, path0 = adapters[0]
        model = PeftModel.from_pretrained(model, path0, adapter_name=name0)
        for name, path in adapters[1:]:
            model.load_adapter(path, adapter_name=name)
        names = [n for n, _ in adapters]
        if len(names) > 1:
            # PeftModel.set_adapter accepts a single name; the LoraModel underneath takes a list and every LoRA
            # layer then sums the outputs of all active adapters.
            model.base_model.set_adapter(names, inference_mode=True)
    for w in caught:
        print(f"PEFT warning: {w.message}")
    model.eval()

    problems = []
    for name, path in adapters:
        problems += check_round_trip(model, name, path)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for n, m in layers:
        have = [a for a in names if a in m.lora_A]
        if not have or any(a not in m.active_adapters for a in have):
            problems.append(f"{n}: adapters {have}, active {m.active_adapters}")
    print(f"{len(layers)} LoRA layers; active adapters: {model.base_model.active_adapters}")

    x = ids.long()[None, :]
    with torch.no_grad():
        out = model(input_ids=x).logits[0].float()
        with model.disable_adapter():
            base = model(input_ids=x).logits[0].float()

    if args.write_reference:
        save_file({"input_ids": ids.to(torch.int32).contiguous(), "logits": out.contiguous()}, args.write_reference)
        print(f"wrote PEFT's logits to {args.write_reference}")

    n = ids.shape[0]
    peak = out.abs().max().item()
    diff = (out - ref).abs().max().item()
    rel = diff / peak if peak > 0 else float("inf")
    effect = (out - base).abs().max().item() / peak if peak > 0 else float("nan")
    agree = out.argmax(-1) == ref.argmax(-1)
    print(f"tokens: {n}")
    print(f"max |peft - qpeft|: {diff:.6g}")
    print(f"max |peft|: {peak:.6g}")
    print(f"relative error: {rel:.6g} (tol {args.tol:g})")
    print(f"argmax agreement: {agree.float().mean().item():.4f} ({int(agree.sum())}/{n} positions)")
    top2 = out.topk(2, dim=-1).values
    for p in (~agree).nonzero().flatten().tolist()[:10]:
        print(f"   position {p}: peft argmax {out[p].argmax().item()}, qpeft argmax {ref[p].argmax().item()}, "
              f"peft top-2 gap {(top2[p, 0] - top2[p, 1]).item():.3g}")
    print(f"adapter effect: max |peft - base| / max |peft| = {effect:.6g}")
    if not effect > 10 * args.tol:
        print("WARNING: the adapter moves the logits by less than 10x --tol; this check cannot tell it from no adapter")

    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        problems.append("non-finite logits")
    if not rel <= args.tol:
        problems.append(f"relative error {rel:.3g} > tol {args.tol:g}")
    if problems:
        print(f"FAIL: {len(problems)} problems; " + "; ".join(problems[:10]))
        sys.exit(1)
    print(f"OK: relative error {rel:.3g} <= {args.tol:g}")


if __name__ == "__main__":
    main()
