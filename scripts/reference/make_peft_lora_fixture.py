"""A PEFT LoRA adapter on the tiny llama and what PEFT computes with it for one training batch: loss,
logits, layer 0's q_proj LoRA input and contribution, and the gradient of every LoRA parameter.
Run from the repository root (after make_tiny_models.py):

    python scripts/reference/make_peft_lora_fixture.py

Writes tests/fixtures/peft-lora/adapter/ (PEFT's own save_pretrained: adapter_config.json and
adapter_model.safetensors) and tests/fixtures/peft-lora/expected.safetensors.

The batch: 2 rows of 12 tokens, row 1 right-padded by 3 (pad id 0, mask 0). labels are input_ids with
-100 at the padded positions and at the first 4 positions of row 0 (a response-only mask). The loss is
transformers' causal LM loss: labels shifted left by one, mean cross-entropy over the kept targets.
No position_ids are passed, so transformers uses positions 0..11 for both rows (with right padding
these equal mask.cumsum(-1) - 1 on the real tokens); the script checks this by comparing against an
explicit arange. Eval mode and lora_dropout 0: no dropout anywhere, so the numbers are deterministic.
"""
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

BASE = "tests/fixtures/tiny-llama"
OUT = "tests/fixtures/peft-lora"
SEQ = 12
PAD = 3  # right padding of the second row
PROMPT = 4  # masked-out prompt tokens at the start of row 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_key(name):
    # Parameter names carry the adapter name ("lora_A.default.weight"); save_pretrained drops it.
    return name.replace(".default.", ".")


def main():
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    vocab = model.config.vocab_size
    torch.manual_seed(0)  # PEFT draws lora_A (kaiming uniform) from the global generator
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                        task_type="CAUSAL_LM", init_lora_weights=True)
    model = get_peft_model(model, config).eval()
    # PEFT initialises lora_B to zero, which would make the LoRA output and the lora_A gradients zero.
    g = torch.Generator().manual_seed(1)
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for n, p in lora:
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    adapter_dir = os.path.join(OUT, "adapter")
    model.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))  # an empty model-card template; nothing reads it
    # PEFT keeps target_modules as a set, so its saved order changes with the hash seed; sort it so
    # reruns give the same bytes.
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved["target_modules"] = sorted(saved["target_modules"])
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {saved_key(n) for n, _ in lora}, sorted(keys)[:4]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    ids[1, SEQ - PAD:] = 0
    mask[1, SEQ - PAD:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :PROMPT] = -100

    # The LoRA layer's output is base_layer(x) + scale * B(A(x)); keep its input and the LoRA part.
    captured = {}
    q = model.base_model.model.model.layers[0].self_attn.q_proj

    def hook(module, inputs, output):
        x = inputs[0]
        with torch.no_grad():
            captured["layer0_q_input"] = x.detach().clone()
            captured["layer0_q_lora_delta"] = (output - module.base_layer(x)).detach().clone()

    handle = q.register_forward_hook(hook)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    handle.remove()
    out.loss.backward()

    # Positions transformers used are 0..11 for both rows: an explicit arange gives the same logits.
    with torch.no_grad():
        explicit = model(input_ids=ids, attention_mask=mask,
                         position_ids=torch.arange(SEQ).expand(2, SEQ)).logits
    assert torch.equal(explicit, out.logits)

    tensors = {"input_ids": ids.int(), "attention_mask": mask.int(), "labels": labels.int(),
               "loss": out.loss.detach().reshape(1).float(), "logits": out.logits.detach().float(),
               **captured}
    for n, p in lora:
        tensors[saved_key(n) + ".grad"] = p.grad.float()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = os.path.join(OUT, "expected.safetensors")
    save_file(tensors, path)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"loss {out.loss.item():.6f}, {len(tensors)} tensors in {path}, {len(lora)} LoRA parameters, "
          f"fixture total {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
