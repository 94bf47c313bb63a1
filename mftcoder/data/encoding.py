"""Records -> samples: seeded split, rendering, tokenizing, length policy, per-task counts, cached.

Per task: read the records (bad ones raised or counted), split them with `seed` and the task name,
render and tokenize every split, apply the length policy, and count everything in a `TaskReport`.
Every record read ends up in exactly one of: bad, dropped, a train, valid or test sample. The test
split (a third `data_split` fraction) is held out: training never reads it, `mftcoder eval --run
--split test` does. It goes through the same policies (a bad or over-long test record stops the
run under `error` like any other), but is counted in its own fields of the report, so that the
counts of what training uses do not depend on whether there is one.

Length policy for a sample longer than `seq_length` (`overlength`): `drop` it, stop with an
`error`, or `truncate` it:
  1. keep the longest run of whole leading rounds (a round ends with an assistant turn; a trailing
     unanswered user turn goes first) that fits, so that every kept target sees its true history;
  2. if the first round alone does not fit, cut its prompt (system and user turn) from the left,
     keeping at least one prompt token;
  3. if the answer alone does not fit, keep its beginning (the EOS is then lost).
A plain-text record keeps its first `seq_length` tokens. A truncated sample always keeps at least
one target. In concat mode there is no length limit: the stream is cut into windows anyway.

A preference record (training_stage dpo or orpo) becomes a pair of samples, the chosen and the rejected
conversation, each scored on its last assistant turn only (the response). The pair is kept, dropped,
refused or truncated as a whole, by its longer sample; `truncate` cuts the same number of tokens from
the left of both (their shared prompt), then, if one response alone does not fit, keeps the first
`seq_length` tokens from one prompt token on.

Encoding depends only on the data files, the tokenizer, the template and the data options, so its
result is cached (`mftcoder.data.cache`) and runs as a parallel `datasets.map`; what depends on
the rest of the config is assembly's (`mftcoder.data.dataset`), redone by every run.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mftcoder.config.schema import TrainConfig
from mftcoder.data import cache
from mftcoder.data.formats import BadRecord
from mftcoder.data.records import EXAMPLES, BadRecords, Record, as_source, read_task
from mftcoder.data.sample import Sample, TaskReport
from mftcoder.data.tasks import task_name
from mftcoder.data.template import Rendered, Renderer, render_record, tokenize
from mftcoder.errors import DataError


def _note(examples: list[str], text: str) -> None:
    if len(examples) < EXAMPLES:
        examples.append(text)


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


def _first_target(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask[1:])[0]) + 1


def truncate_pair(chosen: tuple, rejected: tuple, seq_length: int) -> tuple[tuple, tuple, str]:
    """A pair ((ids, mask) each) whose longer sample exceeds `seq_length`, cut by the policy in the module
    docstring: the same leading tokens of both (their shared prompt), keeping at least one prompt token."""
    first = min(_first_target(chosen[1]), _first_target(rejected[1]))
    excess = max(len(chosen[0]), len(rejected[0])) - seq_length
    if excess < first:
        cut = slice(excess, None)
        how = f"prompt cut by {excess} tokens"
    else:
        cut = slice(first - 1, first - 1 + seq_length)
        how = "prompt cut to 1 token, responses cut to fit"
    return (chosen[0][cut], chosen[1][cut]), (rejected[0][cut], rejected[1][cut]), how


def _response_only(rendered: Rendered) -> Rendered:
    """Only the last assistant turn (the response) is a target."""
    return Rendered(rendered.text, rendered.supervised[-1:], rendered.turn_ends)


def encode_pairs(
    records: Sequence[Record], tokenizer, chat: Renderer, seq_length: int, overlength: str
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str]]:
    """(chosen ids, mask, rejected ids, mask, outcome, note) per preference record, as `encode_batch`."""
    outcomes: list = [None] * len(records)
    rendered, kept = [], []
    for k, record in enumerate(records):
        try:
            pair = [render_record(chat, Record(m, record.source)) for m in (record.messages, record.rejected)]
        except BadRecord as err:
            outcomes[k] = (*_NOTHING, *_NOTHING, BAD, f"{record.source}: {err}")
            continue
        rendered += [_response_only(r) for r in pair]
        kept.append(k)
    tokens = tokenize(tokenizer, rendered)
    for k, chosen, rejected in zip(kept, tokens[0::2], tokens[1::2], strict=True):
        source = records[k].source
        longest = max(len(chosen[0]), len(rejected[0]))
        side = next((name for name, s in (("chosen", chosen), ("rejected", rejected)) if not s[1][1:].any()), None)
        if side is not None:
            outcomes[k] = (*_NOTHING, *_NOTHING, BAD, f"{source}: {side}: the rendered response has no target token")
        elif longest <= seq_length:
            outcomes[k] = (*chosen, *rejected, KEPT, "")
        elif overlength == "error":
            problem = f"{source}: {longest} tokens > seq_length {seq_length} (overlength: error)"
            outcomes[k] = (
                *_NOTHING,
                *_NOTHING,
                TOO_LONG,
                f"{problem}; raise seq_length, or set overlength: drop or truncate",
            )
        elif overlength == "drop":
            outcomes[k] = (*_NOTHING, *_NOTHING, DROPPED, f"{source}: {longest} tokens > seq_length {seq_length}")
        else:
            chosen, rejected, how = truncate_pair(chosen, rejected, seq_length)
            note = f"{source}: {longest} -> {max(len(chosen[0]), len(rejected[0]))} tokens ({how})"
            outcomes[k] = (*chosen, *rejected, TRUNCATED, note)
    return outcomes


def _encode_rows(
    batch: dict, tokenizer, chat: Renderer, seq_length: int, overlength: str | None, preference: bool = False
) -> dict:
    """`encode_batch` (or `encode_pairs`) as a batched `datasets.map` function."""
    columns = zip(batch["messages"], batch["source"], batch["text"], batch["rejected"], strict=True)
    records = [Record(m, s, t, rejected=r) for m, s, t, r in columns]
    if preference:
        encoded = encode_pairs(records, tokenizer, chat, seq_length, overlength)
    else:
        encoded = [
            (ids, mask, *_NOTHING, o, n)
            for ids, mask, o, n in encode_batch(records, tokenizer, chat, seq_length, overlength)
        ]
    return {
        "input_ids": [e[0] for e in encoded],
        "loss_mask": [e[1] for e in encoded],
        "rejected_ids": [e[2] for e in encoded],
        "rejected_mask": [e[3] for e in encoded],
        "outcome": [e[4] for e in encoded],
        "note": [e[5] for e in encoded],
        "targets": [int(e[1][1:].sum() + e[3][1:].sum()) for e in encoded],
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

    preference = config.training_stage != "sft"
    kept_columns = PAIR_COLUMNS if preference else SAMPLE_COLUMNS
    if not records:  # map would not run at all, and so not add its columns
        features = cache.encoded_features()
        return datasets.Dataset.from_dict(
            {k: [] for k in kept_columns}, features=datasets.Features({k: features[k] for k in kept_columns})
        )
    table = datasets.Dataset.from_dict(
        {
            "messages": [r.messages for r in records],
            "source": [r.source for r in records],
            "text": [r.text for r in records],
            "rejected": [r.rejected for r in records],
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
            "preference": preference,
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
    lengths = lengths + pc.list_value_length(columns.column("rejected_ids")).to_numpy()
    rep.tokens += int(lengths[kept].sum())
    rep.supervised_tokens += int(columns.column("targets").to_numpy()[kept].sum())
    return encoded.select(kept).select_columns(list(kept_columns))


def encode_tasks(config: TrainConfig, tokenizer, chat: Renderer, scratch: Path) -> tuple[dict, dict]:
    """Every task read, split and encoded: ({"reports": [TaskReport as a dict per task]},
    {"<task index>/train", "/valid" and, with a test fraction, "/test": datasets.Dataset}), what the
    cache stores."""
    reports, tables = [], {}
    for task_id, entry in enumerate(config.data_paths):
        source = as_source(entry)
        bad = BadRecords(config.on_bad_record)
        loaded = read_task(source, bad, preference=config.training_stage != "sft")
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
        if len(parts) > 2:
            held, held_bad = TaskReport(), BadRecords(config.on_bad_record)
            where = scratch / f"{task_id}-test"
            tables[f"{task_id}/test"] = encode_split(parts[2], tokenizer, chat, config, held, held_bad, where)
            rep.test_bad, rep.test_dropped, rep.test_truncated = held_bad.count, held.dropped_overlength, held.truncated
        reports.append(asdict(rep))
    return {"reports": reports}, tables


# The columns of a stored split: a sample per row, or a preference pair per row.
SAMPLE_COLUMNS = ("input_ids", "loss_mask")
PAIR_COLUMNS = ("input_ids", "loss_mask", "rejected_ids", "rejected_mask")


def samples_of(table, task_id: int, columns: tuple[str, str] = SAMPLE_COLUMNS) -> list[Sample]:
    """The rows of a stored split as samples whose arrays are views of its memory-mapped Arrow data."""
    samples = []
    ids_column, mask_column = (table.data.column(name).chunks for name in columns)
    for ids, mask in zip(ids_column, mask_column, strict=True):
        id_values, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
        mask_values, mask_offsets = mask.values.to_numpy(), mask.offsets.to_numpy()
        samples += [
            Sample(id_values[a:b], mask_values[c:d], task_id)
            for a, b, c, d in zip(id_offsets[:-1], id_offsets[1:], mask_offsets[:-1], mask_offsets[1:], strict=True)
        ]
    return samples


def load_encoded(
    config: TrainConfig, tokenizer, chat: Renderer
) -> tuple[list[TaskReport], list[tuple[list[Sample], list[Sample], list[Sample]]], Path]:
    """Every task's report and (train, valid, test) samples from the cache, encoding them first when
    they are not there, and the cache entry they were loaded from. Without a test fraction, test is []."""
    entry = cache.load_or_build(config, tokenizer, chat, lambda scratch: encode_tasks(config, tokenizer, chat, scratch))
    reports = [TaskReport(**rep) for rep in entry.meta["reports"]]
    read = pairs_of if config.training_stage != "sft" else samples_of
    tables = entry.tables
    encoded = [
        (
            read(tables[f"{i}/train"], i),
            read(tables[f"{i}/valid"], i),
            read(tables[f"{i}/test"], i) if f"{i}/test" in tables else [],
        )
        for i in range(len(reports))
    ]
    return reports, encoded, entry.path


def pairs_of(table, task_id: int) -> list[Sample]:
    """The preference pairs of a stored split as samples, chosen then rejected: pair i is samples 2i, 2i + 1."""
    chosen = samples_of(table, task_id, PAIR_COLUMNS[:2])
    rejected = samples_of(table, task_id, PAIR_COLUMNS[2:])
    return [sample for pair in zip(chosen, rejected, strict=True) for sample in pair]
