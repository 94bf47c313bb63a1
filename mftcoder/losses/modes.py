"""Loss modes as per-token coefficients over one optimizer step.

Every mode is `L = sum over target tokens t of c_t * CE_t`, where the sum runs over all
micro-batches of the step on all ranks and c_t comes from counts of that whole step:

    case1  token average              c_t = 1 / N
    case2  sample-balanced            c_t = 1 / (S * n_s)
    case3  task-balanced (default)    c_t = w_k / (N_k * sum_{j: N_j > 0} w_j)
    case4  sample- and task-balanced  c_t = w_k / (S_k * n_s * sum_{j: S_j > 0} w_j)

with k the task and s the sample of token t, n_s the targets of sample s, N_k / S_k the targets /
samples (with at least one target) of task k in the step, N = sum N_k, S = sum S_k, and w the
static `task_weights`. Because the counts are global, each micro-batch contributes its own share
and gradient accumulation or world size do not change the objective; a task absent from the step
has no tokens and contributes nothing; a zero count never divides (no NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("case1", "case2", "case3", "case4")


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, shape of `targets`."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").view_as(targets)


def _sample_token_counts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets per sample, task of each sample), indexed by `sample_ids`."""
    mask = batch["loss_mask"]
    ids = batch["sample_ids"][mask]
    size = batch["sample_ids"].numel()
    counts = torch.zeros(size, dtype=torch.float32, device=mask.device).index_add_(
        0, ids, torch.ones_like(ids, dtype=torch.float32)
    )
    tasks = torch.zeros(size, dtype=torch.long, device=mask.device).scatter_(0, ids, batch["task_ids"][mask])
    return counts, tasks


def batch_counts(batch: dict[str, torch.Tensor], num_tasks: int) -> torch.Tensor:
    """[2, T]: targets per task, and samples with at least one target per task, in one micro-batch."""
    mask = batch["loss_mask"]
    tokens = torch.zeros(num_tasks, dtype=torch.float32, device=mask.device).index_add_(
        0, batch["task_ids"][mask], torch.ones_like(batch["task_ids"][mask], dtype=torch.float32)
    )
    per_sample, sample_task = _sample_token_counts(batch)
    present = per_sample > 0
    samples = torch.zeros(num_tasks, dtype=torch.float32, device=mask.device).index_add_(
        0, sample_task[present], torch.ones_like(sample_task[present], dtype=torch.float32)
    )
    return torch.stack([tokens, samples])


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / x.clamp(min=1e-30), torch.zeros_like(x))


def token_coefficients(
    mode: str,
    batch: dict[str, torch.Tensor],
    step_counts: torch.Tensor,
    task_weights: torch.Tensor,
) -> torch.Tensor:
    """c_t for each target token of `batch` (0 elsewhere); `step_counts` is [2, T] over the whole step."""
    mask = batch["loss_mask"]
    task_ids = batch["task_ids"]
    tokens, samples = step_counts[0], step_counts[1]
    if mode == "case1":
        coef = _safe_inverse(tokens.sum()).expand_as(task_ids)
    elif mode == "case3":
        weights = task_weights * (tokens > 0)
        per_task = weights * _safe_inverse(tokens) * _safe_inverse(weights.sum())
        coef = per_task[task_ids]
    else:
        per_sample, _ = _sample_token_counts(batch)
        inv_n = _safe_inverse(per_sample)[batch["sample_ids"].clamp(min=0)]
        if mode == "case2":
            coef = inv_n * _safe_inverse(samples.sum())
        elif mode == "case4":
            weights = task_weights * (samples > 0)
            per_task = weights * _safe_inverse(samples) * _safe_inverse(weights.sum())
            coef = per_task[task_ids] * inv_n
        else:
            raise ValueError(f"unknown loss mode {mode!r}; expected one of {MODES}")
    return torch.where(mask, coef, torch.zeros_like(coef, dtype=torch.float32))


def task_sums(values: torch.Tensor, batch: dict[str, torch.Tensor], num_tasks: int) -> torch.Tensor:
    """Sum of `values` over the target tokens of each task, [T]."""
    mask = batch["loss_mask"]
    return torch.zeros(num_tasks, dtype=torch.float32, device=values.device).index_add_(
        0, batch["task_ids"][mask], values[mask].float()
    )
