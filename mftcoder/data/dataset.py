"""Encoded tasks -> the run's data: sampling weights, concat windows or pack bins, the data report.

Assembly is redone by every run from the cached encoding (`mftcoder.data.encoding`): sampling
weights, the checks that depend on the rest of the config, concat windows and pack bins
(`mftcoder.data.packing`), which are cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mftcoder.config.schema import TrainConfig
from mftcoder.data import packing
from mftcoder.data.batching import Split
from mftcoder.data.encoding import load_encoded
from mftcoder.data.records import as_source
from mftcoder.data.sample import Sample, TaskReport
from mftcoder.data.tasks import task_name
from mftcoder.data.template import Renderer
from mftcoder.errors import DataError

# Seeds the per-task walk through the fractional share of a sampling weight (see `epoch_indices`).
_WEIGHT_STREAM = 0x57454947


@dataclass
class MultiTaskData:
    tasks: list[str]
    train: Split  # a plain list of samples is taken as a split of one sample per unit
    valid: Split
    report: dict[str, TaskReport]
    weights: list[float] = field(default_factory=list)  # sampling weight per task; empty: all 1
    cache: Path | None = None  # the cache entry the encoded samples were loaded from
    test: Split | None = None  # the held-out split, when data_split has a test fraction; training never reads it

    def __post_init__(self) -> None:
        self.train, self.valid = (s if isinstance(s, Split) else Split(list(s)) for s in (self.train, self.valid))

    def report_dict(self) -> dict:
        return {name: asdict(rep) for name, rep in self.report.items()}

    def _task_ids(self) -> np.ndarray:
        return np.fromiter((s.task_id for s in self.train), dtype=np.int64, count=len(self.train))

    def _units(self) -> tuple[np.ndarray, list[float]]:
        """The weight group of every train unit and the groups' weights: each task is a group of
        samples or, in pack mode, the tasks of one weight are a group of bins."""
        if self.train.bins is None:
            return self._task_ids(), self._weights()
        return self.train.bins.groups, weight_groups(self._weights())[1]

    @property
    def epoch_size(self) -> int:
        """Train units (samples, or bins in pack mode) per epoch, the same every epoch."""
        groups, weights = self._units()
        counts = np.bincount(groups, minlength=len(weights))
        return sum(epoch_count(int(n), w) for n, w in zip(counts, weights, strict=True))

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Indices of train units for one epoch, shuffled; see `epoch_indices`."""
        return epoch_indices(*self._units(), seed, epoch)

    def _weights(self) -> list[float]:
        return self.weights or [1.0] * len(self.tasks)


