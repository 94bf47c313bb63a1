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
one target. In concat mode there is no length limit: the stream is cut into windows anyway.

Two phases. Encoding (read, split, render, tokenize, length policy; `encode_tasks`) depends only on
the data files, the tokenizer, the template and the data options, so its result is cached
(`mftcoder.data.cache`) and runs as a parallel `datasets.map`. Assembly (`assemble`) is redone by
every run: sampling weights, the checks that depend on the rest of the config, concat windows and
pack bins (`mftcoder.data.packing`), which are cheap.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mftcoder.config.schema import TrainConfig
from mftcoder.data import cache, packing
from mftcoder.data.batching import Split
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
    fill_rate: float | None = None  # pack and concat: train tokens / the row capacity they take (see packing)
    bad_examples: list[str] = field(default_factory=list)
    dropped_examples: list[str] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)


def _note(examples: list[str], text: str) -> None:
    if len(examples) < EXAMPLES:
        examples.append(text)


@dataclass
class MultiTaskData:
    tasks: list[str]
    train: Split  # a plain list of samples is taken as a split of one sample per unit
    valid: Split
    report: dict[str, TaskReport]
    weights: list[float] = field(default_factory=list)  # sampling weight per task; empty: all 1
    cache: Path | None = None  # the cache entry the encoded samples were loaded from

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


# What encoding made of a record (the `outcome` column); `collect` counts them in record order.
KEPT, TRUNCATED, DROPPED, BAD, TOO_LONG = range(5)
_NOTHING = (np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint8))
# `num_proc: null` starts one tokenizing process per this many records, at most one per core.
RECORDS_PER_PROCESS = 1000


def encode_batch(
    records: Sequence[Record], tokenizer, chat: Renderer, seq_length: int, overlength: str | None
) -> list[tuple[np.ndarray, np.ndarray, int, str]]:
    """(ids, mask, outcome, note) per record: rendered, tokenized and length-checked, nothing raised
    nor counted (`collect` does that), so that the workers of a parallel map can run it.
    `overlength` None: no length limit (concat mode)."""
    outcomes: list = [None] * len(records)
    rendered, kept = [], []
    for k, record in enumerate(records):
        try:
            rendered.append(render_record(chat, record))
            kept.append(k)
        except BadRecord as err:
            outcomes[k] = (*_NOTHING, BAD, f"{record.source}: {err}")
    for k, r, (ids, mask) in zip(kept, rendered, tokenize(tokenizer, rendered), strict=True):
        source = records[k].source
        if not mask[1:].any():
            outcomes[k] = (*_NOTHING, BAD, f"{source}: template: the rendered record has no target token")
        elif overlength is None or len(ids) <= seq_length:
            outcomes[k] = (ids, mask, KEPT, "")
        elif overlength == "error":
            problem = f"{source}: {len(ids)} tokens > seq_length {seq_length} (overlength: error)"
            outcomes[k] = (*_NOTHING, TOO_LONG, f"{problem}; raise seq_length, or set overlength: drop or truncate")
        elif overlength == "drop":
            outcomes[k] = (*_NOTHING, DROPPED, f"{source}: {len(ids)} tokens > seq_length {seq_length}")
        else:
            cut_ids, cut_mask, how = truncate(tokenizer, r, ids, mask, seq_length)
            outcomes[k] = (cut_ids, cut_mask, TRUNCATED, f"{source}: {len(ids)} -> {len(cut_ids)} tokens ({how})")
    return outcomes


def _encode_rows(batch: dict, tokenizer, chat: Renderer, seq_length: int, overlength: str | None) -> dict:
    """`encode_batch` as a batched `datasets.map` function."""
    records = [Record(m, s, t) for m, s, t in zip(batch["messages"], batch["source"], batch["text"], strict=True)]
    encoded = encode_batch(records, tokenizer, chat, seq_length, overlength)
    return {
        "input_ids": [ids for ids, _, _, _ in encoded],
        "loss_mask": [mask for _, mask, _, _ in encoded],
        "outcome": [outcome for _, _, outcome, _ in encoded],
        "note": [note for _, _, _, note in encoded],
        "targets": [int(mask[1:].sum()) for _, mask, _, _ in encoded],
    }


