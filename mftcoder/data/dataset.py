"""Tasks -> records -> samples: seeded split, length policy, per-task report, per-epoch weights.

Per task: read the records (bad ones raised or counted), split them with `seed` and the task name,
render and tokenize the train and valid splits, apply the length policy, and count everything in
a `TaskReport`. Every record read ends up in exactly one of: bad, test split, dropped, a train or
a valid sample.

Length policy for a sample longer than `seq_length` (`overlength`): `drop` it, stop with an
`error`, or `truncate` it:
  1. keep the longest run of whole leading rounds (a round ends with an assistant turn; a trailing
     unanswered user turn goes first) that fits, so that every kept target sees its true history;
  2. if the first round alone does not fit, cut its prompt (system and user turn) from the left,
     keeping at least one prompt token;
  3. if the answer alone does not fit, keep its beginning (the EOS is then lost).
A plain-text record keeps its first `seq_length` tokens. A truncated sample always keeps at least
one target.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from mftcoder.config.schema import TrainConfig
from mftcoder.data.formats import BadRecord
from mftcoder.data.records import EXAMPLES, BadRecords, Record, as_source, read_task
from mftcoder.data.tasks import task_name
from mftcoder.data.template import Rendered, Renderer, render_record, tokenize
from mftcoder.errors import DataError

# Seeds the per-task walk through the fractional share of a sampling weight (see `epoch_indices`).
_WEIGHT_STREAM = 0x57454947


@dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n], 1 where the token is a training target
    task_id: int


@dataclass
class TaskReport:
    path: str = ""
    formats: dict[str, int] = field(default_factory=dict)  # usable records per detected format
    records: int = 0  # read, good and bad
    bad_records: int = 0
    train_records: int = 0  # parsed records per split (rendering may still find some bad)
    valid_records: int = 0
    test_records: int = 0
    dropped_overlength: int = 0
    truncated: int = 0
    train_samples: int = 0
    valid_samples: int = 0
    weight: float = 1.0
    epoch_samples: int = 0  # train samples drawn per epoch, after the sampling weight
    tokens: int = 0  # of the train and valid samples
    supervised_tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)
    dropped_examples: list[str] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)


def _note(examples: list[str], text: str) -> None:
    if len(examples) < EXAMPLES:
        examples.append(text)


@dataclass
class MultiTaskData:
    tasks: list[str]
    train: list[Sample]
    valid: list[Sample]
    report: dict[str, TaskReport]
    weights: list[float] = field(default_factory=list)  # sampling weight per task; empty: all 1

    def report_dict(self) -> dict:
        return {name: asdict(rep) for name, rep in self.report.items()}

    def _task_ids(self) -> np.ndarray:
        return np.fromiter((s.task_id for s in self.train), dtype=np.int64, count=len(self.train))

    @property
    def epoch_size(self) -> int:
        """Train samples per epoch, the same every epoch."""
        counts = np.bincount(self._task_ids(), minlength=len(self.tasks))
        return sum(epoch_count(int(n), w) for n, w in zip(counts, self._weights(), strict=True))

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Indices into `train` for one epoch, shuffled; see `epoch_indices`."""
        return epoch_indices(self._task_ids(), self._weights(), seed, epoch)

    def _weights(self) -> list[float]:
        return self.weights or [1.0] * len(self.tasks)


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


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Records per split; a split with a fraction > 0 gets at least one record when n allows."""
    counts = [0] * len(fractions)
    for i in range(1, len(fractions)):
        if fractions[i] > 0:
            counts[i] = max(1, round(n * fractions[i])) if n > 1 else 0
    counts[0] = n - sum(counts[1:])
    if counts[0] < 1:
        raise ValueError(f"{n} records cannot be split {list(fractions)} with at least one for training")
    return counts


def split_records(records: list[Record], fractions: Sequence[float], seed: int, task: str) -> list[list[Record]]:
    """Seeded per task (the seed and the task name), so adding a task does not move another's split."""
    order = list(range(len(records)))
    random.Random(f"{seed}:{task}").shuffle(order)
    parts, start = [], 0
    for count in split_counts(len(records), fractions):
        parts.append([records[i] for i in sorted(order[start : start + count])])
        start += count
    return parts


