#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu/test.sh build, carrying .devbin and .devdata): the same tiny QLoRA run and
# the same evaluation on the CPU and on CUDA, compared. .devdata holds copies of ../shared/datasets/{arc_easy,piqa,
# boolq} (make it with: mkdir -p .devdata && cp -r ../shared/datasets/{arc_easy,piqa,boolq} .devdata/).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/qpeft-gpu}
mkdir -p "$out"
cat > "$out/run.toml" <<TOML
[model]
path = "tests/fixtures/gguf/tiny-llama-spm.gguf"
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
steps = 40
batch_size = 8
grad_accum = 1
lr = 2e-3
schedule = "cosine"
checkpoint_every = 0
[eval]
every = 10
max_samples = 32
TOML
for dev in cpu cuda; do
  .devbin/qpeft --device $dev train --config "$out/run.toml" --set train.out_dir=\"$out/run-$dev\" --overwrite | tail -3
  .devbin/qpeft --device $dev eval tests/fixtures/gguf/tiny-llama-spm.gguf --adapter "$out/run-$dev/adapter" \
    --tasks arc_easy,piqa,boolq --limit 100 --data-dir .devdata --json "$out/eval-$dev.json" | tail -4
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
ev = {d: [json.loads(l) for l in open(f"{out}/run-{d}/metrics.jsonl") if "eval_loss" in l] for d in ("cpu", "cuda")}
for a, b in zip(ev["cpu"], ev["cuda"]):
    print("step %3d held-out loss cpu %.6f cuda %.6f" % (a["step"], a["eval_loss"], b["eval_loss"]))
r = {d: json.load(open(f"{out}/eval-{d}.json")) for d in ("cpu", "cuda")}
for task in r["cpu"]:
    a, b = r["cpu"][task]["items"], r["cuda"][task]["items"]
    d = max(abs(x - y) for i, j in zip(a, b) for x, y in zip(i["ll"], j["ll"]))
    same = sum(i["pred"] == j["pred"] for i, j in zip(a, b))
    print("%-10s acc cpu %.4f cuda %.4f, identical predictions %d/%d, max |dLL| %.2e" % (task, r["cpu"][task]["acc"], r["cuda"][task]["acc"], same, len(a), d))
PY
