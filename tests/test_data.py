"""Splits, length policy, sampling weights, the data report, sharding and collation."""

import json

import numpy as np
import pytest
import torch

from mftcoder.config.schema import RoleMarkers
from mftcoder.data.batching import collate, epoch_order, rank_micro_batches
from mftcoder.data.cache import META
from mftcoder.data.dataset import MultiTaskData, build_datasets, epoch_indices, report_table, steps_per_epoch
from mftcoder.data.encoding import split_counts, split_records, truncate
from mftcoder.data.records import Record, read_task
from mftcoder.data.sample import Sample
from mftcoder.data.template import ChatFormat, chat_format, tokenize
from mftcoder.errors import DataError

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "add"},
    {"role": "assistant", "content": "x = 1"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "return x"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "ok"},
]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def chat(demo_tokenizer):
    return ChatFormat(RoleMarkers(), demo_tokenizer.eos_token)


def tokens_of(tokenizer, chat, messages):
    ((ids, mask),) = tokenize(tokenizer, [chat.render(messages)])
    return ids, mask


# --- splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fractions", "counts"),
    [
        (100, [0.98, 0.02], [98, 2]),
        (10, [0.9, 0.1], [9, 1]),
        (3, [0.99, 0.01], [2, 1]),
        (10, [0.8, 0.1, 0.1], [8, 1, 1]),
        (5, [1.0, 0.0], [5, 0]),
    ],
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


