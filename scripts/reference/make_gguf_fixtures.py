"""GGUF fixtures, made with gguf-py (llama.cpp's own Python package) and checked through transformers.
Run from the repository root after make_tiny_models.py:

    python scripts/reference/make_gguf_fixtures.py

1. tests/fixtures/gguf/quants.gguf: one [2, 256] tensor per ggml type qpeft reads; quants_expected.safetensors
   holds gguf-py's dequantization of each.
2. tests/fixtures/gguf/tiny-llama-spm.gguf: tests/fixtures/tiny-llama written the way llama.cpp's converter
   writes llama models (q/k rows permuted for interleaved rotary, mixed quant types) with a SentencePiece BPE
   tokenizer (byte fallback) trained here on Alpaca text. tiny-llama-spm.expected.safetensors holds the
   logits transformers computes from the GGUF (gguf_file=...); tiny-llama-spm.tokenizer.json holds
   transformers' token ids and decodings of test strings.
"""
import io
import json
import os

import numpy as np
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as T, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = "tests/fixtures/gguf"
ALPACA = "../shared/datasets/alpaca"
rng = np.random.default_rng(0)


def quant_fixture():
    w = GGUFWriter(os.path.join(OUT, "quants.gguf"), arch="llama")
    expected = {}
    x = rng.standard_normal((2, 256)).astype(np.float32)
    for qt in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0]:
        raw = quantize(x, qt)
        w.add_tensor(qt.name, raw, raw_dtype=qt)
        expected[qt.name] = dequantize(raw, qt).astype(np.float32)
    # gguf-py cannot quantize K types: random blocks with sane f16 super-block scales instead.
    for qt, size, scale_offsets in [(T.Q4_K, 144, [0, 2]), (T.Q5_K, 176, [0, 2]), (T.Q6_K, 210, [208])]:
        raw = rng.integers(0, 256, (2, size), dtype=np.uint8)
        for off in scale_offsets:
            raw[:, off:off + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.05, 2)).tobytes(), np.uint8).reshape(2, 2)
        w.add_tensor(qt.name, raw, raw_dtype=qt)
        expected[qt.name] = dequantize(raw, qt).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(expected, os.path.join(OUT, "quants_expected.safetensors"))


def alpaca_text(limit=3000):
    files = sorted(os.listdir(ALPACA))
    path = os.path.join(ALPACA, [f for f in files if f.endswith(".json") or f.endswith(".json.gz")][0])
    if path.endswith(".gz"):
        import gzip
        data = json.load(gzip.open(path, "rt"))
    else:
        data = json.load(open(path))
    return [r["instruction"] + " " + r["output"] for r in data[:limit]]


def train_spm(vocab_size):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(alpaca_text()), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.995,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    return tokens, scores, types


def permute(w, n_head):
    """llama.cpp's converter layout for q/k rows (interleaved rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_gguf():
    src = "tests/fixtures/tiny-llama"
    cfg = json.load(open(os.path.join(src, "config.json")))
    sd = {k: v.float().numpy() for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    tokens, scores, types = train_spm(cfg["vocab_size"])
    name = "tiny-llama-spm.gguf"
    w = GGUFWriter(os.path.join(OUT, name), arch="llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    types_by_module = {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.F16, "attn_output": T.BF16,
                       "ffn_gate": T.Q8_0, "ffn_up": T.Q4_1, "ffn_down": T.F32}
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def put(gname, arr, qt):
        arr = np.ascontiguousarray(arr.astype(np.float32))
        w.add_tensor(gname, arr if qt == T.F32 else quantize(arr, qt), raw_dtype=qt)

    put("token_embd.weight", sd["model.embed_tokens.weight"], T.Q8_0)
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in hf_to_gguf.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                t = permute(t, cfg["num_attention_heads"])
            if g == "attn_k":
                t = permute(t, cfg["num_key_value_heads"])
            put(f"blk.{i}.{g}.weight", t, types_by_module.get(g, T.F32))
    put("output_norm.weight", sd["model.norm.weight"], T.F32)
    put("output.weight", sd["lm_head.weight"], T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model = AutoModelForCausalLM.from_pretrained(OUT, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    exp = load_file(os.path.join(src, "expected.safetensors"))
    ids, mask = exp["input_ids"].long(), exp["attention_mask"].long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    save_file({"input_ids": ids.float().numpy(), "attention_mask": mask.float().numpy(),
               "logits": logits.float().numpy()}, os.path.join(OUT, "tiny-llama-spm.expected.safetensors"))

    tok = AutoTokenizer.from_pretrained(OUT, gguf_file=name)
    texts = ["Hello world", " leading space", "Give three tips for staying healthy.",
             "naïve café — déjà vu 🙂", "numbers 12345 and  double  spaces", "line one\nline two\n\ttab",
             "<s> looks special", "ünïcödé ß 漢字", ""]
    cases = []
    for t in texts:
        ids = tok(t).input_ids
        cases.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    json.dump({"cases": cases, "backend": json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]},
              open(os.path.join(OUT, "tiny-llama-spm.tokenizer.json"), "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    quant_fixture()
    tiny_llama_gguf()
    print("ok")
