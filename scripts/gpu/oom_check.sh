#!/usr/bin/env bash
# On the GPU machine (carry .devbin and .devmodel): a step that runs out of device memory stops with the error that
# names the step, the batch shape and what would fit, and leaves the newest checkpoint intact and resumable.
#   scripts/gpu/oom_check.sh [MODEL]
set -uo pipefail
cd "$(dirname "$0")/../.."
model=${1:-.devmodel/smollm2-6l.gguf}
out=${OUT:-/tmp/qpeft-gpu}/oom
rm -rf "$out" && mkdir -p "$out"
cat > "$out/run.toml" <<TOML
[model]
path = "$model"
[adapter]
method = "lora"
rank = 8
[data]
builtin = "dates"
builtin_size = 40000
eval_size = 16
[train]
out_dir = "$out/run"
steps = 4
batch_size = 8
grad_accum = 1
checkpoint_every = 2
checkpointing = false
[eval]
every = 0
max_samples = 16
TOML
q=.devbin/qpeft
$q --device cuda train --config "$out/run.toml" | tail -2 || exit 1
before=$(cd "$out/run/checkpoints" && find . -type f | sort | xargs sha256sum)
# A micro-batch of 32,768 examples without checkpointing: tens of GB of activations per block.
$q --device cuda train --resume "$out/run" --set train.steps=6 --set train.batch_size=32768 2> "$out/oom.err"
echo "exit status $?"; cat "$out/oom.err"
after=$(cd "$out/run/checkpoints" && find . -type f | sort | xargs sha256sum)
[ "$before" = "$after" ] && echo "checkpoints unchanged: $(ls "$out/run/checkpoints" | tr '\n' ' ')" || echo "CHECKPOINTS CHANGED"
$q --device cuda train --resume "$out/run" --set train.steps=6 --set train.batch_size=8 | tail -2
