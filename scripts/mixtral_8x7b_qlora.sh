#!/usr/bin/env bash
# Mixtral 8x7B, multi-task QLoRA, FSDP2 (GPU only; the fused experts stay 16-bit and are sharded).
# Usage: scripts/mixtral_8x7b_qlora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/mixtral_8x7b_qlora.yaml)
CONFIG=configs/train/mixtral_8x7b_qlora.yaml
PRESET=configs/accelerate/fsdp2.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
