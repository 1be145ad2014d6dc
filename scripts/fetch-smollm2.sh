#!/usr/bin/env bash
# Fetches the real default model, SmolLM2-135M-Instruct (GGUF Q4_1, tokenizer in its metadata), into models/.
exec "$(dirname "$0")/fetch-model.sh" smollm2-135m
