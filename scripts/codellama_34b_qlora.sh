#!/usr/bin/env bash
# CodeLlama 34B, multi-task QLoRA, DeepSpeed ZeRO-3 (the 4-bit base sharded too).
# Usage: scripts/codellama_34b_qlora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/codellama_34b_qlora.yaml)
CONFIG=configs/train/codellama_34b_qlora.yaml
PRESET=configs/accelerate/deepspeed_zero3.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
