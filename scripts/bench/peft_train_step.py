"""The PEFT peer for one LoRA training step on CPU: forward with labels and backward (no optimizer step)
of an HF llama directory (models/smollm2-hf, made by scripts/test.sh) with LoRA r 64, alpha 16,
dropout 0 on all seven linears. Random seeded token ids, labels = input_ids, attention mask all ones.
Prints one JSON line: the settings, median tokens/s over --steps timed steps after --warmup, and peak
RSS. Run from the repository root:

    python scripts/bench/peft_train_step.py MODEL_DIR --batch B --seq S --threads T --dtype fp32|bf16 \
        [--checkpointing] [--steps N] [--warmup W]

fp32: weights and compute in float32. bf16: weights in float32, forward under
torch.autocast("cpu", dtype=torch.bfloat16), backward outside it (what HF Trainer's --bf16 does on
CPU). --checkpointing: non-reentrant gradient checkpointing plus enable_input_require_grads, as PEFT
users set it up.
"""
import argparse
import json
import resource
import statistics
import time
from contextlib import nullcontext

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The embeddings are frozen, so without this the checkpointed blocks would see inputs that
        # need no grad.
        model.enable_input_require_grads()
    torch.manual_seed(0)  # lora_A init
    config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()  # transformers only checkpoints in training mode; dropout is 0 anyway
    rss_loaded = peak_rss_mib()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext

    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)

    median = statistics.median(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "bench": "peft_train_step", "model_dir": args.model_dir, "batch": args.batch, "seq": args.seq,
        "threads": torch.get_num_threads(), "dtype": args.dtype, "checkpointing": args.checkpointing,
        "steps": args.steps, "warmup": args.warmup, "lora_r": 64, "lora_alpha": 16,
        "trainable_params": trainable, "attn_implementation": model.config._attn_implementation,
        "loss": loss.item(), "median_step_s": round(median, 4), "step_s": [round(t, 4) for t in times],
        "tokens_per_s": round(args.batch * args.seq / median, 2),
        "peak_rss_mib_after_load": round(rss_loaded, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
