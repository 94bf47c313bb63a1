"""Self-paced balancing (`weighted_loss_mode: self_paced`), MFTCoder v0.3/v0.4's convergence balance.

Every `selfpaced_interval` steps the trainer evaluates `selfpaced_sample_valid_num` validation
batches and feeds the per-task losses (raw, not divided by an initial loss) to `update`. Once the
history holds `selfpaced_history_length` samples, with T tasks and α_k the slope of task k's losses
over the history (`mftcoder.losses.history.slopes`):

    n_k     = T α_k / Σ_j |α_j|
    score_k = softmax(n)_k · (-n_k)
    w       = softmax(s · score)                 s = selfpaced_scale_factor

and uniform weights before that or when every slope is 0. The objective is case3 with w. The
weights come from sampled validation losses, all-reduced over ranks, and carry no gradient.

Unlike MFTCoder, a task absent from a sample is a gap in its history (not a 0 averaged in, nor a
value divided by the world size regardless of the ranks that saw it), and the weights start when
the history holds H real samples — the evaluation before step 0 and the updates after steps
u, 2u, ..., that is after step (H - 1)·u — where MFTCoder starts at step H whatever the interval
u, fitting slopes to a history still padded with zeros.
"""

from __future__ import annotations

import torch

from mftcoder.losses.balancing import ValidationBalancing
from mftcoder.losses.history import safe_ratio


def self_paced_weights(slopes: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """w from the per-task slopes α [T] (the formula above); uniform when every slope is 0."""
    normalised = safe_ratio(slopes.numel() * slopes, slopes.abs().sum())
    score = torch.softmax(normalised, dim=-1) * -normalised
    return torch.softmax(scale_factor * score, dim=-1)


class SelfPaced(ValidationBalancing):
    def __init__(
        self,
        num_tasks: int,
        *,
        interval: int,
        history_length: int,
        scale_factor: float,
        sample_count: int,
        seed: int,
        device=None,
    ):
        super().__init__(num_tasks, history_length, interval, sample_count, seed, device)
        self.scale_factor = scale_factor

    def record(self, step: int, losses: torch.Tensor) -> None:
        self.history.append(step, losses)
        if len(self.history) >= self.history.length:
            self.set_weights(self_paced_weights(self.history.slopes(), self.scale_factor))