def collect(outcomes: np.ndarray, notes: Sequence[str], rep: TaskReport, bad: BadRecords) -> np.ndarray:
    """Count the outcomes in record order: a bad record raises (on_bad_record: error) or is counted,
    an over-long one under overlength: error raises. Returns the rows that became samples."""
    for row in np.flatnonzero(outcomes != KEPT).tolist():
        outcome, note = outcomes[row], notes[row]
        if outcome == BAD:
            bad.add(DataError(note))
        elif outcome == TOO_LONG:
            raise DataError(note)
        elif outcome == DROPPED:
            rep.dropped_overlength += 1
            _note(rep.dropped_examples, note)
        else:
            rep.truncated += 1
            _note(rep.truncated_examples, note)
    return np.flatnonzero((outcomes == KEPT) | (outcomes == TRUNCATED))


def _processes(config: TrainConfig, records: int) -> int:
    if config.num_proc is not None:
        return max(1, min(config.num_proc, records))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, records // RECORDS_PER_PROCESS))


def encode_split(
    records: Sequence[Record],
    tokenizer,
    chat: Renderer,
    config: TrainConfig,
    rep: TaskReport,
    bad: BadRecords,
    scratch: Path,
):
    """The samples of one split as a `datasets.Dataset` (input_ids, loss_mask), tokenized by a
    parallel `map` that writes under `scratch`; outcomes are counted in `rep` and `bad`."""
    import datasets  # slow to import; only encoding needs it
    import pyarrow.compute as pc

    if not records:  # map would not run at all, and so not add its columns
        features = cache.encoded_features()
        return datasets.Dataset.from_dict(
            {"input_ids": [], "loss_mask": []},
            features=datasets.Features({k: features[k] for k in ("input_ids", "loss_mask")}),
        )
    table = datasets.Dataset.from_dict(
        {
            "messages": [r.messages for r in records],
            "source": [r.source for r in records],
            "text": [r.text for r in records],
        },
        features=cache.record_features(),
    )
    scratch.mkdir(parents=True, exist_ok=True)
    processes = _processes(config, len(records))
    encoded = table.map(
        _encode_rows,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "chat": chat,
            "seq_length": config.seq_length,
            "overlength": None if config.padding_mode == "concat" else config.overlength,
        },
        remove_columns=table.column_names,
        features=cache.encoded_features(),
        num_proc=processes if processes > 1 else None,
        cache_file_name=str(scratch / "encoded.arrow"),
        load_from_cache_file=False,
        # The cache key already identifies the work; this spares datasets hashing the tokenizer.
        new_fingerprint=hashlib.sha256(str(scratch).encode()).hexdigest()[:32],
        desc=f"tokenizing {scratch.name}",
    )
    columns = encoded.data
    kept = collect(columns.column("outcome").to_numpy(), columns.column("note").to_pylist(), rep, bad)
    lengths = pc.list_value_length(columns.column("input_ids")).to_numpy()
    rep.tokens += int(lengths[kept].sum())
    rep.supervised_tokens += int(columns.column("targets").to_numpy()[kept].sum())
    return encoded.select(kept).select_columns(["input_ids", "loss_mask"])


def encode_tasks(config: TrainConfig, tokenizer, chat: Renderer, scratch: Path) -> tuple[dict, dict]:
    """Every task read, split and encoded: ({"reports": [TaskReport as a dict per task]},
    {"<task index>/train" and "/valid": datasets.Dataset}), what the cache stores."""
    reports, tables = [], {}
    for task_id, entry in enumerate(config.data_paths):
        source = as_source(entry)
        bad = BadRecords(config.on_bad_record)
        loaded = read_task(source, bad)
        rep = TaskReport(path=source.path, formats=loaded.formats, records=loaded.read)
        name = task_name(source)
        try:
            parts = split_records(loaded.records, config.data_split, config.seed, name)
        except ValueError as err:
            raise DataError(f"{source.path}: {err}") from None
        rep.train_records, rep.valid_records = len(parts[0]), len(parts[1])
        rep.test_records = len(parts[2]) if len(parts) > 2 else 0
        for split, records in (("train", parts[0]), ("valid", parts[1])):
            where = scratch / f"{task_id}-{split}"
            tables[f"{task_id}/{split}"] = encode_split(records, tokenizer, chat, config, rep, bad, where)
        rep.bad_records, rep.bad_examples = bad.count, bad.examples
        reports.append(asdict(rep))
    return {"reports": reports}, tables


