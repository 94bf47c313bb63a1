"""Focal balancing (`weighted_loss_mode: focal`): difficulty balancing of the MFTCoder paper.

The MFTCoder paper (arXiv 2311.02303, §3.5) balances task difficulty with focal-loss variants at
sample level (its Eq. 2) and at task level (its Eq. 3); MFTCoder never released them. The stored
copies of the paper we could search show its abstract but not those equations, so both are built
from focal loss (Lin et al. 2017), FL(p) = -(1 - p)^γ log p, applied to
each target token and to each task:

    focal_level: sample    L = (1/S) Σ_s (1/n_s) Σ_{t in s} (1 - p_t)^γ CE_t         p_t = exp(-CE_t)
    focal_level: task      L = Σ_k w_k (1 - P̂_k)^γ ℓ_k / Σ_{j: N_j > 0} w_j          P̂_k = exp(-ℓ̂_k)

S is the number of samples with targets in the step (all micro-batches, all ranks), n_s the targets
of sample s, ℓ_k the mean target CE of task k over the step, w the static `task_weights` (focal's
α). The sample level is Lin et al.'s loss on every token, averaged per sample and then over samples
(case2's balance); the task level is Lin et al.'s loss on the task's probability, taken as the
geometric mean of its target tokens' probabilities, exp(-ℓ): the difficulty is then a function of
the very loss the task contributes, whatever its sample lengths. With γ = 0 every factor is 1, so
the sample level is case2 and the task level case3, exactly.

Where the factors come from:
- sample level: p_t is the token's own probability, in the same pass, and is not detached: the
  objective is the focal loss itself and its gradient includes the modulating factor's, as in
  Lin et al.;
- task level: ℓ_k of the current step is known only after every micro-batch's backward, so the
  factor uses ℓ̂_k, the task's mean train CE in the most recent step that had targets of the task
  (all-reduced over ranks, fed by the trainer through `observe`), and is detached: it weights the
  case3 objective like a task weight. A task not seen yet has factor 1 (no down-weighting).
"""

from __future__ import annotations

import math

import torch

from mftcoder.losses.balancing import Balancing
from mftcoder.losses.modes import token_coefficients

LEVELS = ("task", "sample")


def modulation(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - exp(-CE))^γ; 1 - exp(-CE) is floored at 1e-12 so that the factor's gradient stays finite at CE = 0."""
    return (-torch.expm1(-ce)).clamp(min=1e-12).pow(gamma)


def sample_focal_coefficients(
    batch: dict[str, torch.Tensor], ce: torch.Tensor, step_counts: torch.Tensor, gamma: float
) -> torch.Tensor:
    """c_t = (1 - p_t)^γ / (S n_s): case2 times each token's focal factor (carries a gradient)."""
    case2 = token_coefficients("case2", batch, step_counts, task_weights=torch.ones(1))  # case2 ignores task weights
    return case2 * modulation(ce.float(), gamma)


def task_focal_coefficients(
    batch: dict[str, torch.Tensor], step_counts: torch.Tensor, task_weights: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """c_t = w_k φ_k / (N_k Σ_{j: N_j > 0} w_j): case3 times the (detached) factor φ_k of the token's task."""
    return token_coefficients("case3", batch, step_counts, task_weights) * factors[batch["task_ids"]]


class FocalBalancing(Balancing):
    def __init__(self, level: str, gamma: float, task_weights: torch.Tensor):
        if level not in LEVELS:
            raise ValueError(f"unknown focal level {level!r}; expected one of {LEVELS}")
        self.level = level
        self.gamma = gamma
        self.task_weights = task_weights
        # ℓ̂_k: mean train CE of the task in the latest step that had its targets; NaN until then.
        self.difficulty = torch.full_like(task_weights, math.nan)

    @property
    def factors(self) -> torch.Tensor:
        return torch.where(torch.isnan(self.difficulty), 1.0, modulation(self.difficulty, self.gamma))

    @property
    def weights(self) -> torch.Tensor | None:
        return self.task_weights * self.factors if self.level == "task" else None

    def coefficients(self, batch, ce, step_counts):
        if self.level == "sample":
            return sample_focal_coefficients(batch, ce, step_counts, self.gamma)
        return task_focal_coefficients(batch, step_counts, self.task_weights, self.factors)

    def observe(self, task_ce: torch.Tensor, task_targets: torch.Tensor) -> None:
        if self.level == "task":
            seen = task_targets.to(self.difficulty.device) > 0
            mean = task_ce.to(self.difficulty) / task_targets.to(self.difficulty).clamp(min=1)
            self.difficulty = torch.where(seen, mean, self.difficulty)

    def state_dict(self) -> dict:
        return {"difficulty": self.difficulty.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.difficulty = state["difficulty"].to(self.task_weights)
