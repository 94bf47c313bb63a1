"""What became of one optimizer step's update, decided from what really happened to the weights.

Whether the update was applied is not always the trainer's decision: under a fp16 GradScaler the
scaler skips it when the scaled gradients overflow, and under DeepSpeed the engine steps (or skips)
inside the last backward, before the trainer sees the gradient norm. The trainer therefore asks
who applied it, then names the outcome here, so that what is logged and counted is what happened.
"""

from __future__ import annotations

from enum import Enum

from mftcoder.errors import TrainingError


class Outcome(Enum):
    APPLIED = "applied"
    # Dynamic loss scaling overshot: the scale is lowered and the step retried with the next batch.
    # Normal under fp16; not a sign of divergence, so it never counts toward on_nan.
    OVERFLOW = "overflow"
    NON_FINITE = "non_finite"  # the loss or gradients were non-finite: on_nan decides


def step_outcome(loss_finite: bool, grads_finite: bool, applied: bool, loss_scale: float | None, step: int) -> Outcome:
    """The outcome of step `step` from the step's loss and gradient norm (all ranks), whether the update
    reached the weights, and the dynamic loss scale the step ran under (None: none in use)."""
    if applied:
        if loss_finite and grads_finite:
            return Outcome.APPLIED
        raise TrainingError(
            f"step {step}: an update with a non-finite loss or gradient norm was applied to the weights, which "
            "are no longer trustworthy; resume from the last checkpoint with a lower learning rate. (DeepSpeed "
            "applies such updates when its overflow check is off: remove bf16.check_grad_overflow: false and "
            "zero_optimization.compute_grad_norm: false from the DeepSpeed config)"
        )
    # Gradients that overflow at a scale of 1 or less overflow unscaled: the scale cannot fix them, and a
    # run that keeps diverging must reach on_nan rather than halve its scale forever.
    if loss_scale is not None and loss_scale > 1 and loss_finite:
        return Outcome.OVERFLOW
    return Outcome.NON_FINITE
