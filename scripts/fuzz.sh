#!/usr/bin/env bash
# Fuzzes every input format qpeft reads (crates/qpeft-fuzz; docs/fuzzing.md has the targets and the last full run).
#   scripts/fuzz.sh [TARGET,…|all] [N] [extra qpeft-fuzz options, e.g. --seed 7 --keep fuzz-failures]
# N inputs per target (default 100000: about 15 minutes for all targets on 2 cores). Exit status 1 if an input
# panicked or held more memory than its size justifies; a hang (an input running past --timeout-ms, default 10 s)
# or an allocation above 1 GiB stops the run naming the case. Replay one case: --case I (with the same --seed).
set -euo pipefail
cd "$(dirname "$0")/.."
targets=${1:-all} n=${2:-100000}
shift $(( $# > 2 ? 2 : $# ))
cargo build --release -q -p qpeft-fuzz
# One thread: the allocator's high-water mark is per process, so cases run one at a time.
RAYON_NUM_THREADS=1 exec target/release/qpeft-fuzz "$targets" --inputs "$n" "$@"