@pytest.fixture
def ten_records(tmp_path):
    """A task of 10 distinct prompt/response records."""
    return write_jsonl(tmp_path / "ten" / "a.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)])


def ids_of(samples) -> list[list[int]]:
    return [s.input_ids.tolist() for s in samples]


def test_the_test_split_is_encoded_and_held_apart(tiny_config, demo_tokenizer, ten_records):
    """[0.8, 0.1, 0.1] of 10 records: 8/1/1, each split exactly the records split_records puts in it; the
    train samples and their pack bins are those of [0.8, 0.2], whose valid records are the valid and test
    ones here; the counts of what training uses do not move."""
    held = tiny_config(data_paths=[ten_records], data_split=[0.8, 0.1, 0.1], padding_mode="pack")
    chat = chat_format(held, demo_tokenizer)
    data = build_datasets(held, demo_tokenizer, chat)
    rep = data.report["a"]
    assert (rep.records, rep.train_records, rep.valid_records, rep.test_records) == (10, 8, 1, 1)
    assert (rep.train_samples, rep.valid_samples, rep.test_samples) == (8, 1, 1)
    assert (rep.test_bad, rep.test_dropped, rep.test_truncated) == (0, 0, 0)
    records = read_task(ten_records).records
    parts = split_records(records, [0.8, 0.1, 0.1], seed=held.seed, task="a")
    expected = [
        [ids.tolist() for ids, _ in tokenize(demo_tokenizer, [chat.render(r.messages) for r in p])] for p in parts
    ]
    assert [ids_of(data.train), ids_of(data.valid), ids_of(data.test)] == expected
    assert data.test.units == 1 and data.test.bins is not None  # packed like valid, one group
    assert json.loads((data.cache / META).read_text())["tables"] == ["0/train", "0/valid", "0/test"]
    # the tokens and targets are those of the train and valid samples only, as without a test split
    assert rep.tokens == sum(len(s.input_ids) for s in data.train + data.valid)
    assert rep.supervised_tokens == sum(int(s.loss_mask[1:].sum()) for s in data.train + data.valid)

    two_way = tiny_config(data_paths=[ten_records], data_split=[0.8, 0.2], padding_mode="pack")
    plain = build_datasets(two_way, demo_tokenizer, chat)
    assert plain.test is None and plain.cache != data.cache
    assert ids_of(plain.train) == ids_of(data.train)
    for field in ("members", "offsets", "groups"):
        assert getattr(plain.train.bins, field).tolist() == getattr(data.train.bins, field).tolist()
    assert sorted(ids_of(plain.valid)) == sorted(ids_of(data.valid) + ids_of(data.test))
    other = plain.report["a"]
    assert (other.train_records, other.valid_records, other.test_records) == (8, 2, 0)
    assert (other.train_samples, other.valid_samples, other.test_samples, other.dropped_overlength) == (8, 2, 0, 0)
    assert "test" in report_table(data.report).splitlines()[0]
    assert "test" not in report_table(plain.report).splitlines()[0]


def test_the_test_split_counts_its_drops_apart(tiny_config, demo_tokenizer, long_and_short):
    config = tiny_config(data_paths=[long_and_short], seq_length=30, overlength="drop", data_split=[0.5, 0.2, 0.3])
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    rep = data.report["mixed"]
    parts = split_records(read_task(long_and_short).records, [0.5, 0.2, 0.3], seed=config.seed, task="mixed")
    long_in = [sum(int(r.source.rsplit(":", 1)[1]) <= 4 for r in part) for part in parts]  # lines 1-4 are too long
    assert [len(p) for p in parts] == [5, 2, 3] and long_in == [3, 0, 1]  # the seed puts one in the test split
    assert rep.dropped_overlength == long_in[0] + long_in[1] and len(rep.dropped_examples) == min(
        3, rep.dropped_overlength
    )
    assert (rep.test_dropped, rep.test_samples) == (long_in[2], 3 - long_in[2])
    assert rep.train_samples + rep.valid_samples + rep.dropped_overlength == rep.train_records + rep.valid_records
    assert len(data.test) == rep.test_samples


# --- length policy ---------------------------------------------------------------------------


def test_truncate_keeps_the_leading_rounds_that_fit(demo_tokenizer, chat):
    rendered = chat.render(CONVERSATION)
    ids, mask = tokens_of(demo_tokenizer, chat, CONVERSATION)
    assert len(ids) == 57  # 3 rounds; 2 rounds are 41 tokens, 1 round 26
    cut_ids, cut_mask, how = truncate(demo_tokenizer, rendered, ids, mask, 45)
    two_ids, two_mask = tokens_of(demo_tokenizer, chat, CONVERSATION[:5])
    assert cut_ids.tolist() == two_ids.tolist() and cut_mask.tolist() == two_mask.tolist()
    assert how == "kept 2 of 3 rounds"


def test_truncate_drops_a_trailing_unanswered_turn_first(demo_tokenizer, chat):
    messages = CONVERSATION[1:3] + [{"role": "user", "content": "a long unanswered question " * 5}]
    ids, mask = tokens_of(demo_tokenizer, chat, messages)
    cut_ids, _, how = truncate(demo_tokenizer, chat.render(messages), ids, mask, 30)
    assert cut_ids.tolist() == tokens_of(demo_tokenizer, chat, messages[:2])[0].tolist()
    assert how == "kept 1 of 1 rounds"


def test_truncate_cuts_the_prompt_from_the_left(demo_tokenizer, chat):
    one_ids, one_mask = tokens_of(demo_tokenizer, chat, CONVERSATION[:3])
    assert len(one_ids) == 26 and one_mask.tolist().index(1) == 20  # 20 prompt tokens, 5 targets, "\n"
    ids, mask = tokens_of(demo_tokenizer, chat, CONVERSATION)
    cut_ids, cut_mask, how = truncate(demo_tokenizer, chat.render(CONVERSATION), ids, mask, 22)
    assert cut_ids.tolist() == one_ids[4:].tolist() and cut_mask.tolist() == one_mask[4:].tolist()
    assert int(cut_mask[1:].sum()) == 5 and cut_mask[0] == 0  # every target kept
    assert how == "kept 1 of 3 rounds, prompt cut by 4 tokens"


def test_truncate_keeps_the_head_of_an_answer_too_long_alone(demo_tokenizer, chat):
    one_ids, _ = tokens_of(demo_tokenizer, chat, CONVERSATION[:3])
    ids, mask = tokens_of(demo_tokenizer, chat, CONVERSATION)
    cut_ids, cut_mask, how = truncate(demo_tokenizer, chat.render(CONVERSATION), ids, mask, 4)
    assert cut_ids.tolist() == one_ids[19:23].tolist()  # the last prompt token, then the answer's first 3
    assert cut_mask.tolist() == [0, 1, 1, 1]
    assert how == "kept 1 of 3 rounds, prompt cut to 1 token, answer cut by 3 tokens"


def test_truncate_text_keeps_its_beginning(demo_tokenizer, chat):
    from mftcoder.data.template import render_record

    rendered = render_record(chat, Record([], "f:1", text="def f():\n    return 1\n"))
    ((ids, mask),) = tokenize(demo_tokenizer, [rendered])
    assert len(ids) == 8 and mask.tolist() == [1] * 8  # text + EOS, every token a target
    cut_ids, cut_mask, how = truncate(demo_tokenizer, rendered, ids, mask, 5)
    assert cut_ids.tolist() == ids[:5].tolist() and cut_mask.tolist() == [1] * 5
    assert how == "kept the first tokens"


@pytest.fixture
def long_and_short(tmp_path):
    """A task of 10 records: the first 4 are too long for seq_length 30 (multi-round), the rest fit."""
    long = {"messages": [m for m in CONVERSATION if m["role"] != "system"]}
    short = {"messages": CONVERSATION[1:3]}
    write_jsonl(tmp_path / "mixed" / "part.jsonl", [long] * 4 + [short] * 6)
    return str(tmp_path / "mixed")


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_length_policy_is_counted_and_reported(tiny_config, demo_tokenizer, long_and_short, policy):
    config = tiny_config(data_paths=[long_and_short], seq_length=30, overlength=policy, data_split=[0.5, 0.5])
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    rep = data.report["mixed"]
    assert rep.records == 10 and rep.bad_records == 0
    assert all(len(s.input_ids) <= 30 and s.loss_mask[1:].any() for s in data.train + data.valid)
    if policy == "drop":
        assert (rep.dropped_overlength, rep.truncated) == (4, 0)
        assert len(rep.dropped_examples) == 3 and rep.dropped_examples[0].endswith("tokens > seq_length 30")
    else:
        assert (rep.dropped_overlength, rep.truncated) == (0, 4)
        assert rep.truncated_examples[0].endswith("part.jsonl:1: 45 -> 29 tokens (kept 2 of 3 rounds)")
    assert rep.train_samples + rep.valid_samples + rep.dropped_overlength == rep.records
    assert rep.tokens == sum(len(s.input_ids) for s in data.train + data.valid)
    assert rep.supervised_tokens == sum(int(s.loss_mask[1:].sum()) for s in data.train + data.valid)


def test_overlength_error_names_the_record(tiny_config, demo_tokenizer, long_and_short):
    config = tiny_config(data_paths=[long_and_short], seq_length=30, overlength="error")
    with pytest.raises(DataError, match=r"part.jsonl:\d+: \d+ tokens > seq_length 30 \(overlength: error\)"):
        build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))


