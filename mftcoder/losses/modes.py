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

MODES = ("case1", "case2", "case3", "case4")


# fp32 elements of one chunk of logits in the cross-entropy (64 MiB): the fp32 copy of the logits never
# exists whole, whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 24


class _CrossEntropy(torch.autograd.Function):
    """CE of logit rows [N, V] (any float dtype) against targets [N], in fp32, chunk by chunk.

    Saved for backward: the logits as they are and one log-sum-exp per row; the softmax is recomputed
    per chunk in backward, and the gradient is written over the logits, which nothing needs after this
    backward (a graph node that saved them would fail on their changed version rather than compute with
    them). `F.cross_entropy` on upcast logits would keep an fp32 [N, V] copy and its log-softmax until
    backward, then allocate the gradient beside them."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows].float()
            lse[start : start + rows] = torch.logsumexp(chunk, dim=-1)
            picked[start : start + rows] = chunk.gather(1, targets[start : start + rows, None])[:, 0]
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        # Logits a caller passed in as a leaf are theirs to keep: those get a gradient of their own.
        ctx.overwrite = logits.grad_fn is not None
        return lse - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = logits if ctx.overwrite else torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            out = grad_logits[part]
            # In place, in the gradient's own memory where it is fp32: a fresh [rows, V] tensor per operation
            # would cost more in page faults than the arithmetic does on a CPU.
            if out.dtype == torch.float32:
                probs = torch.sub(logits[part], lse[part, None], out=out)
            else:
                probs = logits[part].float().sub_(lse[part, None])
            probs.exp_().scatter_add_(1, targets[part, None], torch.full_like(probs[:, :1], -1.0))
            probs.mul_(grad[part, None])
            if probs is not out:
                out.copy_(probs)
        return grad_logits, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy in fp32 of logit rows [N, V] against targets [N] (all of them real targets)."""
    return _CrossEntropy.apply(logits, targets, max(1, CHUNK_ELEMENTS // logits.shape[-1]))


def token_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross-entropy in fp32, [B, L]: at the batch's targets, 0 elsewhere. `logits` are either
    the rows of the target positions only ([N, V], in `loss_mask` order) or every position's ([B, L, V])."""
    mask = batch["loss_mask"]
    rows = logits if logits.dim() == 2 else logits[mask]
    ce = cross_entropy(rows, batch["target_ids"])
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, ce)


# Sums over the targets add every position with the off-target ones zeroed, rather than select the
# targets by the mask: a selection's size is data-dependent, and a GPU would stop to tell the host.


def _sample_token_counts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets per sample, task of each sample), indexed by `sample_ids`."""
    mask = batch["loss_mask"].flatten()
    ids = batch["sample_ids"].flatten().clamp(min=0)  # padding (-1) adds nothing below
    size = ids.numel()
    counts = torch.zeros(size, dtype=torch.float32, device=mask.device).index_add_(0, ids, mask.float())
    # A sample's targets all carry its task: the largest of its masked task ids (off-target positions count 0).
    tasks = torch.zeros(size, dtype=torch.long, device=mask.device).scatter_reduce_(
        0, ids, batch["task_ids"].flatten() * mask, reduce="amax"
    )
    return counts, tasks


def batch_counts(batch: dict[str, torch.Tensor], num_tasks: int) -> torch.Tensor:
    """[2, T]: targets per task, and samples with at least one target per task, in one micro-batch."""
    tokens = task_sums(torch.ones_like(batch["loss_mask"], dtype=torch.float32), batch, num_tasks)
    per_sample, sample_task = _sample_token_counts(batch)
    samples = torch.zeros(num_tasks, dtype=torch.float32, device=per_sample.device).index_add_(
        0, sample_task, (per_sample > 0).float()
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
    """Sum of `values` over the target tokens of each task, [T] (what `values` hold elsewhere, even NaN, is
    left out)."""
    masked = torch.where(batch["loss_mask"], values.float(), 0.0)
    return torch.zeros(num_tasks, dtype=torch.float32, device=values.device).index_add_(
        0, batch["task_ids"].flatten(), masked.flatten()
    )
