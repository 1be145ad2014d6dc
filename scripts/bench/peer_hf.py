#!/usr/bin/env python3
"""GPU peer of `qpeft bench train`: transformers + peft + bitsandbytes QLoRA training steps on a random-init
built-in shape, the way HF Trainer runs them (train mode, gradient checkpointing, SDPA, AdamW, clip 0.3).

    peer_hf.py --arch llama-7b --seq 2048 --batch 1 --rank 64 [--alpha 16] [--steps 5] [--warmup 1]
               [--no-checkpointing] [--batches FILE --collator padded|flatten] [--liger]

Base: every block linear bitsandbytes NF4 with double quantization, bf16 compute (the QLoRA recipe); embeddings,
norms and head bf16. LoRA on all seven projections. Tokens: seeded random ids, labels = ids. Prints the median
tokens/s of the timed steps and torch's peak allocated memory (max_memory_allocated) over them, as one line of
JSON too. With --batches (a `qpeft bench batches` file: one example per line, {"ids", "labels"}), each step takes the
next --batch examples in turn, collated as HF Trainer would: right-padded (DataCollatorForSeq2Seq-style, labels −100
on padding) or padding-free (transformers' DataCollatorWithFlattening: one row, position ids restarting per
example); tokens/s then counts real tokens over the timed steps' time. With --liger, the second peer: the same HF
recipe with Liger-Kernel's Triton kernels patched in (RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy that
never materialises the logits), as `apply_liger_kernel_to_llama`/`_qwen2` does it for HF Trainer users. On the GPU machine bitsandbytes comes from the carried wheel (see scripts/gpu/bench.sh)."""
import argparse
import json
import statistics
import time

import torch

SHAPES = {  # vocab, hidden, intermediate, layers, heads, kv heads
    "llama-7b": (32000, 4096, 11008, 32, 32, 32),
    "llama-13b": (32000, 5120, 13824, 40, 40, 40),
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3),
    "qwen2.5-1.5b": (151936, 1536, 8960, 28, 12, 2),  # Qwen2: q/k/v biases, rope θ 1e6, untied as in its GGUF
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--batches")
    ap.add_argument("--collator", default="padded", choices=["padded", "flatten"])
    ap.add_argument("--liger", action="store_true")
    args = ap.parse_args()

    import bitsandbytes as bnb
    import peft
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    vocab, hidden, inter, layers, heads, kv = SHAPES[args.arch]
    qwen = args.arch.startswith("qwen")
    Config, Model = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    system = "transformers %s + peft %s + bitsandbytes %s" % (transformers.__version__, peft.__version__, bnb.__version__)
    if args.liger:
        # Patches the modelling classes, so it must come before the model is built.
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2
        patch = apply_liger_kernel_to_qwen2 if qwen else apply_liger_kernel_to_llama
        patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
        from importlib.metadata import version
        system += " + liger-kernel %s" % version("liger-kernel")
    cfg = Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                 tie_word_embeddings=args.arch == "smollm2-135m", attn_implementation="sdpa",
                 **({"rope_theta": 1e6, "rms_norm_eps": 1e-6} if qwen else {}))
    torch.manual_seed(0)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    # Built on the GPU: a 7B random init on the host took ≈ 220 s of a 10-minute device call. The bf16 weights are
    # quantized in place below (Params4bit quantizes on its first move to the GPU) and freed with the old linears.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Model(cfg)
    torch.set_default_dtype(torch.float32)
    # NF4 + double quant for every block linear: Params4bit quantizes when moved to the GPU.
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                setattr(parent, name, q)
    model = model.cuda()
    for p in model.parameters():
        p.requires_grad_(False)
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=PROJ, bias="none",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_s = time.time() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).cuda()
    batches = []
    if args.batches:
        examples = [json.loads(line) for line in open(args.batches) if line.strip()]
        flatten = transformers.DataCollatorWithFlattening(return_position_ids=True)
        for i in range(0, len(examples), args.batch):
            chunk = examples[i:i + args.batch]
            if args.collator == "flatten":
                b = flatten([{"input_ids": e["ids"], "labels": e["labels"]} for e in chunk])
                b = {k: v.cuda() for k, v in b.items() if k in ("input_ids", "labels", "position_ids")}
                real = b["input_ids"].numel()
            else:
                n = max(len(e["ids"]) for e in chunk)
                pad = lambda v, x: v + [x] * (n - len(v))
                b = {"input_ids": torch.tensor([pad(e["ids"], 0) for e in chunk]),
                     "attention_mask": torch.tensor([pad([1] * len(e["ids"]), 0) for e in chunk]),
                     "labels": torch.tensor([pad(e["labels"], -100) for e in chunk])}
                real = int(b["attention_mask"].sum())
                b = {k: v.cuda() for k, v in b.items()}
            batches.append((b, real))
    tokens = []
    times = []
    torch.cuda.synchronize()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t = time.time()
        if batches:
            b, real = batches[i % len(batches)]
            loss = model(**b).loss
        else:
            real = ids.numel()
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.time() - t)
            tokens.append(real)
    step = statistics.median(times)
    rate = sum(tokens) / sum(times) if batches else args.batch * args.seq / step
    r = {"system": "%s, torch %s" % (system, torch.__version__),
         "arch": args.arch, "batch": args.batch, "seq": args.seq, "rank": args.rank, "trainable": trainable,
         "checkpointing": not args.no_checkpointing, "tokens_per_s": rate, "step_s": step,
         "data": args.batches and "%s (%s)" % (args.batches, args.collator),
         "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
         "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20, "loss": loss.item(), "load_s": load_s,
         "gpu": torch.cuda.get_device_name()}
    print("peer%s: %.1f tokens/s, step %.3f s, peak allocated %.0f MiB (reserved %.0f MiB), %d trainable, loss %.4f" % (
        " (liger)" if args.liger else "", r["tokens_per_s"], step, r["peak_allocated_mib"], r["peak_reserved_mib"], trainable, r["loss"]))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
