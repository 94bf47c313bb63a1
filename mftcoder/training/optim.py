"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) and the learning-rate schedule, both defined in
optimizer steps."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from mftcoder.config.schema import TrainConfig


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb  # only when asked for: it loads native libraries

    # Paged: the optimizer state lives in memory CUDA can page out to the CPU under pressure; without
    # CUDA bitsandbytes falls back to the plain 8-bit optimizer (with a warning).
    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed.

    The rank is read from `ds_shape` when present: under ZeRO-3 every parameter is a flat 1-D shard.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    # No empty group: DeepSpeed drops them, and the scheduler would then count groups that are gone.
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, config.weight_decay), (no_decay, 0.0))
        if params
    ]
    return _optimizer_class(config.optimizer)(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )


def warmup_steps(num_warmup_steps: float, total_steps: int) -> tuple[int, str]:
    """Warm-up in steps (a fraction < 1 is of the run), clipped to the run with a warning."""
    steps = round(num_warmup_steps * total_steps) if num_warmup_steps < 1 else int(num_warmup_steps)
    if steps > total_steps:
        return total_steps, f"num_warmup_steps {steps} is longer than the run ({total_steps} steps); clipped"
    return steps, ""


def lr_at(step: int, *, peak: float, min_lr: float, warmup: int, total: int, kind: str) -> float:
    """Learning rate of the update made at optimizer step `step` (0-based).

    Linear warm-up from peak/warmup to peak over `warmup` updates, then a decay from peak towards the
    `min_lr` floor over the remaining updates (cosine, linear) or none (constant).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    # Past `total` (a resumed run made longer) the rate stays at the schedule's end.
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_lr + (peak - min_lr) * max(0.0, shape)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int, warmup: int) -> LambdaLR:
    peak = config.learning_rate

    def factor(step: int) -> float:
        if peak == 0:
            return 0.0
        rate = lr_at(
            step, peak=peak, min_lr=config.min_lr, warmup=warmup, total=total_steps, kind=config.lr_scheduler_type
        )
        return rate / peak

    return LambdaLR(optimizer, factor)
