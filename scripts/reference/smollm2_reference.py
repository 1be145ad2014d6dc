"""Reference behaviour of SmolLM2-135M-Instruct as transformers runs it from the GGUF file
(gguf_file=..., dequantized to f32). Run from the repository root after scripts/fetch-smollm2.sh:

    python scripts/reference/smollm2_reference.py

Writes tests/fixtures/smollm2/: the texts scored for perplexity (*.txt) and reference.json with
transformers' chat renderings, prompt token ids, greedy generations and per-text tokenization and mean NLL.
"""
import gzip
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = "tests/fixtures/smollm2"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for staying healthy.",
    "Explain what a neural network is in one sentence.",
    "What is 12 plus 7?",
]
MAX_NEW = 48


def texts():
    alpaca = json.load(gzip.open("../shared/datasets/alpaca/alpaca_data.json.gz", "rt"))
    with open("../shared/datasets/oasst1_guanaco/openassistant_best_replies_eval.jsonl") as f:
        oasst = [json.loads(line)["text"] for line in f]
    english = next(t for t in oasst if t.startswith("### Human: What") or t.startswith("### Human: How"))
    return {
        "alpaca": "\n\n".join(r["output"] for r in alpaca[:12]),
        "oasst": english,
        "prose": ("The quick brown fox jumps over the lazy dog. Language models assign probabilities to "
                  "sequences of tokens; perplexity is the exponential of the mean negative log-likelihood "
                  "of each token given the ones before it. Lower is better, and 1.0 would be perfect.\n"),
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = AutoTokenizer.from_pretrained("models", gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained("models", gguf_file=GGUF, dtype=torch.float32).eval()
    ref = {"generations": [], "perplexity": []}
    for p in PROMPTS:
        chat = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(chat, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        ref["generations"].append({"prompt": p, "chat": chat, "prompt_ids": ids[0].tolist(), "generated_ids": new,
                                   "text": tok.decode(new, skip_special_tokens=True)})
        print(p, "->", repr(tok.decode(new, skip_special_tokens=True)))
    for name, text in texts().items():
        path = os.path.join(OUT, f"{name}.txt")
        with open(path, "w") as f:
            f.write(text)
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
        ref["perplexity"].append({"file": f"{name}.txt", "ids": ids[0].tolist(), "mean_nll": nll,
                                  "perplexity": float(torch.tensor(nll).exp())})
        print(name, ids.shape[1], "tokens, mean NLL", nll)
    json.dump(ref, open(os.path.join(OUT, "reference.json"), "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
