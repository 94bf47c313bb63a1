"""The Accelerator, with every launcher setting checked against the config (no silent fallbacks)."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import LaunchError

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
COMPUTE_DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIBRARIES = ("mftcoder", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "deepspeed")


def resolve_mixed_precision(config: TrainConfig, launcher: str | None, cuda: bool) -> str:
    """Accelerate's mixed-precision setting for the config's `dtype`, given the launcher's setting."""
    if config.dtype == "auto":
        if launcher:
            return launcher
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    wanted = MIXED_PRECISION[config.dtype]
    if launcher and launcher != wanted:
        raise LaunchError(
            f"dtype: the config asks for {config.dtype} but the launcher set mixed_precision={launcher}; "
            f"make them agree (set dtype: auto to follow the launcher, or change the accelerate config)"
        )
    if wanted == "fp16" and not cuda:
        raise LaunchError("dtype: fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return wanted


def build_accelerator(config: TrainConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    mixed = resolve_mixed_precision(config, os.environ.get("ACCELERATE_MIXED_PRECISION"), cuda)
    launcher_ga = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_ga and int(launcher_ga) != config.gradient_accumulation_steps:
        raise LaunchError(
            f"gradient_accumulation_steps: the launcher set {launcher_ga} but the config says "
            f"{config.gradient_accumulation_steps}; the train config is the one source, remove it from the launcher"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    process_group = InitProcessGroupKwargs(timeout=timedelta(seconds=config.init_timeout_seconds))
    if not cuda and launched > 1:
        # DeepSpeed would otherwise pick a backend that does not exist on CPU and run unconnected.
        process_group.backend = "gloo"
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not cuda,
        kwargs_handlers=[process_group],
        step_scheduler_with_optimizer=False,
    )
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes but this one sees a world of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); on a machine without GPUs "
            "launch with `accelerate launch --multi_gpu --num_processes N` (mftcoder selects the CPU itself)"
        )
    return accelerator


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def run_info(accelerator: Accelerator, config: TrainConfig) -> dict:
    """What this run really is: recorded in run.json and printed at start."""
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "global_batch_size": config.per_device_train_batch_size
        * config.gradient_accumulation_steps
        * accelerator.num_processes,
        "device": str(accelerator.device),
        "deepspeed": accelerator.distributed_type == DistributedType.DEEPSPEED,
        "start_time": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
    }
