#!/usr/bin/env bash
# Qwen3 8B base, multi-task LoRA, DeepSpeed ZeRO-2.
# Usage: scripts/qwen3_8b_lora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/qwen3_8b_lora.yaml)
CONFIG=configs/train/qwen3_8b_lora.yaml
PRESET=configs/accelerate/deepspeed_zero2.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
