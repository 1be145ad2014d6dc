#!/usr/bin/env bash
# Issue 22's GPU runs on Qwen2.5-Coder-1.5B-Instruct, on the device machine once `scripts/gpu/stage.sh receive` has
# joined the model and the datasets tar in /tmp/stage/files (see docs/NEXT.md "Session 12"); carry .devbin
# (qpeft.xz from `scripts/gpu/test.sh build`, then `xz -9 .devbin/qpeft`).
#   scripts/gpu/qwen_baselines.sh eval TASKS [SECONDS]   qpeft eval (device $DEVICE, default cuda:f32) into
#                                                        /tmp/reports/qwen-eval.json; stopped by SIGINT after
#                                                        SECONDS (default 500), the same command resumes it
#   scripts/gpu/qwen_baselines.sh dates                  the quickstart's dates task trained on the GPU
# Reports are copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
files=/tmp/stage/files
model=$files/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
[ -f "$model" ] || { echo "no $model: run scripts/gpu/stage.sh receive first" >&2; exit 1; }
[ -x /tmp/qpeft ] || { xz -dc .devbin/qpeft.xz > /tmp/qpeft.tmp && chmod +x /tmp/qpeft.tmp && mv /tmp/qpeft.tmp /tmp/qpeft; }
[ -d /tmp/data/datasets ] || { mkdir -p /tmp/data && tar -C /tmp/data -xJf "$files/datasets.tar.xz"; }
out=${OUT:-/tmp/out}
mkdir -p /tmp/reports "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-}" in
  eval)
    rc=0
    /usr/bin/time -v timeout -s INT "${3:-500}" /tmp/qpeft --device "${DEVICE:-cuda:f32}" eval "$model" --tasks "$2" \
      --data-dir /tmp/data/datasets --json /tmp/reports/qwen-eval.json 2> /tmp/reports/eval.err || rc=$?
    grep -E "Maximum resident|Elapsed" /tmp/reports/eval.err || true
    tail -5 /tmp/reports/eval.err
    cp /tmp/reports/qwen-eval.json "$out/" 2>/dev/null || true
    echo "eval exit $rc"
    ;;
  dates)
    /tmp/qpeft --device "${DEVICE:-cuda}" train --config configs/quickstart.toml --overwrite \
      --set "model.path=$model" --set train.out_dir=/tmp/qwen-dates "${@:2}" 2>&1 | tee "$out/dates.log" | tail -40
    cp /tmp/qwen-dates/metrics.jsonl "$out/dates-metrics.jsonl"
    cp /tmp/qwen-dates/config.toml "$out/dates-config.toml"
    ;;
  *) echo "usage: scripts/gpu/qwen_baselines.sh eval TASKS [SECONDS] | dates [qpeft train args]" >&2; exit 2 ;;
esac
