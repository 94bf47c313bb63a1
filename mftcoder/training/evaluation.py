"""Per-task validation loss: summed token cross-entropy over the whole split, on all ranks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mftcoder.data.batching import collate, rank_micro_batches
from mftcoder.data.dataset import Sample
from mftcoder.losses.modes import task_sums, token_losses
from mftcoder.training.metrics import per_task


@dataclass(frozen=True)
class Evaluation:
    loss: float
    task_loss: dict[str, float]


def forward_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token CE of one collated batch (already on the model's device)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return token_losses(logits, batch["targets"])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate(model, accelerator, samples: Sequence[Sample], tasks: list[str], batch_size: int, pad_id: int) -> Evaluation:
    """Independent of the loss mode: task t's loss is its CE sum over its validation targets divided
    by their count; `loss` is the same over all tasks. Each sample is evaluated once on one rank."""
    num_tasks = len(tasks)
    sums = torch.zeros(2, num_tasks, dtype=torch.float64, device=accelerator.device)
    batches = rank_micro_batches(range(len(samples)), batch_size, accelerator.num_processes, accelerator.process_index)
    was_training = model.training
    model.eval()
    for indices in batches:
        batch = to_device(collate([samples[i] for i in indices], pad_id), accelerator.device)
        ce = forward_token_losses(model, batch)
        sums[0] += task_sums(ce, batch, num_tasks).double()
        sums[1] += task_sums(torch.ones_like(ce), batch, num_tasks).double()
    model.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum")
    total = float(sums[0].sum() / sums[1].sum().clamp(min=1))
    return Evaluation(total, per_task(tasks, sums[0], sums[1]))
