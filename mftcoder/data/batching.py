"""Which samples each rank sees, and how a micro-batch becomes tensors.

The sampler is the only place data is split across ranks. Each global batch of
`batch_size * world_size` units (samples, or packed rows in pack mode) is dealt out round-robin,
so every unit is seen exactly once per epoch over all ranks, nothing is duplicated, and every rank
gets the same number of micro-batches (the last one may be short or even empty; an empty one
becomes a dummy row with no targets so that collective operations stay in step).

Three layouts, each with `targets` shifted so that position j predicts token j+1 and with
`loss_mask`, `task_ids` and `sample_ids` aligned with `targets` (the task and the sample of each
target token, which is what every loss mode reduces over; sample ids are unique in a micro-batch):

- padding: one sample per row, right-padded to the longest, with an attention mask (a preference
  pair is two units' worth of rows: its chosen sample, then its rejected one);
- packed: several whole samples per row (a bin), no attention mask, position ids restarting at 0
  for every sample (and for the padding after the last one), the last token of every sample without
  a target. With sdpa/eager and no cache, transformers derives the block-diagonal causal mask from
  the position ids, so a sample sees only itself;
- flat (flash-attention-2): every sample of the micro-batch in ONE row, no padding, plus the
  cumulative sequence lengths `cu_seq_lens_q/k` and `max_length_q/k` that transformers hands to the
  varlen kernel (it infers packing from position ids only at batch size 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mftcoder.data.packing import Bins
from mftcoder.data.sample import Sample


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The same permutation on every rank: a pure function of (seed, epoch), so resuming is trivial."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_micro_batches(order: Sequence[int], batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    global_batch = batch_size * world_size
    return [
        [int(i) for i in order[start : start + global_batch][rank::world_size]]
        for start in range(0, len(order), global_batch)
    ]


def _rows(rows: Sequence[Sequence[Sample]], pad_id: int) -> dict[str, np.ndarray]:
    """Rows of consecutive samples, right-padded to the longest row (an empty batch: one pad token)."""
    rows = rows or [[]]
    length = max(max(sum(len(s.input_ids) for s in row) for row in rows), 1)
    shape = (len(rows), length)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, pad_id, dtype=np.int64)
    loss_mask = np.zeros(shape, dtype=bool)
    task_ids = np.zeros(shape, dtype=np.int64)
    sample_ids = np.full(shape, -1, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    tokens = np.zeros(shape, dtype=np.int64)
    sample = 0
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s.input_ids)
            end = start + n
            input_ids[r, start:end] = s.input_ids
            targets[r, start : end - 1] = s.input_ids[1:]
            loss_mask[r, start : end - 1] = s.loss_mask[1:]
            task_ids[r, start : end - 1] = s.task_id
            sample_ids[r, start : end - 1] = sample
            position_ids[r, start:end] = np.arange(n)
            tokens[r, start:end] = 1
            start, sample = end, sample + 1
        position_ids[r, start:] = np.arange(length - start)
    return {
        "input_ids": input_ids,
        "targets": targets,
        # The targets at the loss mask, in its (row-major) order: what the logits rows of the targets
        # are scored against, selected here so that the device never waits to learn how many there are.
        "target_ids": targets[loss_mask],
        "loss_mask": loss_mask,
        "task_ids": task_ids,
        "sample_ids": sample_ids,
        "position_ids": position_ids,
        "tokens": tokens,
    }


# Batch entries the model takes. A packed batch has position ids and no attention mask (plus the
# sequence lengths under flash-attention), a padded one an attention mask.
MODEL_INPUTS = (
    "input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
)  # fmt: skip


def to_device(batch: dict[str, torch.Tensor | int], device: torch.device) -> dict[str, torch.Tensor | int]:
    """Tensors to `device`; plain ints (flash-attention's max lengths) stay on the host. To a GPU through
    pinned memory: only a copy from pinned memory runs asynchronously, behind the work already queued."""
    pinned = device.type == "cuda"
    return {
        key: (value.pin_memory() if pinned else value).to(device, non_blocking=pinned)
        if isinstance(value, torch.Tensor)
        else value
        for key, value in batch.items()
    }


def _tensors(arrays: dict[str, np.ndarray], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(arrays[key]) for key in keys}


_LOSS_KEYS = ("input_ids", "targets", "target_ids", "loss_mask", "task_ids", "sample_ids")


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Padding mode: one sample per row, right-padded to the longest, with an attention mask."""
    arrays = _rows([[s] for s in samples], pad_id)
    batch = _tensors(arrays, _LOSS_KEYS)
    batch["attention_mask"] = torch.from_numpy(arrays["tokens"])
    if not samples:  # the dummy row attends to itself: a row with nothing to attend to gives NaN
        batch["attention_mask"][:] = 1
    return batch


def collate_packed(rows: Sequence[Sequence[Sample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack mode: each row a bin of whole samples; position ids and no attention mask (`tokens`
    marks the real tokens for what must leave the row's padding out, never for the model)."""
    return _tensors(_rows(rows, pad_id), (*_LOSS_KEYS, "position_ids", "tokens"))


def collate_flat(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Pack mode under flash-attention-2: the whole micro-batch as one row with its sequence lengths."""
    batch: dict[str, torch.Tensor | int] = collate_packed([samples], pad_id)
    lengths = [len(s.input_ids) for s in samples] or [1]
    cu_seq_lens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
    batch["max_length_q"] = batch["max_length_k"] = max(lengths)
    return batch


@dataclass
class Split(Sequence):
    """The samples of one split and how they form units (what the sampler deals out and a micro-batch
    holds): a sample each, or in pack mode a bin each (`bins`); `flatten` selects the flat layout.
    `paired`: each unit (bin) is a preference pair whose two samples take a padded row each."""

    samples: list[Sample]
    bins: Bins | None = None
    flatten: bool = False
    paired: bool = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __add__(self, other: Sequence[Sample]) -> list[Sample]:
        """The samples of both (e.g. train + valid), as a list."""
        return [*self.samples, *other]

    def __radd__(self, other: Sequence[Sample]) -> list[Sample]:
        return [*other, *self.samples]

    @property
    def units(self) -> int:
        return len(self.bins) if self.bins is not None else len(self.samples)

    def unit(self, index: int) -> list[Sample]:
        if self.bins is None:
            return [self.samples[index]]
        return [self.samples[i] for i in self.bins[index].tolist()]

    def batch(self, units: Sequence[int], pad_id: int) -> dict[str, torch.Tensor | int]:
        """The tensors of a micro-batch of these units."""
        if self.bins is None:
            return collate([self.samples[u] for u in units], pad_id)
        rows = [self.unit(u) for u in units]
        if self.paired:
            return collate([s for row in rows for s in row], pad_id)
        if self.flatten:
            return collate_flat([s for row in rows for s in row], pad_id)
        return collate_packed(rows, pad_id)

    def tokens(self, units: Sequence[int]) -> int:
        """Non-padding tokens of these units."""
        return sum(len(s.input_ids) for u in units for s in self.unit(u))

    def task_ids(self, units: Sequence[int]) -> set[int]:
        return {s.task_id for u in units for s in self.unit(u)}
