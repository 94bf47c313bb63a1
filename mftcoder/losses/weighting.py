"""The `Balancing` of a config's `weighted_loss_mode`, and what to warn about before a run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from mftcoder.config.schema import TrainConfig
from mftcoder.losses.balancing import Balancing, StaticWeights
from mftcoder.losses.coba import CoBa
from mftcoder.losses.focal import FocalBalancing
from mftcoder.losses.self_paced import SelfPaced


def _static(config: TrainConfig, num_tasks: int, device) -> Balancing:
    return StaticWeights(config.weighted_loss_mode, config.task_weights, num_tasks, device)


def _focal(config: TrainConfig, num_tasks: int, device) -> Balancing:
    weights = torch.tensor(config.task_weights or [1.0] * num_tasks, dtype=torch.float32, device=device)
    return FocalBalancing(config.focal_level, config.focal_gamma, weights)


def _self_paced(config: TrainConfig, num_tasks: int, device) -> Balancing:
    return SelfPaced(
        num_tasks,
        interval=config.selfpaced_interval,
        history_length=config.selfpaced_history_length,
        scale_factor=config.selfpaced_scale_factor,
        sample_count=config.selfpaced_sample_valid_num * config.per_device_eval_batch_size,
        seed=config.seed,
        device=device,
    )


def _coba(config: TrainConfig, num_tasks: int, device) -> Balancing:
    return CoBa(
        num_tasks,
        warmup_steps=config.coba_warmup_steps,
        history_length=config.coba_history_length,
        tau=config.coba_tau,
        update_interval=config.coba_update_interval,
        sample_count=config.coba_sample_valid_num * config.per_device_eval_batch_size,
        seed=config.seed,
        device=device,
    )


# Keyed by the names of `mftcoder.config.loss_modes.LOSS_MODES`.
BALANCINGS: Mapping[str, Callable[[TrainConfig, int, torch.device | None], Balancing]] = MappingProxyType(
    {
        "case1": _static,
        "case2": _static,
        "case3": _static,
        "case4": _static,
        "focal": _focal,
        "self_paced": _self_paced,
        "coba": _coba,
    }
)


def build_balancing(config: TrainConfig, num_tasks: int, device=None) -> Balancing:
    return BALANCINGS[config.weighted_loss_mode](config, num_tasks, device)


def balancing_warnings(config: TrainConfig, total_steps: int) -> list[str]:
    """Settings that make a loss-driven mode do nothing in a run of `total_steps` (allowed, but said).

    Validation samples are taken at step 0 (the full evaluation) and every interval; weights set
    after the last step are never used.
    """
    warnings = []
    mode = config.weighted_loss_mode
    if mode == "coba":
        # The first update at or after the warm-up, and not before the first draw: step 0's full
        # evaluation alone gives no slope.
        interval = config.coba_update_interval
        first = max(-(-config.coba_warmup_steps // interval) * interval, interval)
        if first >= total_steps:
            warnings.append(
                f"coba_warmup_steps {config.coba_warmup_steps}: the first CoBa update comes at step {first}, "
                f"not before the run's {total_steps} steps end; the weights stay uniform (case3)"
            )
    if mode == "self_paced":
        filled = (config.selfpaced_history_length - 1) * config.selfpaced_interval
        if filled >= total_steps:
            warnings.append(
                f"selfpaced_history_length {config.selfpaced_history_length}: with a sample every "
                f"{config.selfpaced_interval} step(s) the history fills at step {filled}, not before the run's "
                f"{total_steps} steps end; the weights stay uniform (case3)"
            )
    return warnings
