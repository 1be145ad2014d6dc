#!/usr/bin/env bash
# The quickstart: fetch SmolLM2-135M-Instruct if missing, build qpeft, and fine-tune the model with QLoRA (NF4 +
# double-quant base, LoRA r 16 on all seven linears) on a task qpeft generates itself — rewriting spelled-out
# dates such as "Sunday, March 7, 2021" as ISO 8601 "2021-03-07" — then print held-out exact match before and
# after. A few minutes on a 2-core CPU. Extra arguments go to `qpeft train` (e.g. --set train.steps=60).
#
# The run directory (runs/quickstart) holds config.toml, metrics.jsonl, checkpoints/, the final adapter/ (PEFT
# format) and loss.svg. Try the adapter afterwards:
#   target/release/qpeft generate models/SmolLM2-135M-Instruct.Q4_1.gguf --adapter runs/quickstart/adapter \
#     --prompt $'<|im_start|>Rewrite the date in ISO 8601 format (YYYY-MM-DD).\nDate: 4 July 1976\nISO date: '
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
if [ ! -x target/release/qpeft ]; then
  echo "building qpeft (the first build takes about 5 minutes on 2 cores; later ones seconds)"
fi
if [ -t 2 ]; then
  cargo build --release --bin qpeft
else
  # Without a terminal cargo prints a line per crate, and one crate can take a minute: say it is still working.
  (while sleep 20; do echo "still building ($SECONDS s)"; done) &
  ticker=$!
  trap 'kill $ticker 2>/dev/null || true' EXIT
  cargo build --release --bin qpeft
  kill $ticker
fi
target/release/qpeft train --config configs/quickstart.toml --overwrite "$@"
