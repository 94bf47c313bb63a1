#!/usr/bin/env bash
# Mistral 7B v0.3, multi-task LoRA, data parallel.
# Usage: scripts/mistral_7b_lora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/mistral_7b_lora.yaml)
CONFIG=configs/train/mistral_7b_lora.yaml
PRESET=configs/accelerate/ddp.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
