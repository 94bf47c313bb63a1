"""Rows of `seq_length` tokens: bins of whole samples (`pack`) and windows of a text stream (`concat`).

Pack. Best-fit decreasing: samples in decreasing length (ties in a seeded order) each go to the open
bin with the least free space that still holds them, else to a new bin. No sample is split and
every sample lands in exactly one bin, so nothing is lost. The bins are formed ONCE per split, from
the seed, not per epoch: every epoch then has the same number of rows and so the same number of
steps, which is what lets the global step name the data position (exact resume). Sampling weights
act on bins: tasks that share a `weight` share bins, and each such group is packed on its own, so
a bin of weight 2 comes twice per epoch and a group of weight 0.5 contributes a seeded half of its
bins, walked through across epochs as samples are in padding mode (`dataset.epoch_indices`). With
all weights equal (the usual case) there is one group and any tasks mix in a bin.

Isolation is the collator's job (`batching.collate_packed`): position ids restart for every
sample, the last token of a sample has no target, and no attention mask is passed, so transformers
builds the block-diagonal causal mask from the position ids. Whether the loaded model's attention
really does is checked on that model before training (`mftcoder.models.packing_check`).

Concat (MFTCoder's stream chunking, for `text` records): a task's samples are joined into one
token stream cut into windows of `seq_length` tokens that overlap by one token, so every token but
the stream's first is a target exactly once; the last, shorter window keeps the tail.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import Issue

# Seeds the order in which samples of equal length are placed.
_PACK_STREAM = 0x5041434B

# Families whose packed forward equals each sample's forward alone (tests/test_packing.py checks
# every one of them with sdpa and eager): their attention takes the mask transformers derives from
# restarting position ids, and position ids drive their position encoding.
ISOLATION_VERIFIED = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "starcoder2", "gpt_bigcode",
    "gpt_neox", "phi3", "gemma2", "gemma3_text", "deepseek_v2", "deepseek_v3",
)  # fmt: skip


@dataclass(frozen=True)
class Bins:
    """Bin b holds the samples `members[offsets[b]:offsets[b + 1]]`; `groups[b]` is its weight group."""

    members: np.ndarray  # int64 sample indices, bin after bin
    offsets: np.ndarray  # int64 [bins + 1]
    groups: np.ndarray  # int64 [bins]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, b: int) -> np.ndarray:
        return self.members[self.offsets[b] : self.offsets[b + 1]]


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: Sequence[int] = ()) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) of at most `capacity` tokens each."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit a bin of {capacity}")
    order = np.random.default_rng([*seed, _PACK_STREAM]).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    spaces: list[int] = []  # the distinct free spaces of open bins, ascending
    open_bins: dict[int, list[int]] = {}  # free space -> the bins with exactly that much
    bins: list[list[int]] = []
    for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        k = bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            same = open_bins[space]
            b = same.pop()
            if not same:
                del open_bins[space], spaces[k]
        else:
            b, space = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        space -= n
        if space:
            if space in open_bins:
                open_bins[space].append(b)
            else:
                open_bins[space] = [b]
                insort(spaces, space)
    return bins


def pack(lengths: np.ndarray, groups: np.ndarray, capacity: int, seed: Sequence[int]) -> Bins:
    """Best-fit decreasing within each group; samples of different groups never share a bin."""
    lengths, groups = np.asarray(lengths, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    members: list[np.ndarray] = []
    bin_groups: list[int] = []
    for group in np.unique(groups).tolist():
        indices = np.flatnonzero(groups == group)
        for b in best_fit_decreasing(lengths[indices], capacity, [*seed, group]):
            members.append(indices[b])
            bin_groups.append(group)
    sizes = np.fromiter((len(m) for m in members), dtype=np.int64, count=len(members))
    return Bins(
        np.concatenate(members) if members else np.zeros(0, dtype=np.int64),
        np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        np.asarray(bin_groups, dtype=np.int64),
    )


def fill_rates(bins: Bins, lengths: np.ndarray, task_ids: np.ndarray, num_tasks: int, capacity: int) -> np.ndarray:
    """Per task: its tokens / the bin capacity charged to it (NaN for a task in no bin).

    A bin's capacity is charged to its samples in proportion to their tokens, so a task's rate is
    that of the bins it shares, and the tasks' rates combine to the overall non-pad fraction.
    """
    bin_of = np.repeat(np.arange(len(bins)), np.diff(bins.offsets))
    member_lengths = np.asarray(lengths, dtype=np.float64)[bins.members]
    bin_tokens = np.bincount(bin_of, weights=member_lengths, minlength=len(bins))[bin_of]
    tasks = np.asarray(task_ids)[bins.members]
    used = np.bincount(tasks, weights=member_lengths, minlength=num_tasks)
    charged = np.bincount(tasks, weights=capacity * member_lengths / np.maximum(bin_tokens, 1), minlength=num_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(charged > 0, used / np.where(charged > 0, charged, 1), np.nan)


def windows(total: int, seq_length: int) -> list[tuple[int, int]]:
    """[start, stop) of the windows over a stream of `total` tokens: `seq_length` tokens each,
    overlapping by one (the last one shorter), so that tokens 1..total-1 are each a target once."""
    return [(start, min(start + seq_length, total)) for start in range(0, total - 1, seq_length - 1)]


def packing_issues(model_type: str, config: TrainConfig) -> list[Issue]:
    """Pack mode on a model whose sample isolation is not verified is refused."""
    if config.padding_mode != "pack" or model_type in ISOLATION_VERIFIED:
        return []
    return [
        Issue(
            "padding_mode",
            f"pack: sample isolation is verified for {', '.join(ISOLATION_VERIFIED)}, not for {model_type} "
            "(its attention may ignore position ids and let packed samples see each other); use "
            "padding_mode: padding",
        )
    ]