def samples_of(table, task_id: int) -> list[Sample]:
    """The rows of a stored split as samples whose arrays are views of its memory-mapped Arrow data."""
    samples = []
    for ids, mask in zip(table.data.column("input_ids").chunks, table.data.column("loss_mask").chunks, strict=True):
        id_values, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
        mask_values, mask_offsets = mask.values.to_numpy(), mask.offsets.to_numpy()
        samples += [
            Sample(id_values[a:b], mask_values[c:d], task_id)
            for a, b, c, d in zip(id_offsets[:-1], id_offsets[1:], mask_offsets[:-1], mask_offsets[1:], strict=True)
        ]
    return samples


def concat_windows(samples: Sequence[Sample], seq_length: int) -> list[Sample]:
    """One task's samples joined into a stream and cut into overlapping windows (`packing.windows`)."""
    if not samples:
        return []
    ids = np.concatenate([s.input_ids for s in samples])
    mask = np.concatenate([s.loss_mask for s in samples])
    task = samples[0].task_id
    return [Sample(ids[a:b], mask[a:b], task) for a, b in packing.windows(len(ids), seq_length)]


def _arrange(config: TrainConfig, samples: list[Sample], groups: Sequence[int], stream: int) -> Split:
    """A split's units: its samples, or in pack mode bins of them (samples of different weight
    groups never share a bin)."""
    if config.padding_mode != "pack":
        return Split(samples)
    from mftcoder.models.loading import attention_implementation  # loads transformers and peft

    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
    sample_groups = np.fromiter((groups[s.task_id] for s in samples), dtype=np.int64, count=len(samples))
    bins = packing.pack(lengths, sample_groups, config.seq_length, [config.seed, stream])
    # The model family only decides between sdpa and eager; flash-attention needs the flat layout.
    flat = attention_implementation(config.attn_implementation, "") == "flash_attention_2"
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
    config: TrainConfig, reports: list[TaskReport], encoded: list[tuple[list[Sample], list[Sample]]]
) -> MultiTaskData:
    """The run's data from the encoded tasks: sampling weights, the checks that depend on the whole
    config, concat windows or pack bins, fill rates."""
    sources = [as_source(entry) for entry in config.data_paths]
    tasks = [task_name(source) for source in sources]
    train: list[Sample] = []
    valid: list[Sample] = []
    for source, name, rep, (task_train, task_valid) in zip(sources, tasks, reports, encoded, strict=True):
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
    weights = [source.weight for source in sources]
    groups, _ = weight_groups(weights)
    data = MultiTaskData(
        tasks,
        _arrange(config, train, groups, stream=0),
        _arrange(config, valid, [0] * len(tasks), stream=1),  # validation is not weighted: one group
        dict(zip(tasks, reports, strict=True)),
        weights,
    )
    _fill_rates(config, data.train, reports)
    return data


def build_datasets(config: TrainConfig, tokenizer, chat: Renderer) -> MultiTaskData:
    """Encoded tasks from the cache (encoding them first when they are not there), assembled."""
    entry = cache.load_or_build(config, tokenizer, chat, lambda scratch: encode_tasks(config, tokenizer, chat, scratch))
    reports = [TaskReport(**rep) for rep in entry.meta["reports"]]
    encoded = [
        (samples_of(entry.tables[f"{i}/train"], i), samples_of(entry.tables[f"{i}/valid"], i))
        for i in range(len(reports))
    ]
    data = assemble(config, reports, encoded)
    data.cache = entry.path
    return data


def report_table(report: dict[str, TaskReport]) -> str:
    """The per-task data report as printed at the start of a run."""
    columns = ("records", "bad", "train", "valid", "dropped", "truncated", "per_epoch", "tokens", "targets")
    fill = any(rep.fill_rate is not None for rep in report.values())  # pack and concat modes
    lines = [f"{'task':<28}" + "".join(f"{c:>10}" for c in columns) + (f"{'fill':>8}" if fill else "")]
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
        rate = f"{rep.fill_rate:>8.1%}" if rep.fill_rate is not None else ""
        lines.append(f"{name:<28}" + "".join(f"{v:>10}" for v in values) + rate)
        quoted = {"bad": rep.bad_examples, "dropped": rep.dropped_examples, "truncated": rep.truncated_examples}
        lines += [f"  {label}: {example}" for label, examples in quoted.items() for example in examples]
    return "\n".join(lines)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(num_samples / (batch_size * world_size)) / accumulation)
