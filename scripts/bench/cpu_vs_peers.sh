#!/usr/bin/env bash
# Issue 27's CPU comparison in one run, one measurement after the other on an otherwise idle machine: qpeft in f32
# (`cpu:f32`) and in bf16 on AMX tiles or AVX512-BF16 (`cpu:bf16`) against torch + transformers + peft in fp32 and in
# bf16 (the strongest CPU peer: plain LoRA on the dequantized model, bf16 autocast for training, bf16 weights for
# scoring), SmolLM2-135M, on the threads given (default 2):
#   - training steps, batch 4 × 256, LoRA r 64 on all seven linears, with and without checkpointing;
#   - zero-shot scoring of the first 250 ARC-Easy items, batch 8;
#   - MMLU 5-shot on the first 3 questions of each of the 57 subjects, batch 8.
# Run from the repository root:
#   scripts/bench/cpu_vs_peers.sh [THREADS] [all|train|eval]
#                                                (PY: a python with torch, transformers, peft; default /work/refvenv)
# Needs target/release/qpeft (cargo build --release), models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-model.sh
# smollm2-135m) and models/smollm2-hf (the GGUF's weights as an HF directory: scripts/test.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=${1:-2}
part=${2:-all}
py=${PY:-/work/refvenv/bin/python}
qpeft=target/release/qpeft
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
data=${QPEFT_DATA:-../shared/datasets}
for f in "$qpeft" "$gguf" models/smollm2-hf/config.json "$py"; do
  [ -e "$f" ] || { echo "cpu_vs_peers: missing $f (see the comment at the top of this script)" >&2; exit 1; }
done
if [ "$part" != eval ]; then
echo "== training, SmolLM2-135M, batch 4 × 256, LoRA r 64 on all seven linears, $threads threads"
for ckpt in false true; do
  for device in cpu:f32 cpu:bf16; do
    printf 'qpeft %-9s checkpointing %-5s ' "$device" "$ckpt"
    "$qpeft" --device "$device" bench train --config configs/qlora.toml --set adapter.dropout=0.0 \
      --set "train.checkpointing=$ckpt" --arch smollm2-135m --seq 256 --batch 4 --steps 6 --threads "$threads" 2>&1 \
      | grep -oE '^[0-9.]+ tokens/s'
  done
  flag=$([ "$ckpt" = true ] && echo --checkpointing || true)
  for dtype in fp32 bf16; do
    printf 'peer  %-9s checkpointing %-5s ' "$dtype" "$ckpt"
    "$py" scripts/bench/peft_train.py models/smollm2-hf --batch 4 --seq 256 --steps 10 --warmup 2 \
      --threads "$threads" --quant none --dtype "$dtype" $flag 2>/dev/null | grep -oE '[0-9.]+ tok/s' | head -1
  done
done
fi
[ "$part" = train ] && exit 0
# compare TASK N: qpeft in both precisions, then the peer in both, on the first N items (MMLU: per subject).
compare() {
  for device in cpu:f32 cpu:bf16; do
    printf 'qpeft %-9s ' "$device"
    "$qpeft" --threads "$threads" --device "$device" eval "$gguf" --tasks "$1" --limit "$2" --batch 8 \
      --data-dir "$data" 2>/dev/null | awk -v t="$1" '$1 == t { print $NF " s, acc " $4 }'
  done
  for dtype in fp32 bf16; do
    printf 'peer  %-9s ' "$dtype"
    "$py" scripts/bench/eval_peer.py "$gguf" --task "$1" --n "$2" --batch 8 --threads "$threads" --dtype "$dtype" \
      --data-dir "$data" 2>/dev/null | grep -oE '[0-9.]+ s|acc [0-9.]+' | paste -sd' '
  done
}
echo "== zero-shot scoring, first 250 ARC-Easy items, batch 8, $threads threads"
compare arc_easy 250
echo "== MMLU 5-shot, first 3 questions of each subject (171), batch 8, $threads threads"
compare mmlu 3
