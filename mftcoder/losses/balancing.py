"""What the trainer asks of a task-weighting strategy, and the strategies without learned state.

The trainer drives every `weighted_loss_mode` through one `Balancing` object:

    before training     a validation-driven one gets a full evaluation: update(0, losses)
    each micro-batch    objective = sum(coefficients(batch, ce, step_counts) * ce)
    after each step     observe(task_ce, task_targets)        all-reduced train CE sums and targets
                        if validation_due(step): update(step, losses of validation_indices(...))
    checkpoints         state_dict() / load_state_dict()

Every input that depends on data is all-reduced before it gets here, so every rank holds the same
state and the same weights. Task weights computed from losses never carry a gradient (focal's
sample-level factor does: it is part of the focal loss itself, see `focal.py`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from mftcoder.config.loss_modes import LOSS_MODES
from mftcoder.losses.history import LossHistory, validation_sample
from mftcoder.losses.modes import token_coefficients


def loss_vector(tasks: list[str], task_loss: dict[str, float]) -> torch.Tensor:
    """Per-task losses in task order, NaN for a task the evaluated samples did not contain."""
    return torch.tensor([task_loss.get(task, math.nan) for task in tasks], dtype=torch.float64)


class Balancing(ABC):
    """Base: nothing learned from training or validation losses, no validation needed."""

    weights: torch.Tensor | None = None  # the per-task weights the objective applies (logged as task_weight)
    needs_validation = False  # True: feed `update` a full evaluation before training and samples when due

    @abstractmethod
    def coefficients(self, batch: dict[str, torch.Tensor], ce: torch.Tensor, step_counts: torch.Tensor) -> torch.Tensor:
        """c_t of every token of `batch` (0 off-target) for the step whose [2, T] counts are `step_counts`."""

    def observe(self, task_ce: torch.Tensor, task_targets: torch.Tensor) -> None:  # noqa: B027 (optional hook)
        """The step's per-task CE sums and target counts over all ranks; only focal (task level) uses them."""

    def validation_due(self, step: int) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 (stateless by default)
        """Nothing to restore."""


class StaticWeights(Balancing):
    """case1..case4 (`mftcoder.losses.modes`); the static `task_weights` (None: uniform) apply to case3
    and case4, and are reported as `weights` only when given."""

    def __init__(self, mode: str, task_weights: list[float] | None, num_tasks: int, device=None):
        self.mode = mode
        self.task_weights = torch.tensor(task_weights or [1.0] * num_tasks, dtype=torch.float32, device=device)
        self.weights = self.task_weights if task_weights is not None and LOSS_MODES[mode].static_task_weights else None

    def coefficients(self, batch, ce, step_counts):
        return token_coefficients(self.mode, batch, step_counts, self.task_weights)


class ValidationBalancing(Balancing):
    """Task weights learned from validation losses sampled every `interval` steps (self-paced, CoBa).

    The objective is case3 with these weights. Each update evaluates `sample_count` validation
    samples chosen by `validation_sample(..., draw)`; the draw number is part of the state, so a
    resumed run evaluates the samples the uninterrupted run would have. Weights start uniform.
    """

    needs_validation = True

    def __init__(self, num_tasks: int, history_length: int, interval: int, sample_count: int, seed: int, device):
        self.num_tasks = num_tasks
        self.interval = interval
        self.sample_count = sample_count
        self.seed = seed
        self.device = device
        self.history = LossHistory(num_tasks, history_length)
        self.draws = 0
        self.set_weights(torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))

    def set_weights(self, weights: torch.Tensor) -> None:
        self.exact_weights = weights.to(torch.float64)
        self.weights = self.exact_weights.to(device=self.device, dtype=torch.float32)

    def coefficients(self, batch, ce, step_counts):
        return token_coefficients("case3", batch, step_counts, self.weights)

    def validation_due(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0

    def validation_indices(self, num_valid: int) -> list[int]:
        """The validation samples (indices into the split) the next update evaluates, on all ranks together."""
        return validation_sample(num_valid, self.sample_count, self.seed, self.draws)

    def update(self, step: int, losses: torch.Tensor | None) -> torch.Tensor:
        """Record the per-task validation losses measured after `step` optimizer steps (NaN: task not
        in the evaluated samples) and recompute the weights; None leaves everything as it is."""
        if losses is not None:
            self.record(step, losses.detach().to("cpu", torch.float64))
            self.draws += 1
        return self.weights

    @abstractmethod
    def record(self, step: int, losses: torch.Tensor) -> None:
        """Add one validation sample (float64, CPU) to the history and recompute the weights."""

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict(), "draws": self.draws, "weights": self.exact_weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state["history"])
        self.draws = state["draws"]
        self.set_weights(state["weights"])
