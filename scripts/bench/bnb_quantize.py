"""The bitsandbytes peer for crates/qpeft/benches/quantize.rs: CPU quantize_4bit (NF4, block 64, double
quantization) over the same q/k/v/o/gate/up/down f32 weights of models/smollm2-hf; median of 5 passes.

    python scripts/bench/bnb_quantize.py [HF_MODEL_DIR THREADS]
"""
import statistics
import sys
import time

import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file

path = sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-hf"
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
weights = [t for k, t in sorted(load_file(f"{path}/model.safetensors").items()) if "_proj.weight" in k]
total = sum(w.numel() for w in weights)
F.quantize_4bit(weights[0], blocksize=64, compress_statistics=True, quant_type="nf4")  # warm-up
times = []
for _ in range(5):
    start = time.perf_counter()
    for w in weights:
        F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    times.append(time.perf_counter() - start)
t = statistics.median(times)
print(f"bitsandbytes NF4+DQ quantize_4bit: {len(weights)} tensors, {total} weights, {t * 1e3:.1f} ms, "
      f"{total / t / 1e6:.1f} M weights/s ({torch.get_num_threads()} threads)")
