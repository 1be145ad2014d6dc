#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the fused attention kernels, one launch of each of flash_forward, flash_dq and
# flash_dkv on flash_bench.py's case (bf16; default the LLaMA-7B 2048 × 4 shape), with what says where their time goes:
# speed of light, occupancy, the scheduler and warp states, the memory and compute workloads, each stall reason per
# issued instruction and the tensor pipe's share of the cycles. Writes ncu_flash.csv (every metric) and ncu_flash.txt
# (one table: a row per metric, a column per kernel) under $OUT.
#   scripts/gpu/ncu_flash.sh ["CASE"]
set -uo pipefail
cd "$(dirname "$0")/../.."
case=${1:-7B 2048x4}
out=${OUT:-.}
ncu=${NCU:-/usr/local/cuda/bin/ncu}
: > "$out/ncu_flash.csv"
for kernel in forward dq dkv; do
  # One kernel per run: flash_bench launches the forward before the backward kernels, and warms each up first.
  "$ncu" --kernel-name "regex:^flash_${kernel}_" --launch-count 1 --csv --page details \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --metrics 'regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active' \
    python3 scripts/gpu/flash_bench.py --mode bf16 --case "$case" --reps 1 --out /tmp \
    2> "/tmp/ncu_$kernel.err" | grep '^"' >> "$out/ncu_flash.csv" || tail -5 "/tmp/ncu_$kernel.err"
done
python3 - "$out/ncu_flash.csv" > "$out/ncu_flash.txt" <<'PY'
import csv, sys

# ncu --csv --page details: one row per (kernel, section, metric), the header repeated by each run.
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("Kernel Name") not in (None, "Kernel Name")]
kernels = list(dict.fromkeys(r["Kernel Name"].split("(")[0] for r in rows))
table = {}
for r in rows:
    key = (r["Section Name"], r["Metric Name"], r["Metric Unit"])
    table.setdefault(key, {})[r["Kernel Name"].split("(")[0]] = r["Metric Value"]
print("%-96s %s" % ("section / metric (unit)", "  ".join("%18s" % k for k in kernels)))
for (section, metric, unit), values in table.items():
    name = f"{section} / {metric}" + (f" ({unit})" if unit else "")
    print("%-96s %s" % (name[:96], "  ".join("%18s" % values.get(k, "") for k in kernels)))
PY
head -60 "$out/ncu_flash.txt"
