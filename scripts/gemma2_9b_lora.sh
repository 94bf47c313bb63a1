#!/usr/bin/env bash
# Gemma 2 9B, multi-task LoRA (eager attention), DeepSpeed ZeRO-2.
# Usage: scripts/gemma2_9b_lora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/gemma2_9b_lora.yaml)
CONFIG=configs/train/gemma2_9b_lora.yaml
PRESET=configs/accelerate/deepspeed_zero2.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
