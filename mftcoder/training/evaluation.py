"""Per-task validation loss: summed token cross-entropy over the whole split, on all ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mftcoder.data.batching import MODEL_INPUTS, Split, rank_micro_batches, to_device
from mftcoder.losses.modes import task_sums, token_losses
from mftcoder.models.logits import logits_at_mask
from mftcoder.training.metrics import per_task


@dataclass(frozen=True)
class Evaluation:
    loss: float
    task_loss: dict[str, float]
    extra: dict = field(default_factory=dict)  # more to log with it (preference training: rewards, accuracy)

    @property
    def task_mean(self) -> float:
        """The per-task losses averaged with each task counted once, as the task-balanced modes weigh them."""
        return sum(self.task_loss.values()) / len(self.task_loss)

    def metric(self, name: str) -> float:
        """The number `metric_for_best` names: `loss`, `task_mean` or a task's loss."""
        if name == "loss":
            return self.loss
        return self.task_mean if name == "task_mean" else self.task_loss[name]


def model_outputs(model, batch: dict[str, torch.Tensor], **options):
    """The model's output on one collated batch (already on the model's device); its logits are those of
    the targets only ([N, V] in `loss_mask` order) where the model can compute them so.

    Never with a cache: transformers derives the block-diagonal mask of a packed batch from its
    position ids only when there is neither an attention mask nor a cache, and a model's default
    `use_cache=True` would create one even in training."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    if logits_at_mask(model):
        # Only the targets' logits: the output head and the cross-entropy skip prompts, padding and
        # the last token of every packed sample.
        options["logits_to_keep"] = batch["loss_mask"]
    return model(**inputs, use_cache=False, **options)


def forward_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token CE of one collated batch (already on the model's device): fp32 at its targets, 0 elsewhere."""
    return token_losses(model_outputs(model, batch).logits, batch)


@torch.no_grad()
def evaluate(
    model, accelerator, split: Split, tasks: list[str], batch_size: int, pad_id: int, units: list[int] | None = None
) -> Evaluation:
    """Independent of the loss mode: task t's loss is its CE sum over its validation targets divided
    by their count; `loss` is the same over all tasks. Each unit of the split (a sample, or a packed
    row in pack mode) is evaluated once on one rank; `units` restricts that to some of them."""
    num_tasks = len(tasks)
    sums = torch.zeros(2, num_tasks, dtype=torch.float64, device=accelerator.device)
    batches = rank_micro_batches(
        range(split.units) if units is None else units, batch_size, accelerator.num_processes, accelerator.process_index
    )
    was_training = model.training
    model.eval()
    for units in batches:
        batch = to_device(split.batch(units, pad_id), accelerator.device)
        ce = forward_token_losses(model, batch)
        sums[0] += task_sums(ce, batch, num_tasks).double()
        sums[1] += task_sums(torch.ones_like(ce), batch, num_tasks).double()
    model.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum")
    total = float(sums[0].sum() / sums[1].sum().clamp(min=1))
    return Evaluation(total, per_task(tasks, sums[0], sums[1]))
