#!/usr/bin/env bash
# On the GPU machine: `bench train` of one shape under each checkpointing policy (train.checkpointing), one line each:
# tokens/s, peak memory, and for "auto" the policy it chose. Carry .devbin (scripts/gpu/test.sh build, qpeft.xz).
#   scripts/gpu/policies.sh ARCH SEQ BATCH STEPS POLICY...      e.g. scripts/gpu/policies.sh llama-7b 2048 4 3 full offload auto
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=$1 seq=$2 batch=$3 steps=$4
shift 4
[ -x /tmp/qpeft ] || { xz -dc .devbin/qpeft.xz > /tmp/qpeft.tmp && chmod +x /tmp/qpeft.tmp && mv /tmp/qpeft.tmp /tmp/qpeft; }
for policy in "$@"; do
  /tmp/qpeft --device "${DEVICE:-cuda}" bench train --config configs/qlora.toml --set adapter.dropout=0.0 \
    --set train.checkpointing=$policy --arch "$arch" --seq "$seq" --batch "$batch" --steps "$steps" --json |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%-9s %s %d×%d: %.1f tok/s, step %.3f s, peak %.0f MiB allocated (%.0f reserved), loaded %.0f MiB, estimated activations %.0f MiB, %d trainable" % (sys.argv[1], r["checkpointing"], r["batch"], r["seq"], r["tokens_per_s"], r["step_s"], r["peak_allocated_mib"] or 0, r["peak_reserved_mib"] or 0, r["loaded_allocated_mib"] or 0, r["estimated_activations_mib"], r["trainable"]))' "$policy"
done