def weight_groups(weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """Tasks of equal sampling weight form a group: the group of each task, and each group's weight."""
    distinct = sorted(set(weights))
    return [distinct.index(w) for w in weights], distinct


def _share(n: int, weight: float) -> tuple[int, int]:
    """A task of n samples at `weight`: each sample `whole` times, plus `extra` drawn (round half up)."""
    whole = math.floor(weight)
    return whole, math.floor((weight - whole) * n + 0.5)


def epoch_count(n: int, weight: float) -> int:
    whole, extra = _share(n, weight)
    return whole * n + extra


def epoch_indices(task_ids: np.ndarray, weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """The train sample indices of one epoch, shuffled: a pure function of (seed, epoch).

    Task t's samples appear floor(w_t) times each, plus round(frac(w_t) * n_t) more taken from a
    fixed seeded permutation of the task that successive epochs walk through, so every sample is
    used before any is reused (two epochs at 0.5 see every sample once). With all weights 1 this is
    a permutation of range(n). Validation is never weighted.
    """
    parts = []
    for task, weight in enumerate(weights):
        members = np.flatnonzero(task_ids == task)
        whole, extra = _share(len(members), weight)
        parts += [members] * whole
        if extra:
            walk = np.random.default_rng([seed, _WEIGHT_STREAM, task]).permutation(members)
            parts.append(walk[np.arange(epoch * extra, (epoch + 1) * extra) % len(members)])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(order)


def concat_windows(samples: Sequence[Sample], seq_length: int) -> list[Sample]:
    """One task's samples joined into a stream and cut into overlapping windows (`packing.windows`)."""
    if not samples:
        return []
    ids = np.concatenate([s.input_ids for s in samples])
    mask = np.concatenate([s.loss_mask for s in samples])
    task = samples[0].task_id
    return [Sample(ids[a:b], mask[a:b], task) for a, b in packing.windows(len(ids), seq_length)]


def pair_bins(samples: Sequence[Sample], groups: Sequence[int]) -> packing.Bins:
    """Preference pairs as units: samples 2i (chosen) and 2i + 1 (rejected) are unit i."""
    pairs = len(samples) // 2
    members = np.arange(2 * pairs, dtype=np.int64)
    offsets = np.arange(0, 2 * pairs + 1, 2, dtype=np.int64)
    return packing.Bins(members, offsets, np.asarray([groups[s.task_id] for s in samples[0::2]], dtype=np.int64))


def _arrange(config: TrainConfig, samples: list[Sample], groups: Sequence[int], stream: int, flat: bool) -> Split:
    """A split's units: its samples, preference pairs, or in pack mode bins of samples (samples of
    different weight groups never share a bin), in the flat layout when `flat`."""
    if config.training_stage != "sft":
        return Split(samples, pair_bins(samples, groups), paired=True)
    if config.padding_mode != "pack":
        return Split(samples)
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
    sample_groups = np.fromiter((groups[s.task_id] for s in samples), dtype=np.int64, count=len(samples))
    bins = packing.pack(lengths, sample_groups, config.seq_length, [config.seed, stream])
    return Split(samples, bins, flatten=flat)


def _fill_rates(config: TrainConfig, train: Split, reports: list[TaskReport]) -> None:
    if config.padding_mode == "padding" or not len(train):
        return
    lengths = np.fromiter((len(s.input_ids) for s in train), dtype=np.int64, count=len(train))
    task_ids = np.fromiter((s.task_id for s in train), dtype=np.int64, count=len(train))
    if train.bins is None:  # concat: each window is a row of its own
        rows = packing.Bins(np.arange(len(train)), np.arange(len(train) + 1), np.zeros(len(train), dtype=np.int64))
    else:
        rows = train.bins
    rates = packing.fill_rates(rows, lengths, task_ids, len(reports), config.seq_length)
    for rep, rate in zip(reports, rates.tolist(), strict=True):
        rep.fill_rate = round(rate, 4)


def assemble(
    config: TrainConfig,
    reports: list[TaskReport],
    encoded: list[tuple[list[Sample], list[Sample], list[Sample]]],
    *,
    flat: bool = False,
) -> MultiTaskData:
    """The run's data from the encoded tasks: sampling weights, the checks that depend on the whole
    config, concat windows or pack bins (in the flat layout when `flat`), fill rates."""
    sources = [as_source(entry) for entry in config.data_paths]
    tasks = [task_name(source) for source in sources]
    train: list[Sample] = []
    valid: list[Sample] = []
    test: list[Sample] = []
    for source, name, rep, (task_train, task_valid, task_test) in zip(sources, tasks, reports, encoded, strict=True):
        rep.weight = source.weight
        if config.padding_mode == "concat":
            if other := {f: n for f, n in rep.formats.items() if f != "text"}:
                found = ", ".join(f"{n} {f}" for f, n in other.items())
                raise DataError(
                    f"{source.path}: padding_mode: concat streams plain text (continued pre-training), but task "
                    f"'{name}' has {found} records; use padding_mode: pack (whole conversations, isolated) or padding"
                )
            task_train = concat_windows(task_train, config.seq_length)
            task_valid = concat_windows(task_valid, config.seq_length)
            task_test = concat_windows(task_test, config.seq_length)
        per_unit = 2 if config.training_stage != "sft" else 1  # a preference pair is two samples
        rep.train_samples, rep.valid_samples = len(task_train) // per_unit, len(task_valid) // per_unit
        rep.test_samples = len(task_test) // per_unit
        rep.epoch_samples = epoch_count(rep.train_samples, source.weight)
        if not task_train:
            raise DataError(
                f"{source.path}: task '{name}' has no training sample left: its {rep.train_records} train records "
                f"are all bad or longer than seq_length {config.seq_length} (overlength: {config.overlength})"
            )
        if not rep.epoch_samples:
            raise DataError(
                f"{source.path}: task '{name}': weight {source.weight:g} of {len(task_train)} train samples "
                "draws none per epoch; raise its weight"
            )
        if config.valid_fraction > 0 and not task_valid:
            users = ", ".join([*config.validation_users, "the final evaluation"])
            raise DataError(
                f"{source.path}: task '{name}' has no validation sample (data_split {config.data_split} gave "
                f"its validation split {rep.valid_records} records, none usable); validation is used by {users}: "
                "add records or raise the validation fraction"
            )
        train += task_train
        valid += task_valid
        test += task_test
    weights = [source.weight for source in sources]
    groups, _ = weight_groups(weights)
    unweighted = [0] * len(tasks)  # validation and test are not weighted: one group
    data = MultiTaskData(
        tasks,
        _arrange(config, train, groups, stream=0, flat=flat),
        _arrange(config, valid, unweighted, stream=1, flat=flat),
        dict(zip(tasks, reports, strict=True)),
        weights,
        test=_arrange(config, test, unweighted, stream=2, flat=flat) if config.held_out_fraction > 0 else None,
    )
    _fill_rates(config, data.train, reports)
    return data


def build_datasets(config: TrainConfig, tokenizer, chat: Renderer, *, flat: bool = False) -> MultiTaskData:
    """Encoded tasks from the cache (encoding them first when they are not there), assembled.

    `flat`: in pack mode, the flat one-row-per-micro-batch layout with explicit sequence lengths
    that flash-attention-2 needs.
    """
    reports, encoded, entry = load_encoded(config, tokenizer, chat)
    data = assemble(config, reports, encoded, flat=flat)
    data.cache = entry
    return data


def report_table(report: dict[str, TaskReport]) -> str:
    """The per-task data report as printed at the start of a run."""
    held_out = any(rep.test_records for rep in report.values())
    columns = ("records", "bad", "train", "valid", *(("test",) if held_out else ()), "dropped", "truncated")
    columns += ("per_epoch", "tokens", "targets")
    fill = any(rep.fill_rate is not None for rep in report.values())  # pack and concat modes
    lines = [f"{'task':<28}" + "".join(f"{c:>10}" for c in columns) + (f"{'fill':>8}" if fill else "")]
    for name, rep in report.items():
        values = (
            rep.records,
            rep.bad_records,
            rep.train_samples,
            rep.valid_samples,
            *((rep.test_samples,) if held_out else ()),
            rep.dropped_overlength,
            rep.truncated,
            rep.epoch_samples,
            rep.tokens,
            rep.supervised_tokens,
        )
        rate = f"{rep.fill_rate:>8.1%}" if rep.fill_rate is not None else ""
        lines.append(f"{name:<28}" + "".join(f"{v:>10}" for v in values) + rate)
        quoted = {"bad": rep.bad_examples, "dropped": rep.dropped_examples, "truncated": rep.truncated_examples}
        lines += [f"  {label}: {example}" for label, examples in quoted.items() for example in examples]
    return "\n".join(lines)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(num_samples / (batch_size * world_size)) / accumulation)
