"""Tasks -> tokenized samples -> seeded train/valid/test split, with every drop counted per task."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from mftcoder.config.schema import TrainConfig
from mftcoder.data.records import Record, read_records
from mftcoder.data.tasks import task_name
from mftcoder.data.template import ChatFormat, tokenize_conversations
from mftcoder.errors import DataError


@dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n], 1 where the token is a training target
    task_id: int


@dataclass
class TaskReport:
    records: int = 0
    train_records: int = 0
    valid_records: int = 0
    test_records: int = 0
    dropped_overlength: int = 0
    train_samples: int = 0
    valid_samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    dropped_examples: list[str] = field(default_factory=list)


@dataclass
class MultiTaskData:
    tasks: list[str]
    train: list[Sample]
    valid: list[Sample]
    report: dict[str, TaskReport]

    def report_dict(self) -> dict:
        return {name: asdict(rep) for name, rep in self.report.items()}


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


def _tokenize(records, tokenizer, chat, task_id, seq_length, report) -> list[Sample]:
    samples = []
    encoded = tokenize_conversations(tokenizer, chat, [r.messages for r in records])
    for record, (ids, mask) in zip(records, encoded, strict=True):
        if len(ids) > seq_length:
            report.dropped_overlength += 1
            if len(report.dropped_examples) < 3:
                report.dropped_examples.append(f"{record.source}: {len(ids)} tokens > seq_length {seq_length}")
            continue
        report.tokens += len(ids)
        report.supervised_tokens += int(mask[1:].sum())
        samples.append(Sample(ids, mask, task_id))
    return samples


def build_datasets(config: TrainConfig, tokenizer, chat: ChatFormat) -> MultiTaskData:
    tasks = [task_name(p) for p in config.data_paths]
    train: list[Sample] = []
    valid: list[Sample] = []
    report: dict[str, TaskReport] = {}
    for task_id, (entry, name) in enumerate(zip(config.data_paths, tasks, strict=True)):
        records = read_records(entry)
        rep = report[name] = TaskReport(records=len(records))
        try:
            parts = split_records(records, config.data_split, config.seed, name)
        except ValueError as err:
            raise DataError(f"{entry}: {err}") from None
        rep.train_records, rep.valid_records = len(parts[0]), len(parts[1])
        rep.test_records = len(parts[2]) if len(parts) > 2 else 0
        task_train = _tokenize(parts[0], tokenizer, chat, task_id, config.seq_length, rep)
        task_valid = _tokenize(parts[1], tokenizer, chat, task_id, config.seq_length, rep)
        if not task_train:
            raise DataError(
                f"{entry}: task '{name}' has no training sample left "
                f"({rep.dropped_overlength} of {len(records)} records exceed seq_length {config.seq_length})"
            )
        if config.valid_fraction > 0 and not task_valid:
            raise DataError(
                f"{entry}: task '{name}' has no validation sample ({len(records)} records, "
                f"data_split {config.data_split}); add records or raise the validation fraction"
            )
        rep.train_samples, rep.valid_samples = len(task_train), len(task_valid)
        train += task_train
        valid += task_valid
    return MultiTaskData(tasks, train, valid, report)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(num_samples / (batch_size * world_size)) / accumulation)
