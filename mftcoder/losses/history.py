"""The validation record that loss-driven balancing (self-paced, CoBa) learns from.

`validation_sample` says which validation samples an update evaluates; `LossHistory` keeps the
last `length` per-task values with the optimizer step each was measured at; `slopes` fits their
trends. A task absent from a sample gets NaN at that step, and the fit runs on the steps
themselves, so later values never slide onto earlier steps (MFTCoder dropped the missing values
and truncated the time axis from the front, which misaligns it and inflates the slopes of rare
tasks). Memory is bounded by `length`.
"""

from __future__ import annotations

import numpy as np
import torch

# Keeps the validation draws independent of the training order, seeded by (seed, epoch) alone.
_VALIDATION_STREAM = 1


def validation_sample(num_samples: int, count: int, seed: int, draw: int) -> list[int]:
    """Indices of the validation samples evaluated by update number `draw` (0, 1, ...).

    Draws are consecutive slices of `count` samples of seeded permutations of the split, one
    permutation after another (the last num_samples % count samples of each are left out, a
    different few each time): no sample repeats within a draw, all are used about equally often,
    and the choice is a pure function of (seed, draw), so resuming needs only the draw number. A
    count of at least the split's size is the whole split.
    """
    count = min(count, num_samples)
    epoch, slot = divmod(draw, num_samples // count)
    order = np.random.default_rng([seed, _VALIDATION_STREAM, epoch]).permutation(num_samples)
    return order[slot * count : (slot + 1) * count].tolist()


def push(buffer: torch.Tensor, column: torch.Tensor, length: int) -> torch.Tensor:
    """`buffer` with `column` appended along its last dimension, keeping the newest `length` entries."""
    return torch.cat([buffer, column.unsqueeze(-1)], dim=-1)[..., -length:]


def safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (a flat history has no trend to scale)."""
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1), 0)


def slopes(steps: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of each row of `values` [T, n] against `steps` [n], NaN entries left out.

    A row with fewer than two values (or all at one step) has slope 0: no evidence of a trend.
    """
    present = ~torch.isnan(values)
    weight = present.to(values.dtype)
    count = weight.sum(-1, keepdim=True).clamp(min=1)
    y = torch.where(present, values, 0)
    x = steps.to(values.dtype).expand_as(values)
    dx = (x - (weight * x).sum(-1, keepdim=True) / count) * weight
    dy = y - y.sum(-1, keepdim=True) / count
    return safe_ratio((dx * dy).sum(-1), (dx * dx).sum(-1))


class LossHistory:
    """The last `length` validation samples: steps [n] and per-task values [T, n], float64 on the CPU."""

    def __init__(self, num_tasks: int, length: int):
        self.length = length
        self.steps = torch.zeros(0, dtype=torch.float64)
        self.values = torch.zeros(num_tasks, 0, dtype=torch.float64)

    def __len__(self) -> int:
        return self.steps.numel()

    def append(self, step: int, values: torch.Tensor) -> None:
        self.steps = push(self.steps, torch.tensor(float(step), dtype=torch.float64), self.length)
        self.values = push(self.values, values.to(torch.float64), self.length)

    def slopes(self) -> torch.Tensor:
        return slopes(self.steps, self.values)

    def trended(self) -> torch.Tensor:
        """[T] bool: the tasks with at least two values in the window, whose slope is a measured trend."""
        return (~torch.isnan(self.values)).sum(-1) >= 2

    def state_dict(self) -> dict:
        return {"steps": self.steps.clone(), "values": self.values.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"].to(torch.float64)[-self.length :]
        self.values = state["values"].to(torch.float64)[:, -self.length :]
