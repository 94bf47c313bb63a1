#!/usr/bin/env bash
# Qwen2.5-Coder 7B, multi-task full fine-tuning, DeepSpeed ZeRO-3.
# Usage: scripts/qwen2.5_coder_7b_full.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/qwen2.5_coder_7b_full.yaml)
CONFIG=configs/train/qwen2.5_coder_7b_full.yaml
PRESET=configs/accelerate/deepspeed_zero3.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
