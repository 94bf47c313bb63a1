"""Preference training (training_stage dpo, orpo) in the loop: the reference model, one optimizer step,
validation. The objective and its normalisation over the step are `mftcoder.losses.preference`'s.

The reference of a LoRA/QLoRA DPO run is the model itself with its adapter disabled (peft's
`disable_adapter()`): the frozen base, no second copy. A full fine-tuning DPO run keeps a frozen copy of
the base, made before any checkpoint's weights are loaded, so a resumed run has the same reference.
ORPO needs none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from mftcoder.config.schema import TrainConfig
from mftcoder.data.batching import Split, rank_micro_batches, to_device
from mftcoder.errors import TrainingError
from mftcoder.losses.modes import task_sums
from mftcoder.losses.preference import (
    PAIR_STATS,
    PairLosses,
    PreferenceLoss,
    Responses,
    pair_counts,
    pair_stats,
    pair_tasks,
    responses,
)
from mftcoder.training.evaluation import Evaluation, forward_token_losses
from mftcoder.training.metrics import per_task, preference_metrics
from mftcoder.training.state import Run
from mftcoder.training.step import StepResult, backward_over_micro_batches, finish_step


def build_preference(config: TrainConfig, accelerator, model, num_tasks: int) -> tuple[PreferenceLoss | None, object]:
    """The objective of a dpo/orpo run and its separate reference model (None where none is kept), from the
    model as built, before `prepare` and before a checkpoint's weights are loaded into it."""
    if config.training_stage == "sft":
        return None, None
    weights = torch.tensor(config.task_weights or [1.0] * num_tasks, dtype=torch.float32, device=accelerator.device)
    loss = PreferenceLoss(config.training_stage, config.beta, config.rpo_alpha, config.weighted_loss_mode, weights)
    if not loss.needs_reference or config.peft_type:
        return loss, None
    if is_deepspeed_zero3_enabled():
        raise TrainingError(
            "full fine-tuning DPO under ZeRO-3: the reference model would be a partitioned copy; "
            "use peft_type: lora (its reference is the base with the adapter disabled) or ZeRO-2"
        )
    reference = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)
    return loss, reference


def reference_responses(run: Run, accelerator, batch: dict[str, torch.Tensor]) -> Responses | None:
    """The reference model's log-probabilities of the pairs (no gradient), or None when the loss needs none."""
    if not run.preference.needs_reference:
        return None
    with torch.no_grad():
        if run.reference is not None:
            with accelerator.autocast():
                return responses(forward_token_losses(run.reference, batch), batch)
        with accelerator.unwrap_model(run.model).disable_adapter():
            return responses(forward_token_losses(run.model, batch), batch)


def pair_forward(run: Run, accelerator, batch: dict[str, torch.Tensor]) -> tuple[PairLosses, Responses, torch.Tensor]:
    """The pair losses of a micro-batch (on the model's device), the policy's responses and its per-token CE."""
    reference = reference_responses(run, accelerator, batch)
    ce = forward_token_losses(run.model, batch)
    policy = responses(ce, batch)
    return run.preference.losses(policy, reference), policy, ce


def preference_step(
    accelerator,
    config: TrainConfig,
    run: Run,
    micro_batches: list[list[int]],
    stop_requested: Callable[[], bool] = lambda: False,
) -> StepResult:
    """`step.optimizer_step` for preference pairs: the step's pairs per task are what is all-reduced first."""
    num_tasks = len(run.data.tasks)

    def micro_batch_loss(batch, indices, step_counts, own_counts, scale):
        losses, policy, ce = pair_forward(run, accelerator, batch)
        # A rank whose share ran out has no pair: its objective is a zero still tied to the model.
        objective = (run.preference.coefficients(policy.task, step_counts) * losses.loss).sum()
        contribution = run.window.micro_batch(
            objective,
            task_sums(ce.detach(), batch, num_tasks),
            task_sums(torch.ones_like(ce), batch, num_tasks),
            run.data.train.tokens(indices),
            pair_stats=pair_stats(losses, policy.task, num_tasks),
        )
        return objective, contribution

    step_sums = backward_over_micro_batches(
        accelerator, config, run, micro_batches, lambda b: pair_counts(pair_tasks(b), num_tasks), micro_batch_loss
    )
    return finish_step(accelerator, config, run, step_sums, stop_requested)


@torch.no_grad()
def evaluate_pairs(run: Run, accelerator, split: Split, batch_size: int) -> Evaluation:
    """Validation of a preference run: the mean pair loss (`loss`), per task (`task_loss`, what
    metric_for_best and early stopping follow), and rewards, margins and accuracy over all pairs and per
    task. Every pair counts once, whatever the training mode."""
    tasks = run.data.tasks
    sums = torch.zeros(len(PAIR_STATS), len(tasks), dtype=torch.float64, device=accelerator.device)
    batches = rank_micro_batches(range(split.units), batch_size, accelerator.num_processes, accelerator.process_index)
    was_training = run.model.training
    run.model.eval()
    for units in batches:
        batch = to_device(split.batch(units, run.pad_id), accelerator.device)
        losses, policy, _ = pair_forward(run, accelerator, batch)
        sums += pair_stats(losses, policy.task, len(tasks))
    run.model.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum")
    loss = float(sums[1].sum() / sums[0].sum().clamp(min=1))
    return Evaluation(loss, per_task(tasks, sums[1], sums[0]), preference_metrics(tasks, sums))


def train_record(tasks: list[str], window_pairs: torch.Tensor) -> dict:
    """What a train log line of a preference run adds: the per-task mean pair loss as `task_loss` (as in
    validation), rewards, margins and accuracy."""
    return {"task_loss": per_task(tasks, window_pairs[1], window_pairs[0]), **preference_metrics(tasks, window_pairs)}
