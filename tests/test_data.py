"""Records, splits, sharding and collation."""

import json

import numpy as np
import pytest
import torch

from mftcoder.data.batching import collate, epoch_order, rank_micro_batches
from mftcoder.data.dataset import Sample, build_datasets, split_counts, split_records, steps_per_epoch
from mftcoder.data.records import Record, parse_chat_rounds, read_records
from mftcoder.data.tasks import task_files, task_name
from mftcoder.errors import DataError

pytestmark = pytest.mark.unit


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = {"chat_rounds": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}]}


def test_roles_are_canonicalised():
    rounds = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "gpt", "content": "a"},
        {"role": "human", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    messages = parse_chat_rounds({"chat_rounds": rounds, "id": 3}, "f:1")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"messages": []}, "chat_rounds", "missing (the record has keys: messages)"),
        ({"chat_rounds": "hi"}, "chat_rounds", "non-empty list"),
        ({"chat_rounds": [{"role": "robot", "content": "x"}]}, "chat_rounds[0].role", "unknown role 'robot'"),
        ({"chat_rounds": [{"role": "human", "content": None}]}, "chat_rounds[0].content", "must be a string, got NoneType"),
        ({"chat_rounds": [{"role": "human", "content": 3}]}, "chat_rounds[0].content", "got int"),
        ({"chat_rounds": [{"role": "bot", "content": "x"}]}, "chat_rounds[0].role", "expected the user turn here"),
        ({"chat_rounds": [{"role": "human", "content": "a"}, {"role": "human", "content": "b"}]}, "chat_rounds[1].role", "expected the assistant turn"),
        ({"chat_rounds": [{"role": "human", "content": "a"}]}, "chat_rounds", "no assistant turn"),
        ({"chat_rounds": [{"role": "human", "content": "a"}, {"role": "bot", "content": ""}]}, "chat_rounds[1].content", "empty assistant"),
        ({"chat_rounds": [GOOD["chat_rounds"][0], {"role": "system", "content": "late"}]}, "chat_rounds[1].role", "may only come first"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, record, field, problem):
    path = write_lines(tmp_path / "task.jsonl", [json.dumps(GOOD), "", json.dumps(record)])
    with pytest.raises(DataError) as excinfo:
        read_records(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}:3: {field}: ")
    assert problem in message


def test_invalid_json_and_bytes_name_the_line(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), '{"chat_rounds": [}'])
    with pytest.raises(DataError, match=r"a.jsonl:2: invalid JSON"):
        read_records(path)
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid UTF-8"):
        read_records(bad)
    with pytest.raises(DataError, match=r"a.jsonl:1: record: expected a JSON object"):
        read_records(write_lines(tmp_path / "a.jsonl", ["[1, 2]"]))


def test_empty_sources_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl"):
        read_records(tmp_path / "empty")
    with pytest.raises(DataError, match="no records"):
        read_records(write_lines(tmp_path / "blank.jsonl", ["", "  "]))


def test_task_names_and_files(tmp_path):
    task = tmp_path / "text_to_code"
    (task / "sub").mkdir(parents=True)
    write_lines(task / "b.jsonl", [json.dumps(GOOD)])
    write_lines(task / "sub" / "a.json", [json.dumps(GOOD)])
    (task / "notes.txt").write_text("ignored")
    assert task_name(task) == "text_to_code"
    assert task_name(task / "b.jsonl") == "b"
    assert [p.name for p in task_files(task)] == ["b.jsonl", "a.json"]
    assert len(read_records(task)) == 2


@pytest.mark.parametrize(
    ("n", "fractions", "counts"),
    [(100, [0.98, 0.02], [98, 2]), (10, [0.9, 0.1], [9, 1]), (3, [0.99, 0.01], [2, 1]), (10, [0.8, 0.1, 0.1], [8, 1, 1]), (5, [1.0, 0.0], [5, 0])],
)
def test_split_counts(n, fractions, counts):
    assert split_counts(n, fractions) == counts


def test_split_is_deterministic_and_seeded_per_task():
    records = [Record([], f"f:{i}") for i in range(50)]
    first = split_records(records, [0.8, 0.2], seed=1, task="a")
    assert split_records(records, [0.8, 0.2], seed=1, task="a") == first
    assert split_records(records, [0.8, 0.2], seed=2, task="a")[1] != first[1]
    assert split_records(records, [0.8, 0.2], seed=1, task="b")[1] != first[1]
    assert sorted(r.source for part in first for r in part) == sorted(r.source for r in records)
    assert len(first[1]) == 10


def test_overlength_samples_are_dropped_and_counted(tiny_config, demo_tokenizer):
    from mftcoder.models.loading import chat_format

    demo_tokenizer.pad_token = demo_tokenizer.eos_token
    config = tiny_config(seq_length=120)
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    total_dropped = sum(r.dropped_overlength for r in data.report.values())
    assert total_dropped > 0
    for report in data.report.values():
        assert report.train_samples + report.valid_samples + report.dropped_overlength == report.records
        assert len(report.dropped_examples) == min(3, report.dropped_overlength)
    assert all(len(s.input_ids) <= 120 for s in data.train + data.valid)


def test_every_sample_once_per_epoch_across_ranks():
    order = epoch_order(23, seed=5, epoch=0)
    assert sorted(order.tolist()) == list(range(23))
    assert epoch_order(23, 5, 1).tolist() != order.tolist()
    per_rank = [rank_micro_batches(order, 4, 3, rank) for rank in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # same number of micro-batches on every rank
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(seen) == list(range(23))


def test_steps_per_epoch():
    assert steps_per_epoch(23, 4, 3, 1) == 2
    assert steps_per_epoch(23, 1, 1, 4) == 6
    assert steps_per_epoch(8, 4, 1, 4) == 1


def sample(ids, mask, task):
    return Sample(np.array(ids, dtype=np.int32), np.array(mask, dtype=np.uint8), task)


def test_collate_shifts_targets_and_pads_to_the_longest():
    batch = collate([sample([5, 6, 7, 8], [0, 0, 1, 1], 1), sample([9, 10], [0, 1], 0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["targets"].tolist() == [[6, 7, 8, 0], [10, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False], [True, False, False, False]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["task_ids"][0, :3].tolist() == [1, 1, 1] and batch["task_ids"][1, 0] == 0
    assert batch["sample_ids"].tolist() == [[0, 0, 0, -1], [1, -1, -1, -1]]


def test_empty_micro_batch_is_a_dummy_without_targets():
    batch = collate([], pad_id=3)
    assert batch["input_ids"].tolist() == [[3]]
    assert not batch["loss_mask"].any()
    assert batch["attention_mask"].dtype == torch.long
