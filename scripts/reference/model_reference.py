"""Reference behaviour of a real model as transformers runs it from its GGUF file (gguf_file=..., dequantized to
f32). Run from the repository root after scripts/fetch-model.sh NAME:

    python scripts/reference/model_reference.py smollm2-135m
    python scripts/reference/model_reference.py qwen2.5-coder-1.5b

Writes tests/fixtures/<name>/: the texts scored for perplexity (*.txt) and reference.json with transformers'
tokenization of tricky strings, chat renderings, prompt token ids, greedy generations, per-text tokenization and
mean NLL, and sampled logits of a few prompts (every position: the logits of a fixed random set of token ids, the
largest logit with its id, and the log-sum-exp over the whole vocabulary). Read by crates/qpeft/tests/real_models.rs.
"""
import gzip
import json
import math
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Strings whose tokenization breaks naive BPE ports: digit runs, code indentation, whitespace runs, tabs and
# newlines, accents, CJK, emoji, right-to-left script, and the special tokens written in text.
TRICKY = [
    "1234567890 3.14159 1,000,000 2026-12-06 0x1F",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass",
    "a  b   c    d\n\n\n  e \t f\r\n",
    "naïve café Ångström Straße ﬁ",
    "日本語のテキスト 中文 한국어",
    "emoji 🤗🚀 and ZWJ 👩‍💻 done",
    "שלום עולם مرحبا",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "   leading and trailing   ",
    "don't won't y'all 'quoted' \"double\"",
]

MODELS = {
    "smollm2-135m": {
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "out": "tests/fixtures/smollm2",
        "prompts": [
            "What is the capital of France?",
            "Write a haiku about the sea.",
            "Give three tips for staying healthy.",
            "Explain what a neural network is in one sentence.",
            "What is 12 plus 7?",
        ],
        "max_new": 48,
        "alpaca_outputs": 12,
    },
    "qwen2.5-coder-1.5b": {
        "gguf": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "out": "tests/fixtures/qwen2.5-coder-1.5b",
        "prompts": [
            "Write a Python function that reverses a string.",
            "What is the capital of France?",
            "Explain recursion in one sentence.",
        ],
        "max_new": 32,
        "alpaca_outputs": 3,
    },
}

# Raw (no chat template) prompts whose logits are sampled.
LOGIT_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 5, 8, 13,"]
SAMPLED_IDS = 64

CODE = '''import json


def load(path):
    """Reads a JSON file and returns its records, skipping blank lines."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]
'''


def texts(alpaca_outputs):
    alpaca = json.load(gzip.open("../shared/datasets/alpaca/alpaca_data.json.gz", "rt"))
    with open("../shared/datasets/oasst1_guanaco/openassistant_best_replies_eval.jsonl") as f:
        oasst = [json.loads(line)["text"] for line in f]
    english = next(t for t in oasst if t.startswith("### Human: What") or t.startswith("### Human: How"))
    return {
        "alpaca": "\n\n".join(r["output"] for r in alpaca[:alpaca_outputs]),
        "oasst": english,
        "prose": ("The quick brown fox jumps over the lazy dog. Language models assign probabilities to "
                  "sequences of tokens; perplexity is the exponential of the mean negative log-likelihood "
                  "of each token given the ones before it. Lower is better, and 1.0 would be perfect.\n"),
        "code": CODE,
    }


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in MODELS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(MODELS)}")
    m = MODELS[sys.argv[1]]
    out = m["out"]
    os.makedirs(out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained("models", gguf_file=m["gguf"])
    model = AutoModelForCausalLM.from_pretrained("models", gguf_file=m["gguf"], dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ref = {"tokenization": [], "generations": [], "perplexity": [], "logits": []}
    for s in TRICKY:
        ids = tok(s, add_special_tokens=False).input_ids
        ref["tokenization"].append({"text": s, "ids": ids, "decoded": tok.decode(ids)})
    for p in m["prompts"]:
        chat = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(chat, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=m["max_new"], do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        ref["generations"].append({"prompt": p, "chat": chat, "prompt_ids": ids[0].tolist(), "generated_ids": new,
                                   "max_new_tokens": m["max_new"],
                                   "text": tok.decode(new, skip_special_tokens=True)})
        print(p, "->", repr(tok.decode(new, skip_special_tokens=True)))
    for name, text in texts(m["alpaca_outputs"]).items():
        path = os.path.join(out, f"{name}.txt")
        with open(path, "w") as f:
            f.write(text)
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
        ref["perplexity"].append({"file": f"{name}.txt", "ids": ids[0].tolist(), "mean_nll": nll,
                                  "perplexity": math.exp(nll)})
        print(name, ids.shape[1], "tokens, mean NLL", nll)
    sampled = np.random.RandomState(0).choice(vocab, SAMPLED_IDS, replace=False).tolist()
    for p in LOGIT_PROMPTS:
        ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        ref["logits"].append({
            "prompt": p,
            "ids": ids[0].tolist(),
            "sampled_ids": sampled,
            "sampled": logits[:, sampled].tolist(),
            "max": logits.max(dim=1).values.tolist(),
            "argmax": logits.argmax(dim=1).tolist(),
            "logsumexp": torch.logsumexp(logits, dim=1).tolist(),
        })
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
