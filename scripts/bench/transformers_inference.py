"""The transformers peer for crates/qpeft/benches/inference.rs: same model file (GGUF, dequantized to
f32), same prompt tokens, same thread count, prefill = one forward of the prompt with the cache,
generation = single-token greedy steps. Medians of 3 runs.

    python scripts/bench/transformers_inference.py [PROMPT_TOKENS GEN_TOKENS THREADS]
"""
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

n_prompt = int(sys.argv[1]) if len(sys.argv) > 1 else 512
n_gen = int(sys.argv[2]) if len(sys.argv) > 2 else 128
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
torch.set_num_threads(threads)
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained("models", gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained("models", gguf_file=gguf, dtype=torch.float32).eval()
ids = tok(open("tests/fixtures/smollm2/alpaca.txt").read(), return_tensors="pt").input_ids[:, :n_prompt]
pp, tg = [], []
with torch.inference_mode():
    for _ in range(3):
        t = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        pp.append(ids.shape[1] / (time.perf_counter() - t))
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(n_gen):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tg.append(n_gen / (time.perf_counter() - t))
print(f"transformers {torch.__version__} threads={threads} prompt={ids.shape[1]} gen={n_gen}: "
      f"prefill {statistics.median(pp):.1f} tok/s, generation {statistics.median(tg):.1f} tok/s")
