"""Tiny random models of each supported family, saved by transformers, and the logits transformers
computes for a left-padded batch. Run from the repository root:

    python scripts/reference/make_tiny_models.py
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig,
                          Qwen2Config)

OUT = "tests/fixtures"
SEQ = 12
PAD = 3  # left padding of the second row

COMMON = dict(initializer_range=0.15, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)

FAMILIES = {
    # name: (config, storage dtype, save kwargs)
    "tiny-llama": (LlamaConfig(vocab_size=384, rope_theta=10000.0, tie_word_embeddings=False, **COMMON),
                   torch.float32, {}),
    "tiny-llama3": (LlamaConfig(vocab_size=320, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=64),
                                **COMMON), torch.bfloat16, {}),
    "tiny-mistral": (MistralConfig(vocab_size=320, sliding_window=5, rope_theta=10000.0, **COMMON),
                     torch.float16, {"max_shard_size": "100KB"}),
    "tiny-qwen2": (Qwen2Config(vocab_size=320, rope_theta=1000000.0, tie_word_embeddings=False, **COMMON),
                   torch.bfloat16, {}),
    "tiny-gemma": (GemmaConfig(vocab_size=320, head_dim=32, hidden_activation="gelu_pytorch_tanh",
                               **{**COMMON, "num_key_value_heads": 1}), torch.float32, {}),
}


def main():
    for name, (config, dtype, save_kwargs) in FAMILIES.items():
        torch.manual_seed(0)
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
        # Random norms (transformers initialises them to 1 or 0) so the tests see their effect.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith(".bias"):
                    p.normal_(0.0 if config.model_type == "gemma" or n.endswith(".bias") else 1.0, 0.1)
        model = model.to(dtype)
        path = os.path.join(OUT, name)
        model.save_pretrained(path, safe_serialization=True, **save_kwargs)
        # Reference computation: the stored weights, widened to f32.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, config.vocab_size, (2, SEQ), generator=g)
        mask = torch.ones(2, SEQ, dtype=torch.long)
        ids[1, :PAD] = config.pad_token_id
        mask[1, :PAD] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        save_file({"input_ids": ids.float().contiguous(), "attention_mask": mask.float().contiguous(),
                   "logits": logits.float().contiguous()}, os.path.join(path, "expected.safetensors"))
        print(name, dtype, tuple(logits.shape), float(logits.abs().max()))


if __name__ == "__main__":
    main()
