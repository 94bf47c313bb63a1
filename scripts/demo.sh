#!/usr/bin/env bash
# The embedded demo end to end: multi-task LoRA fine-tuning of a tiny Llama on three code tasks,
# then the adapter merged into its base, then the merged model loaded and asked for a completion.
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
python - "$out/merged" <<'PY'
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
messages = [{"role": "user", "content": "Write a Python function `double(x)` that returns x times 2."}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**prompt, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print("--- the merged demo model answers (greedy):")
print(tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
PY
echo "demo done: adapter in $out/final, merged model in $out/merged, metrics in $out/logs (tensorboard --logdir $out/logs)"
