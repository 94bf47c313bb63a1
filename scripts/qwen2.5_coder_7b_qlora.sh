#!/usr/bin/env bash
# Qwen2.5-Coder 7B, multi-task QLoRA (4-bit base), data parallel: fits one GPU per process.
# Usage: scripts/qwen2.5_coder_7b_qlora.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST] [--dry-run] [key=value ...]
# (options: scripts/lib/launch.sh; memory: python scripts/estimate_memory.py configs/train/qwen2.5_coder_7b_qlora.yaml)
CONFIG=configs/train/qwen2.5_coder_7b_qlora.yaml
PRESET=configs/accelerate/ddp.yaml
# shellcheck source=lib/launch.sh
. "$(dirname "$0")/lib/launch.sh"
