#!/usr/bin/env bash
# DeepSeek-Coder 6.7B base, multi-task LoRA, DeepSpeed ZeRO-2.
# Usage: scripts/deepseek_coder_6.7b_lora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/deepseek_coder_6.7b_lora.yaml)
CONFIG=configs/train/deepseek_coder_6.7b_lora.yaml
PRESET=configs/accelerate/deepspeed_zero2.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
