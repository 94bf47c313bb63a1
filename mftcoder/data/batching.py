"""Which samples each rank sees, and how a micro-batch becomes tensors.

The sampler is the only place data is split across ranks. Each global batch of
`batch_size * world_size` samples is dealt out round-robin, so every sample is seen exactly once
per epoch over all ranks, nothing is duplicated, and every rank gets the same number of
micro-batches (the last one may be short or even empty; an empty one becomes a dummy row with no
targets so that collective operations stay in step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mftcoder.data.dataset import Sample


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The same permutation on every rank: a pure function of (seed, epoch), so resuming is trivial."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_micro_batches(order: Sequence[int], batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    global_batch = batch_size * world_size
    return [
        [int(i) for i in order[start : start + global_batch][rank::world_size]]
        for start in range(0, len(order), global_batch)
    ]


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; targets are shifted so position j predicts token j+1.

    `loss_mask`, `task_ids` and `sample_ids` are aligned with `targets`: the task and the sample of
    each target token, which is what every loss mode reduces over.
    """
    if not samples:
        samples = [Sample(np.array([pad_id], dtype=np.int32), np.zeros(1, dtype=np.uint8), 0)]
    length = max(len(s.input_ids) for s in samples)
    rows = len(samples)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    targets = torch.full((rows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, length), dtype=torch.long)
    loss_mask = torch.zeros((rows, length), dtype=torch.bool)
    task_ids = torch.zeros((rows, length), dtype=torch.long)
    sample_ids = torch.full((rows, length), -1, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids = torch.from_numpy(s.input_ids.astype(np.int64))
        input_ids[row, :n] = ids
        targets[row, : n - 1] = ids[1:]
        attention[row, :n] = 1
        loss_mask[row, : n - 1] = torch.from_numpy(s.loss_mask[1:].astype(bool))
        task_ids[row, : n - 1] = s.task_id
        sample_ids[row, : n - 1] = row
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "targets": targets,
        "loss_mask": loss_mask,
        "task_ids": task_ids,
        "sample_ids": sample_ids,
    }
