#!/usr/bin/env bash
# The embedded demo end to end: multi-task LoRA fine-tuning of a tiny Llama on three code tasks,
# then the adapter merged into its base, then the merged model asked for a completion (mftcoder generate).
# Uses the active virtual environment, or .venv (create it with ./init_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

out=outputs/demo
mftcoder train configs/train/demo.yaml output_dir="$out" overwrite_output_dir=true
mftcoder merge --adapter "$out/final" --output "$out/merged"
echo "--- the merged demo model answers (greedy):"
echo 'Write a Python function `double(x)` that returns x times 2.' \
  | mftcoder generate --model "$out/merged" --max-new-tokens 48
echo "demo done: adapter in $out/final, merged model in $out/merged, metrics in $out/logs (tensorboard --logdir $out/logs)"
