"""CoBa balancing (`weighted_loss_mode: coba`): Convergence Balancer, Gong et al., EMNLP 2024 (arXiv 2410.06741).

Every `coba_update_interval` steps the trainer evaluates `coba_sample_valid_num` validation
batches and feeds the per-task losses to `update`. Each task's loss is divided by its initial
validation loss (the first value seen for it: the trainer feeds a full evaluation before step 0),
and the ratio joins a history of the last N = `coba_history_length` samples. From step
`coba_warmup_steps` on, each update computes, with K tasks:

    α_k       slope of task k's loss ratio over the history, fitted on the optimizer steps
    RCS_k     = softmax_k( K α_k / Σ_j |α_j| )                     relative convergence score
    ACS_k     = softmax_k( -n α_k / Σ_s |α_k(s)| )                  absolute convergence score
    α_max     = max_k α_k
    DF        = min( m · softmax_s( -τ m α_max(s) / Σ_s' |α_max(s')| )[latest], 1 )   divergence factor
    ω_k       = DF · RCS_k + (1 - DF) · ACS_k

where the sums over s run over the slopes of the last n (ACS) and m (DF) updates, at most N, and
τ = `coba_tau`. Slopes are recorded from the second validation sample on, warm-up included (the
paper's DF sums from the first slope, not from the end of warm-up), but before warm-up ends the
weights are uniform. A task with fewer than two values in the window has slope 0 and is left out
of α_max. The objective is case3 with ω.

RCS favours tasks whose loss falls slower than the others'; ACS favours tasks still falling
relative to their own recent slopes and starves those that turned upward; DF moves from RCS to
ACS when the worst task's slope rises against its history.

Against MFTCoder's implementation of CoBa: DF is clipped to 1; α_max is the largest per-task
slope (not the slope of the per-step maximum ratio); ω is used as the paper defines it (no extra
softmax, no minimum-weight floor); slopes use the steps as their time axis, with gaps where a task
was missing from a sample; the ACS and DF windows are the last N updates whether or not warm-up
had ended (MFTCoder starts them when it ends, so its first weights are RCS alone); the state starts at any
step (no crash when resuming or when the warm-up is not a multiple of the interval) and is
checkpointed. One deliberate departure from the paper: DF's history is the last N updates rather
than every update since the start, so that memory stays bounded by N.

Weights come from sampled validation losses, all-reduced over ranks, and carry no gradient.
"""

from __future__ import annotations

import math

import torch

from mftcoder.losses.balancing import ValidationBalancing
from mftcoder.losses.history import push, safe_ratio


def relative_convergence(slopes: torch.Tensor) -> torch.Tensor:
    """RCS [K] from the current slopes α [K]."""
    return torch.softmax(safe_ratio(slopes.numel() * slopes, slopes.abs().sum()), dim=-1)


def absolute_convergence(slopes: torch.Tensor, slope_history: torch.Tensor) -> torch.Tensor:
    """ACS [K] from the current slopes α [K] and the recent slopes [K, n] (the current ones included)."""
    n = slope_history.shape[-1]
    return torch.softmax(safe_ratio(-n * slopes, slope_history.abs().sum(-1)), dim=-1)


def divergence_factor(max_slopes: torch.Tensor, tau: float) -> torch.Tensor:
    """DF (a 0-d tensor in [0, 1]) from the recent largest slopes [m], the latest last."""
    m = max_slopes.numel()
    share = torch.softmax(safe_ratio(-tau * m * max_slopes, max_slopes.abs().sum()), dim=-1)[-1]
    return (m * share).clamp(max=1.0)


class CoBa(ValidationBalancing):
    def __init__(
        self,
        num_tasks: int,
        *,
        warmup_steps: int,
        history_length: int,
        tau: float,
        update_interval: int,
        sample_count: int,
        seed: int,
        device=None,
    ):
        super().__init__(num_tasks, history_length, update_interval, sample_count, seed, device)
        self.warmup_steps = warmup_steps
        self.tau = tau
        self.initial = torch.full((num_tasks,), math.nan, dtype=torch.float64)
        self.slope_history = torch.zeros(num_tasks, 0, dtype=torch.float64)
        self.max_slopes = torch.zeros(0, dtype=torch.float64)
        self.scores: dict[str, torch.Tensor] = {}  # RCS, ACS and DF of the latest update, for inspection

    def record(self, step: int, losses: torch.Tensor) -> None:
        usable = ~torch.isnan(losses) & (losses > 0)
        self.initial = torch.where(torch.isnan(self.initial) & usable, losses, self.initial)
        self.history.append(step, torch.where(usable, losses / self.initial, math.nan))
        trended = self.history.trended()
        if not trended.any():
            return  # no task has a slope yet: nothing enters the slope histories
        slopes = self.history.slopes()  # 0 for a task without a trend: neutral in RCS and ACS
        length = self.history.length
        self.slope_history = push(self.slope_history, slopes, length)
        # α_max over the tasks with a trend: a task seen once is no evidence of the worst slope.
        self.max_slopes = push(self.max_slopes, slopes[trended].max(), length)
        if step >= self.warmup_steps:
            self._reweight(slopes)

    def _reweight(self, slopes: torch.Tensor) -> None:
        rcs = relative_convergence(slopes)
        acs = absolute_convergence(slopes, self.slope_history)
        df = divergence_factor(self.max_slopes, self.tau)
        self.scores = {"rcs": rcs, "acs": acs, "df": df}
        self.set_weights(df * rcs + (1 - df) * acs)

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "initial": self.initial.clone(),
            "slope_history": self.slope_history.clone(),
            "max_slopes": self.max_slopes.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.initial = state["initial"].to(torch.float64)
        self.slope_history = state["slope_history"].to(torch.float64)
        self.max_slopes = state["max_slopes"].to(torch.float64)
