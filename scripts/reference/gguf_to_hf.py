"""Converts a llama-architecture GGUF file into an HF safetensors directory (config.json +
model.safetensors, f32), independently of qpeft: gguf-py dequantizes, numpy un-permutes q/k rows
(inverse of llama.cpp's converter permutation). Needs only numpy, gguf and safetensors.

    python scripts/reference/gguf_to_hf.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-hf
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main(src, dst):
    r = GGUFReader(src)
    arch = field(r, "general.architecture")
    assert arch == "llama", f"only llama GGUF files are converted here, not {arch}"
    get = lambda k: field(r, f"llama.{k}")
    heads, kv_heads = get("attention.head_count"), get("attention.head_count_kv")
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        base, param = t.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, i, mod = base.split(".", 2)
            if mod == "attn_q":
                w = unpermute(w, heads)
            if mod == "attn_k":
                w = unpermute(w, kv_heads)
            name = f"model.layers.{i}.{per_layer[mod]}.{param}"
        else:
            name = f"{names[base]}.{param}"
        tensors[name] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "hidden_size": int(get("embedding_length")), "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads), "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base")), "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": tied, "bos_token_id": int(field(r, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(r, "tokenizer.ggml.eos_token_id")), "torch_dtype": "float32",
    }
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {dst}: {len(tensors)} tensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
