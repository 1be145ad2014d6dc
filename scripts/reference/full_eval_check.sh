#!/usr/bin/env bash
# The whole per-item evaluation comparison with transformers (tests/fixtures/eval/smollm2-reference.json: 40 items
# of each of the seven zero-shot tasks, one question of each of the 57 MMLU subjects). CI runs a slice of it; this
# runs all of it (about 3 minutes on a 2-core CPU). Needs the model (scripts/fetch-smollm2.sh) and ../shared/datasets.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/fetch-smollm2.sh
cargo test --release -p qpeft --test eval_reference -- --ignored --nocapture
