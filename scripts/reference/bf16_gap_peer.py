"""How far the peer's bf16 QLoRA gradients are from its own fp32 ones: transformers + PEFT + bitsandbytes NF4
(double quant) on SmolLM2-135M-Instruct, once with bnb_4bit_compute_dtype / torch_dtype bfloat16 (the QLoRA
setting, what scripts/bench/peer_hf.py runs on the GPU) and once in float32, on CPU. LoRA r 8, alpha 16, dropout 0
on all seven linears, every LoRA parameter set to the same seeded values uniform in ±0.02 (the scale of trained
adapters) in both runs, one batch of seeded random tokens (labels = ids). Prints ‖Δ‖₂/‖ref₂‖ of the loss and of
each gradient tensor (median, max) and of all gradients as one vector — the same measures as qpeft's GPU parity
test (crates/qpeft/tests/cuda_parity.rs), for comparison with qpeft's bf16 distance from f32.

    /work/refvenv/bin/python scripts/reference/bf16_gap_peer.py models/smollm2-hf [--batch 2] [--seq 7]
"""
import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def grads(model_dir, dtype, tokens):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for _, p in named:
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.04 - 0.02).to(p.dtype))
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    return out.loss.double().item(), [(n, p.grad.double().flatten()) for n, p in named]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    tokens = torch.randint(3, 49000, (a.batch, a.seq), generator=torch.Generator().manual_seed(77))
    loss32, g32 = grads(a.model_dir, torch.float32, tokens)
    loss16, g16 = grads(a.model_dir, torch.bfloat16, tokens)
    errs = sorted(rel(x, y) for (_, x), (_, y) in zip(g16, g32))
    vec = rel(torch.cat([x for _, x in g16]), torch.cat([y for _, y in g32]))
    print("peer bf16 vs fp32, batch %d x %d: loss %.2e; %d gradients: median %.2e, max %.2e, as one vector %.2e"
          % (a.batch, a.seq, abs(loss16 - loss32) / abs(loss32), len(errs), errs[len(errs) // 2], errs[-1], vec))


if __name__ == "__main__":
    main()
