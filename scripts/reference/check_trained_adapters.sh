#!/usr/bin/env bash
# Trains a LoRA and a hierarchical adapter with qpeft on the unquantized SmolLM2 (fp32 HF directory, 8 steps of
# the built-in dates task), then checks that Python PEFT loads each adapter directory and gives the same logits
# as qpeft within 1e-4 relative (scripts/reference/check_peft_adapter.py). Needs the reference venv (transformers,
# peft) in $VENV (default /work/refvenv) and models/smollm2-hf (built by scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-/work/refvenv}
hf=models/smollm2-hf-tok
if [ ! -s $hf/tokenizer.json ]; then
  mkdir -p $hf && cp models/smollm2-hf/* $hf/
  "$VENV/bin/python" -c "from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('models', gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf').save_pretrained('$hf')"
fi
cargo build --release --quiet --bin qpeft
prompt=$'Rewrite the date in ISO 8601 format (YYYY-MM-DD).\nDate: Sunday, March 7, 2021\nISO date: 2021-03-07'
for kind in lora hierarchical; do
  target/release/qpeft train --config scripts/reference/peft-roundtrip/$kind.toml --overwrite
  target/release/qpeft logits $hf --adapter runs/peft-roundtrip-$kind/adapter --prompt "$prompt" -o runs/peft-roundtrip-$kind/logits.safetensors
  "$VENV/bin/python" scripts/reference/check_peft_adapter.py $hf runs/peft-roundtrip-$kind/adapter runs/peft-roundtrip-$kind/logits.safetensors
done
