#!/usr/bin/env bash
# StarCoder2 15B, multi-task LoRA, DeepSpeed ZeRO-2.
# Usage: scripts/starcoder2_15b_lora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/starcoder2_15b_lora.yaml)
CONFIG=configs/train/starcoder2_15b_lora.yaml
PRESET=configs/accelerate/deepspeed_zero2.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
