#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu/test.sh build, carrying .devbin and .devdata, and .devmodel for SmolLM2): the
# same QLoRA run and the same evaluation on the CPU and on CUDA in both precisions, compared with the CPU.
#   scripts/gpu/cli_check.sh [MODEL] [STEPS]
# MODEL defaults to the tiny llama fixture; .devmodel/smollm2-6l.gguf is SmolLM2-135M-Instruct's first 6 blocks
# (scripts/gpu/truncate_gguf.py). .devdata holds copies of ../shared/datasets/{arc_easy,piqa} (make it with:
# mkdir -p .devdata && cp -r ../shared/datasets/{arc_easy,piqa} .devdata/).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-tests/fixtures/gguf/tiny-llama-spm.gguf} steps=${2:-40}
out=${OUT:-/tmp/qpeft-gpu}/$(basename "$model" .gguf)
mkdir -p "$out"
cat > "$out/run.toml" <<TOML
[model]
path = "$model"
[quant]
format = "nf4"
[adapter]
method = "lora"
rank = 8
alpha = 16
dropout = 0.1
[data]
builtin = "dates"
builtin_size = 400
eval_size = 32
[train]
steps = $steps
batch_size = 8
grad_accum = 1
lr = 2e-3
schedule = "cosine"
checkpoint_every = 0
[eval]
every = 10
max_samples = 32
TOML
devices="cpu cuda:f32 cuda:f16 cuda:bf16"
for dev in $devices; do
  start=$(date +%s%N)
  .devbin/qpeft --device $dev train --config "$out/run.toml" --set train.out_dir=\"$out/run-$dev\" --overwrite | tail -2
  echo "$dev: training took $(( ($(date +%s%N) - start) / 1000000 )) ms"
  .devbin/qpeft --device $dev eval "$model" --adapter "$out/run-$dev/adapter" \
    --tasks arc_easy,piqa --limit 100 --data-dir .devdata --json "$out/eval-$dev.json" | tail -3
done
python3 - "$out" $devices <<'PY'
import json, sys
out, devs = sys.argv[1], sys.argv[2:]
ev = {d: [json.loads(l) for l in open(f"{out}/run-{d}/metrics.jsonl") if "eval_loss" in l] for d in devs}
for rows in zip(*(ev[d] for d in devs)):
    print("step %3d held-out loss " % rows[0]["step"] + "  ".join("%s %.6f" % (d, r["eval_loss"]) for d, r in zip(devs, rows)))
r = {d: json.load(open(f"{out}/eval-{d}.json")) for d in devs}
for d in devs[1:]:
    for task in r["cpu"]:
        a, b = r["cpu"][task]["items"], r[d][task]["items"]
        diff = max(abs(x - y) for i, j in zip(a, b) for x, y in zip(i["ll"], j["ll"]))
        same = sum(i["pred"] == j["pred"] for i, j in zip(a, b))
        print("%-9s %-10s acc cpu %.4f %s %.4f, identical predictions %d/%d, max |dLL| %.2e"
              % (d, task, r["cpu"][task]["acc"], d, r[d][task]["acc"], same, len(a), diff))
PY
