"""Preference objectives (DPO, ORPO) over the pairs of one optimizer step.

A micro-batch of k pairs is 2k padded rows, each pair's chosen response then its rejected one, and
only the response tokens are targets. From the per-token cross-entropy (`modes.token_losses`, 0
off-target) each response gets its log-probability under the model and its length n:

    log π(y|x) = Σ_t log p_t = -Σ_t CE_t        a(y|x) = log π(y|x) / n    (length-normalised)

    DPO   ℓ = -log σ(β [(log π_c - log ref_c) - (log π_r - log ref_r)])   (+ α · NLL_c, rpo_alpha)
          reward = β (log π - log ref)
    ORPO  ℓ = NLL_c + λ · -log σ(log odds_c - log odds_r),   log odds = a - log(1 - e^a)
          reward = λ · a                                      (λ is the config's `beta`, as in TRL)

with NLL_c = -a_c, the chosen response's mean token NLL. The step's objective is L = Σ_p c_p ℓ_p
over its pairs on all micro-batches and ranks, c_p from counts of that whole step:

    case2  every pair counts once      c_p = 1 / P
    case3  task-balanced (default)     c_p = w_k / (P_k · Σ_{j: P_j > 0} w_j)

(P_k: pairs of task k in the step, P = Σ P_k, w: task_weights), so gradient accumulation and world
size do not change it, as for the SFT modes (`modes.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIR_MODES = ("case2", "case3")
# Per task, summed over pairs: what a window or a validation pass reports (metrics.preference_metrics).
PAIR_STATS = ("pairs", "loss", "chosen_reward", "rejected_reward", "correct")
_LOG_HALF = -0.6931471805599453


@dataclass(frozen=True)
class Responses:
    """Per pair: the summed log-probabilities and target counts of its chosen and rejected response, its task."""

    chosen: torch.Tensor  # [P] log π(y_c|x)
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # [P]
    rejected_tokens: torch.Tensor
    task: torch.Tensor  # [P] long


def pair_tasks(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task of each pair of a micro-batch (from its chosen row; a row's targets all carry its task)."""
    rows = (batch["task_ids"] * batch["loss_mask"]).amax(1)
    return rows[: 2 * (len(rows) // 2) : 2]


def responses(ce: torch.Tensor, batch: dict[str, torch.Tensor]) -> Responses:
    """The pairs of a micro-batch from its per-token CE [B, L] (B = 2 · pairs; a dummy row of an empty
    micro-batch holds no pair)."""
    rows = 2 * (ce.shape[0] // 2)
    logp = -ce[:rows].sum(1)
    tokens = batch["loss_mask"][:rows].sum(1).to(logp.dtype)
    return Responses(logp[0::2], logp[1::2], tokens[0::2], tokens[1::2], pair_tasks(batch))


@dataclass(frozen=True)
class PairLosses:
    loss: torch.Tensor  # [P]
    chosen_reward: torch.Tensor  # [P], detached
    rejected_reward: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> PairLosses:
    """DPO (Rafailov et al. 2023, Eq. 7) from summed response log-probabilities."""
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected))
    return PairLosses(loss, beta * chosen.detach(), beta * rejected.detach())


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a < 0, accurate on both sides of log 1/2 (Mächler 2012), finite gradients."""
    a = a.clamp(max=-1e-7)
    near = torch.log(-torch.expm1(a.clamp(min=_LOG_HALF)))
    far = torch.log1p(-torch.exp(a.clamp(max=_LOG_HALF)))
    return torch.where(a > _LOG_HALF, near, far)


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, lam: float) -> PairLosses:
    """ORPO (Hong et al. 2024, Eq. 6-7) from length-normalised response log-probabilities a."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    loss = -chosen_mean - lam * F.logsigmoid(log_odds)
    return PairLosses(loss, lam * chosen_mean.detach(), lam * rejected_mean.detach())


def pair_counts(tasks: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[T]: pairs per task."""
    return torch.zeros(num_tasks, dtype=torch.float32, device=tasks.device).index_add_(
        0, tasks, torch.ones_like(tasks, dtype=torch.float32)
    )


def pair_coefficients(mode: str, tasks: torch.Tensor, step_counts: torch.Tensor, task_weights: torch.Tensor):
    """c_p of each pair (tasks [P]) in a step whose pairs per task (all micro-batches and ranks) are `step_counts`."""
    inverse = torch.where(step_counts > 0, 1.0 / step_counts.clamp(min=1), torch.zeros_like(step_counts))
    if mode == "case2":
        return inverse.new_full(tasks.shape, 1.0) / step_counts.sum().clamp(min=1)
    if mode == "case3":
        weights = task_weights * (step_counts > 0)
        return (weights * inverse / weights.sum().clamp(min=1e-30))[tasks]
    raise ValueError(f"unknown pair mode {mode!r}; expected one of {PAIR_MODES}")


def pair_stats(losses: PairLosses, tasks: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[len(PAIR_STATS), T]: pairs, loss, chosen and rejected reward sums and correctly ordered pairs per task."""
    values = torch.stack(
        [
            torch.ones_like(losses.chosen_reward),
            losses.loss.detach().to(losses.chosen_reward.dtype),
            losses.chosen_reward,
            losses.rejected_reward,
            (losses.chosen_reward > losses.rejected_reward).to(losses.chosen_reward.dtype),
        ]
    ).double()
    return torch.zeros(len(PAIR_STATS), num_tasks, dtype=torch.float64, device=values.device).index_add_(
        1, tasks, values
    )


@dataclass(frozen=True)
class PreferenceLoss:
    """The objective of a dpo or orpo run (config: training_stage, beta, rpo_alpha, weighted_loss_mode)."""

    stage: str  # dpo | orpo
    beta: float
    rpo_alpha: float | None
    mode: str  # case2 | case3
    task_weights: torch.Tensor

    @property
    def needs_reference(self) -> bool:
        return self.stage == "dpo"

    def losses(self, policy: Responses, reference: Responses | None) -> PairLosses:
        chosen_nll = -policy.chosen / policy.chosen_tokens.clamp(min=1)
        if self.stage == "orpo":
            rejected_mean = policy.rejected / policy.rejected_tokens.clamp(min=1)
            return orpo_loss(-chosen_nll, rejected_mean, self.beta)
        out = dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected, self.beta)
        if self.rpo_alpha:
            out = PairLosses(out.loss + self.rpo_alpha * chosen_nll, out.chosen_reward, out.rejected_reward)
        return out

    def coefficients(self, tasks: torch.Tensor, step_counts: torch.Tensor) -> torch.Tensor:
        return pair_coefficients(self.mode, tasks, step_counts, self.task_weights)