def test_demo_data_drops_are_counted_per_task(tiny_config, demo_tokenizer):
    config = tiny_config(seq_length=120)
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    assert sum(r.dropped_overlength for r in data.report.values()) > 0
    for report in data.report.values():
        assert report.train_samples + report.valid_samples + report.dropped_overlength == report.records
        assert len(report.dropped_examples) == min(3, report.dropped_overlength)
        assert report.formats == {"chat_rounds": 40}
    assert all(len(s.input_ids) <= 120 for s in data.train + data.valid)


# --- bad records, splits that cannot serve validation, the report -----------------------------


def test_skipped_bad_records_are_in_the_report(tiny_config, demo_tokenizer, tmp_path):
    good = {"prompt": "p", "response": "r"}
    path = write_jsonl(tmp_path / "task" / "a.jsonl", [good] * 8 + [{"prompt": "p"}, {"text": 3}])
    config = tiny_config(data_paths=[path], on_bad_record="skip", data_split=[0.75, 0.25])
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    rep = data.report_dict()["a"]
    assert (rep["records"], rep["bad_records"], rep["train_samples"], rep["valid_samples"]) == (10, 2, 6, 2)
    assert rep["bad_examples"][1] == f"{path}:10: text: must be a string, got int"
    json.dumps(data.report_dict())  # what logs/data_report.json holds
    table = report_table(data.report)
    assert table.splitlines()[1].split()[:5] == ["a", "10", "2", "6", "2"]
    assert f"  bad: {path}:9: record: no known format" in table
    with pytest.raises(DataError, match=r"a.jsonl:9: record: no known format"):
        build_datasets(tiny_config(data_paths=[path]), demo_tokenizer, chat_format(config, demo_tokenizer))


