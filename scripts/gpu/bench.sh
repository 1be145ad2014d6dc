#!/usr/bin/env bash
# On the GPU machine: qpeft and the transformers + peft + bitsandbytes peer on the same shape, one after the other
# in one call, and the ratio; with the Liger-Kernel wheel in .whl too, the second peer (peer_hf.py --liger) after them.
# Carry .devbin (scripts/gpu/test.sh build) and .whl (the bitsandbytes 0.50.2 manylinux_2_24 wheel: pip download
# --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .whl
# bitsandbytes==0.50.2; and pip download --no-deps -d .whl liger-kernel==0.8.5, pure Python on the device's Triton).
#   scripts/gpu/bench.sh ARCH SEQ BATCH [STEPS [PRECISIONS]]
# PRECISIONS: qpeft's CUDA precisions to run, each compared with the same peer runs (default "f16"; the peers compute
# in bf16, so "f16 bf16" adds the like-for-like row).
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${1:-llama-7b} seq=${2:-2048} batch=${3:-1} steps=${4:-3} precisions=${5:-f16}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
[ -x /tmp/qpeft ] || { xz -dc .devbin/qpeft.xz > /tmp/qpeft.tmp && chmod +x /tmp/qpeft.tmp && mv /tmp/qpeft.tmp /tmp/qpeft; }
ours=()
for p in $precisions; do
  ours+=("$(/tmp/qpeft --device "cuda:$p" bench train --config configs/qlora.toml --set adapter.dropout=0.0 --arch "$arch" \
    --seq "$seq" --batch "$batch" --steps "$steps" --json)")
  echo "${ours[-1]}"
done
peer=$(python3 scripts/bench/peer_hf.py --arch "$arch" --seq "$seq" --batch "$batch" --rank 64 --steps "$steps" | tail -1)
echo "$peer"
compare() {
python3 - "$@" <<'PY'
import json, sys
q, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(p["system"])
print("qpeft (%s) %.1f tok/s, peak %.0f MiB allocated (%.0f reserved) | peer %.1f tok/s, peak %.0f MiB allocated (%.0f reserved)"
      " | speed %.2fx, memory %.2fx allocated, %.2fx reserved"
      % (q.get("device", "?"), q["tokens_per_s"], q["peak_allocated_mib"], q["peak_reserved_mib"], p["tokens_per_s"], p["peak_allocated_mib"],
         p["peak_reserved_mib"], q["tokens_per_s"] / p["tokens_per_s"], q["peak_allocated_mib"] / p["peak_allocated_mib"],
         q["peak_reserved_mib"] / p["peak_reserved_mib"]))
PY
}
for o in "${ours[@]}"; do compare "$o" "$peer"; done
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  liger=$(python3 scripts/bench/peer_hf.py --liger --arch "$arch" --seq "$seq" --batch "$batch" --rank 64 --steps "$steps" | tail -1)
  echo "$liger"
  for o in "${ours[@]}"; do compare "$o" "$liger"; done
fi
