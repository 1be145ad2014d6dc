#!/usr/bin/env bash
# GPU tests (issue 8), in two halves because the GPU machine has no Rust toolchain:
#   here:              scripts/gpu/test.sh build     -> stripped test binaries in .devbin/ (git-ignored)
#   on the GPU machine: scripts/gpu/test.sh run [FILTER] (carry .devbin and .devmodel; the tests read tests/fixtures through the
#                                                      absolute path they were built at, which `run` links)
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  build)
    mkdir -p .devbin
    exe=$(cargo test --release -p qpeft --features cuda --test cuda_parity --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m["target"]["name"] == "cuda_parity": print(m["executable"])')
    strip -o .devbin/cuda_parity "$exe"
    cargo build --release -p qpeft-cli --features cuda
    strip -o .devbin/qpeft target/release/qpeft
    echo "$(pwd)" > .devbin/built_at
    ls -la .devbin
    ;;
  run)
    built_at=$(cat .devbin/built_at)
    if [ "$built_at" != "$(pwd)" ]; then mkdir -p "$(dirname "$built_at")" && ln -sfn "$(pwd)" "$built_at"; fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    # NCCL for the data-parallel test: PyTorch's nvidia-nccl wheel ships libnccl.so.2, which qpeft loads as libnccl.so.
    eval "$(scripts/gpu/nccl_path.sh)"
    # SmolLM2: by default its first 6 blocks (carry .devmodel, made by scripts/gpu/truncate_gguf.py). The whole
    # 94 MB GGUF exceeds one call's carry; it can be sent in three calls while the machine stays warm (split -n 3 into
    # ignored folders, copy each part to /tmp/smol on the device, cat them there) and named by QPEFT_SMOLLM2.
    # QPEFT_POISON: buffers from `Backend::uninit` start as NaN on both sides, so a kernel that reads one before writing it
    # fails a comparison.
    QPEFT_POISON=${QPEFT_POISON:-1} QPEFT_REQUIRE_GPU=1 QPEFT_SMOLLM2=${QPEFT_SMOLLM2:-$(pwd)/.devmodel/smollm2-6l.gguf} .devbin/cuda_parity --nocapture --test-threads 1 "${@:2}"
    ;;
  *) echo "usage: scripts/gpu/test.sh build|run" >&2; exit 2 ;;
esac
