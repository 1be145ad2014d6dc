#!/usr/bin/env bash
# Issue 23's real-data benchmark, on the GPU machine: Alpaca micro-batches of 16 examples (the qlora.toml data
# settings; made here with `qpeft bench batches --config configs/qlora.toml --set model.path=MODEL --set
# train.batch_size=16 --set train.grad_accum=1 -o .devdata_alpaca/FILE`, carried in .devdata_alpaca) on a built-in
# shape with random weights: qpeft padded and packed (data.packing), then the transformers + peft + bitsandbytes peer
# padded and with DataCollatorWithFlattening (and the same with Liger-Kernel when its wheel is in .whl), one after the
# other in one call. Carry .devbin, .devdata_alpaca and .whl.
#   scripts/gpu/bench_real.sh [ARCH] [BATCHES] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${1:-qwen2.5-1.5b} file=${2:-.devdata_alpaca/qwen-alpaca.jsonl} steps=${3:-12}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
[ -x /tmp/qpeft ] || { xz -dc .devbin/qpeft.xz > /tmp/qpeft.tmp && chmod +x /tmp/qpeft.tmp && mv /tmp/qpeft.tmp /tmp/qpeft; }
nvidia-smi --query-gpu=name --format=csv,noheader
for packing in false true; do
  /tmp/qpeft --device cuda bench train --config configs/qlora.toml --set adapter.dropout=0.0 --set train.batch_size=16 \
    --set train.grad_accum=1 --set data.packing=$packing --arch "$arch" --batches "$file" --steps "$steps" --warmup 2 \
    | head -2
done
liger=; ls .whl/liger_kernel-*.whl >/dev/null 2>&1 && liger=--liger
for peer in "" $liger; do
  for collator in padded flatten; do
    python3 scripts/bench/peer_hf.py $peer --arch "$arch" --batches "$file" --collator $collator --batch 16 --rank 64 \
      --steps "$steps" --warmup 2 | head -1
  done
done
