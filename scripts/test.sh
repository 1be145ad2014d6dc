#!/usr/bin/env bash
# The test command: fetches the real models (SmolLM2-135M, and Qwen2.5-Coder-1.5B for its parity tests), builds the reference HF conversion of it (numpy + gguf-py in a
# small venv), checks formatting and the module graph, then runs clippy and every test.
#
# One feature set for everything: the CUDA backend builds without CUDA (cudarc loads it at run time), so the CPU tests
# and the CUDA backend's checks without a GPU (the missing-driver error) share one build. The GPU half runs on the GPU
# machine: scripts/gpu/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "== $* ($(date +%T))"; }
step fetch
# Free disk first: the fetch and the release build need ~6 GB, and a full disk fails far from its cause.
df -h . | tail -n 1
scripts/fetch-smollm2.sh
scripts/fetch-model.sh qwen2.5-coder-1.5b
if [ ! -s models/smollm2-hf/model.safetensors ]; then
  if [ ! -x .venv-ref/bin/python ]; then
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install --quiet --no-cache-dir numpy gguf safetensors
  fi
  .venv-ref/bin/python scripts/reference/gguf_to_hf.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-hf
fi
step format
cargo fmt --all --check
step module graph
python3 scripts/module_graph.py
step kernel launches
python3 scripts/gpu/launch_check.py
step clippy
cargo clippy --release --workspace --all-features --all-targets -- -D warnings
step tests
# QPEFT_POISON: the CPU backend's `uninit` buffers start as NaN, so an op that reads one before writing it fails a test.
QPEFT_POISON=1 cargo test --release --workspace --all-features
step done
