"""The transformers + PEFT (+ bitsandbytes NF4) peer for full QLoRA training steps on CPU: forward with
labels, backward, clip_grad_norm_ and an AdamW step, of an HF llama directory (models/smollm2-hf, made
by scripts/test.sh) with LoRA r 64, alpha 16, dropout 0 on all seven linears. Random seeded token ids
(torch.Generator seed 0), labels = input_ids, attention mask all ones. The settings match qpeft's
trainer so the two can be put side by side. Run from the repository root:

    python scripts/bench/peft_train.py MODEL_DIR [--batch 4] [--seq 256] [--steps 10] [--warmup 2] \
        [--threads 2] [--rank 64] [--alpha 16] [--quant nf4|none] [--dtype fp32|bf16] \
        [--checkpointing] [--optim adamw32] [--max-grad-norm 0.3] [--json]

--quant nf4: BitsAndBytesConfig(load_in_4bit, nf4, double quantization, compute dtype per --dtype),
then peft.prepare_model_for_kbit_training (gradient checkpointing per --checkpointing, non-reentrant).
If loading or the first training step fails with bitsandbytes on this machine, the script says so,
prints the error, and reruns itself in a fresh process with --quant none (so the peak RSS is not
polluted by the failed attempt); the JSON then has "quant": "none" and "fallback_from_nf4" set.
--quant none: float32 base weights, frozen; the same LoRA, optimizer and step.

--dtype fp32: compute in float32. --dtype bf16: forward under torch.autocast("cpu", bfloat16),
backward outside it (what HF Trainer's --bf16 does on CPU); with nf4 also bnb_4bit_compute_dtype
bfloat16. --checkpointing: non-reentrant gradient checkpointing on every decoder layer.

Each step: zero_grad(set_to_none), forward with labels, backward, clip_grad_norm_(trainable, 0.3),
torch.optim.AdamW(lr 2e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0, fused=False).step(),
timed with time.perf_counter after --warmup untimed steps. Reports the median tokens/s
(batch*seq/step time), the mean step time, the final loss, the process's peak RSS (ru_maxrss) and its
VmRSS right after the imports and right after the model is loaded. Prints a one-line summary, and with --json one JSON line after it.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FALLBACK_ENV = "QPEFT_BENCH_NF4_FALLBACK"  # carries the nf4 error into the --quant none rerun


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def vm_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def load_model(args):
    """Load the base model per --quant, set up checkpointing and LoRA. Returns (model, rss after load)."""
    compute_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.quant == "nf4":
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=bnb,
                                                     dtype=torch.float32, device_map="cpu")
        rss_loaded = vm_rss_mib()
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        rss_loaded = vm_rss_mib()
        if args.checkpointing:
            # Same as prepare_model_for_kbit_training does for nf4: non-reentrant, so no
            # enable_input_require_grads needed.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)  # lora_A init
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)  # freezes everything but the adapters
    model.train()  # transformers only checkpoints in training mode; dropout is 0 anyway
    return model, rss_loaded


def run(args):
    model, rss_loaded = load_model(args)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=False)
    rss_ready = vm_rss_mib()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext

    times, grad_norm = [], None
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")

    return model, {
        "trainable_params": trainable, "rss_loaded": rss_loaded, "rss_ready": rss_ready, "times": times,
        "loss": loss.item(), "grad_norm": float(grad_norm),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--optim", choices=["adamw32"], default="adamw32")
    ap.add_argument("--max-grad-norm", type=float, default=0.3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    rss_imports = vm_rss_mib()  # torch + transformers + peft alone, before any model

    try:
        model, r = run(args)
    except Exception as e:  # bitsandbytes 4-bit on CPU may be missing or broken
        if args.quant != "nf4":
            raise
        err = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        print(f"peft_train.py: NF4 (bitsandbytes {_bnb_version()}) failed on CPU: {err}\n"
              f"peft_train.py: falling back to --quant none (fp32 frozen base weights) in a fresh process",
              file=sys.stderr, flush=True)
        argv = sys.argv[1:] + ["--quant", "none"]  # argparse: the last --quant wins
        env = dict(os.environ, **{FALLBACK_ENV: err[:2000]})
        sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, env=env).returncode)

    times = r["times"]
    median = statistics.median(times)
    mean = statistics.fmean(times)
    tok_s = args.batch * args.seq / median
    peak = peak_rss_mib()
    fallback = os.environ.get(FALLBACK_ENV)
    ckpt = "on" if args.checkpointing else "off"
    note = " (nf4 failed, fell back to none)" if fallback else ""
    print(f"transformers+peft quant={args.quant} dtype={args.dtype} batch={args.batch} seq={args.seq} "
          f"ckpt={ckpt}: {tok_s:.1f} tok/s, step {mean:.3f} s, peak RSS {peak:.0f} MiB "
          f"(after load {r['rss_loaded']:.0f} MiB), loss {r['loss']:.4f}{note}", flush=True)
    if args.json:
        print(json.dumps({
            "bench": "peft_train", "model_dir": args.model_dir, "batch": args.batch, "seq": args.seq,
            "threads": torch.get_num_threads(), "quant": args.quant, "fallback_from_nf4": fallback,
            "dtype": args.dtype, "checkpointing": args.checkpointing, "steps": args.steps,
            "warmup": args.warmup, "lora_r": args.rank, "lora_alpha": args.alpha, "optim": args.optim,
            "lr": 2e-4, "max_grad_norm": args.max_grad_norm, "trainable_params": r["trainable_params"],
            "attn_implementation": model.config._attn_implementation,
            "loss": r["loss"], "grad_norm_last": r["grad_norm"],
            "median_step_s": round(median, 4), "mean_step_s": round(mean, 4),
            "step_s": [round(t, 4) for t in times], "tokens_per_s": round(tok_s, 2),
            "rss_mib_after_imports": round(rss_imports, 1), "rss_mib_after_load": round(r["rss_loaded"], 1), "rss_mib_before_train": round(r["rss_ready"], 1),
            "peak_rss_mib": round(peak, 1),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": _bnb_version(),
        }))


def _bnb_version():
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__})"


if __name__ == "__main__":
    main()