def test_a_task_without_validation_samples_is_an_error(tiny_config, demo_tokenizer, tmp_path):
    one = write_jsonl(tmp_path / "one" / "a.jsonl", [{"prompt": "p", "response": "r"}])
    config = tiny_config(data_paths=[one], evaluation_steps=10)
    with pytest.raises(
        DataError, match=r"task 'a' has no validation sample .*used by evaluation_steps, the final evaluation"
    ):
        build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    no_split = tiny_config(data_paths=[one], data_split=[1, 0])
    assert len(build_datasets(no_split, demo_tokenizer, chat_format(no_split, demo_tokenizer)).valid) == 0


# --- sampling weights ------------------------------------------------------------------------


def test_epoch_indices_apply_weights():
    """Tasks of 2, 4 and 3 samples at weights 2, 0.5 and 1.5: 4 + 2 + (3 + 2) = 11 per epoch."""
    task_ids = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2])
    epochs = [epoch_indices(task_ids, [2.0, 0.5, 1.5], seed=3, epoch=e) for e in range(2)]
    for order in epochs:
        counts = np.bincount(order, minlength=9)
        assert len(order) == 11
        assert counts[:2].tolist() == [2, 2]  # every sample of task 0 twice
        assert counts[2:6].sum() == 2 and counts[2:6].max() == 1  # half of task 1
        assert counts[6:].sum() == 5 and counts[6:].min() == 1  # all of task 2 once, plus two
    # the halves of task 1 in consecutive epochs are disjoint: every sample is used before any is reused
    assert sorted(np.concatenate([o[(o >= 2) & (o < 6)] for o in epochs]).tolist()) == [2, 3, 4, 5]
    assert epoch_indices(task_ids, [2.0, 0.5, 1.5], seed=3, epoch=1).tolist() == epochs[1].tolist()


def test_unit_weights_give_the_plain_epoch_order():
    task_ids = np.array([0] * 5 + [1] * 7)
    for epoch in range(3):
        assert epoch_indices(task_ids, [1.0, 1.0], 11, epoch).tolist() == epoch_order(12, 11, epoch).tolist()


def test_weights_reach_the_data_and_the_report(tiny_config, demo_tokenizer, small_data):
    entries = [
        {"path": small_data[0], "weight": 2.0},
        {"path": small_data[1], "weight": 0.5, "name": "t2c"},
        small_data[2],
    ]
    config = tiny_config(data_paths=entries)
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    assert data.tasks == ["code_completion", "t2c", "unit_test_generation"]
    assert [r.epoch_samples for r in data.report.values()] == [72, 18, 36]
    assert data.epoch_size == 126 and len(data.epoch_order(config.seed, 0)) == 126
    order = data.epoch_order(config.seed, 0)
    per_task = np.bincount([data.train[i].task_id for i in order], minlength=3)
    assert per_task.tolist() == [72, 18, 36]
    small = tiny_config(data_paths=[{"path": small_data[0], "weight": 0.01}])
    with pytest.raises(DataError, match="weight 0.01 of 36 train samples draws none per epoch"):
        build_datasets(small, demo_tokenizer, chat_format(small, demo_tokenizer))


# --- sharding and collation ------------------------------------------------------------------


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


def test_epoch_size_without_weights_is_the_train_size():
    data = MultiTaskData(["a", "b"], [sample([1, 2], [0, 1], t) for t in (0, 0, 1)], [], {})
    assert data.epoch_size == 3 and sorted(data.epoch_order(1, 0).tolist()) == [0, 1, 2]


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