def truncate(
    tokenizer, rendered: Rendered, ids: np.ndarray, mask: np.ndarray, seq_length: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """An over-long sample (`rendered`, tokenized as ids and mask) cut to `seq_length` tokens by the
    policy in the module docstring."""
    rounds = len(rendered.turn_ends)
    fitting, one_round = None, (ids, mask)
    lo, hi = 1, rounds
    while lo <= hi:  # binary search: the token count grows with the number of rounds
        mid = (lo + hi) // 2
        ((ids, mask),) = tokenize(tokenizer, [rendered.rounds(mid)])
        if mid == 1:
            one_round = (ids, mask)  # when no prefix fits, the search ends here
        if len(ids) <= seq_length:
            fitting, lo = (ids, mask, mid), mid + 1
        else:
            hi = mid - 1
    if fitting is not None:
        ids, mask, kept = fitting
        return ids, mask, f"kept {kept} of {rounds} rounds"
    ids, mask = one_round
    first_target = int(np.flatnonzero(mask[1:])[0]) + 1
    excess = len(ids) - seq_length
    head = f"kept 1 of {rounds} rounds, " if rounds > 1 else ""
    if excess < first_target:
        return ids[excess:], mask[excess:], f"{head}prompt cut by {excess} tokens"
    start = first_target - 1
    cut = len(ids) - start - seq_length
    what = "kept the first tokens" if not rounds else f"{head}prompt cut to 1 token, answer cut by {cut} tokens"
    return ids[start : start + seq_length], mask[start : start + seq_length], what


def encode_records(
    records: Sequence[Record],
    task_id: int,
    tokenizer,
    chat: Renderer,
    config: TrainConfig,
    rep: TaskReport,
    bad: BadRecords,
) -> list[Sample]:
    """Render, tokenize and length-check records; every outcome is counted in `rep` or `bad`."""
    kept, rendered = [], []
    for record in records:
        try:
            rendered.append(render_record(chat, record))
        except BadRecord as err:
            bad.add(DataError(f"{record.source}: {err}"))
            continue
        kept.append(record)
    samples = []
    for record, r, (ids, mask) in zip(kept, rendered, tokenize(tokenizer, rendered), strict=True):
        if not mask[1:].any():
            bad.add(DataError(f"{record.source}: template: the rendered record has no target token"))
            continue
        if len(ids) > config.seq_length:
            too_long = f"{record.source}: {len(ids)} tokens > seq_length {config.seq_length}"
            if config.overlength == "error":
                raise DataError(
                    f"{too_long} (overlength: error); raise seq_length, or set overlength: drop or truncate"
                )
            if config.overlength == "drop":
                rep.dropped_overlength += 1
                _note(rep.dropped_examples, too_long)
                continue
            before = len(ids)
            ids, mask, how = truncate(tokenizer, r, ids, mask, config.seq_length)
            rep.truncated += 1
            _note(rep.truncated_examples, f"{record.source}: {before} -> {len(ids)} tokens ({how})")
        rep.tokens += len(ids)
        rep.supervised_tokens += int(mask[1:].sum())
        samples.append(Sample(ids, mask, task_id))
    return samples


def build_datasets(config: TrainConfig, tokenizer, chat: Renderer) -> MultiTaskData:
    sources = [as_source(entry) for entry in config.data_paths]
    tasks = [task_name(source) for source in sources]
    train: list[Sample] = []
    valid: list[Sample] = []
    report: dict[str, TaskReport] = {}
    for task_id, (source, name) in enumerate(zip(sources, tasks, strict=True)):
        bad = BadRecords(config.on_bad_record)
        loaded = read_task(source, bad)
        rep = report[name] = TaskReport(
            path=source.path, formats=loaded.formats, records=loaded.read, weight=source.weight
        )
        try:
            parts = split_records(loaded.records, config.data_split, config.seed, name)
        except ValueError as err:
            raise DataError(f"{source.path}: {err}") from None
        rep.train_records, rep.valid_records = len(parts[0]), len(parts[1])
        rep.test_records = len(parts[2]) if len(parts) > 2 else 0
        task_train = encode_records(parts[0], task_id, tokenizer, chat, config, rep, bad)
        task_valid = encode_records(parts[1], task_id, tokenizer, chat, config, rep, bad)
        rep.bad_records, rep.bad_examples = bad.count, bad.examples
        rep.train_samples, rep.valid_samples = len(task_train), len(task_valid)
        rep.epoch_samples = epoch_count(len(task_train), source.weight)
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
    return MultiTaskData(tasks, train, valid, report, [source.weight for source in sources])


def report_table(report: dict[str, TaskReport]) -> str:
    """The per-task data report as printed at the start of a run."""
    columns = ("records", "bad", "train", "valid", "dropped", "truncated", "per_epoch", "tokens", "targets")
    lines = [f"{'task':<28}" + "".join(f"{c:>10}" for c in columns)]
    for name, rep in report.items():
        values = (
            rep.records,
            rep.bad_records,
            rep.train_samples,
            rep.valid_samples,
            rep.dropped_overlength,
            rep.truncated,
            rep.epoch_samples,
            rep.tokens,
            rep.supervised_tokens,
        )
        lines.append(f"{name:<28}" + "".join(f"{v:>10}" for v in values))
        quoted = {"bad": rep.bad_examples, "dropped": rep.dropped_examples, "truncated": rep.truncated_examples}
        lines += [f"  {label}: {example}" for label, examples in quoted.items() for example in examples]
    return "\n".join(lines)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(num_samples / (batch_size * world_size)) / accumulation)
