#!/usr/bin/env bash
# The test command: fetches the real default model, builds the reference HF conversion of it
# (numpy + gguf-py in a small venv), then runs clippy and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
if [ ! -s models/smollm2-hf/model.safetensors ]; then
  if [ ! -x .venv-ref/bin/python ]; then
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install --quiet numpy gguf safetensors
  fi
  .venv-ref/bin/python scripts/reference/gguf_to_hf.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-hf
fi
cargo clippy --release --all-targets -- -D warnings
cargo test --release --workspace
# The CUDA backend builds without CUDA (cudarc loads it at run time); here its tests check the missing-driver
# error. The GPU half runs on the GPU machine: scripts/gpu/test.sh.
cargo clippy --release -p qpeft --features cuda --all-targets -- -D warnings
cargo test --release -p qpeft --features cuda --test cuda_parity
