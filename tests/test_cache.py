"""The tokenized-data cache: hits without tokenizing, misses on any change to what encoding reads,
memory-mapped samples, parallel tokenizing, `mftcoder preprocess`, and turn-taking in a launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import launch_env, read_metrics, write_subset
from datasets import load_from_disk

from mftcoder.cli import main
from mftcoder.config import dump_config
from mftcoder.data import encoding
from mftcoder.data.cache import META, REPORT
from mftcoder.data.dataset import build_datasets
from mftcoder.data.template import chat_format
from mftcoder.errors import ConfigError, DataError

pytestmark = pytest.mark.unit


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def data_paths(tmp_path) -> list[str]:
    return write_subset(tmp_path / "data", 12)


@pytest.fixture
def encodings(monkeypatch) -> list[int]:
    """Counts the runs of the encoder (tokenizing); the cache is what spares them."""
    calls: list[int] = []
    encode = encoding.encode_tasks

    def counted(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode_tasks", counted)
    return calls


def build(config, tokenizer):
    return build_datasets(config, tokenizer, chat_format(config, tokenizer))


def as_lists(samples) -> list[tuple]:
    return [(s.input_ids.tolist(), s.loss_mask.tolist(), s.task_id) for s in samples]


def test_a_rerun_with_nothing_changed_hits_without_tokenizing(
    tiny_config, demo_tokenizer, data_paths, cache_dir, encodings
):
    config = tiny_config(data_paths=data_paths, cache_dir=str(cache_dir))
    first = build(config, demo_tokenizer)
    second = build(config, demo_tokenizer)
    assert len(encodings) == 1
    assert second.cache == first.cache and first.cache.parent == cache_dir.resolve()
    assert as_lists(second.train + second.valid) == as_lists(first.train + first.valid)
    assert second.report_dict() == first.report_dict()
    # what is applied after loading does not change the key
    for changed in (
        {"padding_mode": "pack"},
        {"learning_rate": 1e-3},
        {"num_proc": 2},
        {"data_paths": [{"path": data_paths[0], "weight": 2.0}, *data_paths[1:]]},
    ):
        assert (
            build(
                tiny_config(**{"data_paths": data_paths, "cache_dir": str(cache_dir), **changed}), demo_tokenizer
            ).cache
            == first.cache
        )
    assert len(encodings) == 1


def test_editing_one_byte_of_a_data_file_misses(tiny_config, demo_tokenizer, data_paths, cache_dir, encodings):
    config = tiny_config(data_paths=data_paths, cache_dir=str(cache_dir))
    before = build(config, demo_tokenizer)
    path = next(Path(data_paths[1]).glob("*.jsonl"))
    text = path.read_text()
    at = text.index('"content": "') + len('"content": "')
    path.write_text(text[:at] + ("X" if text[at] != "X" else "Y") + text[at + 1 :])  # one byte, same size
    after = build(config, demo_tokenizer)
    assert len(encodings) == 2 and after.cache != before.cache
    assert as_lists(after.train + after.valid) != as_lists(before.train + before.valid)


@pytest.mark.parametrize(
    "changed",
    [
        {"seq_length": 300},
        {"overlength": "truncate", "seq_length": 120},
        {"role_markers": {"user": "<s>user\n"}},
        {"seed": 8},
        {"data_split": [0.8, 0.2]},
        {"padding_mode": "concat"},
    ],
    ids=lambda changed: next(iter(changed)),
)
def test_options_that_change_the_samples_miss(tiny_config, demo_tokenizer, data_paths, cache_dir, encodings, changed):
    base = build(tiny_config(data_paths=data_paths, cache_dir=str(cache_dir)), demo_tokenizer)
    config = tiny_config(data_paths=data_paths, cache_dir=str(cache_dir), **changed)
    try:
        other = build(config, demo_tokenizer).cache
    except DataError:  # concat refuses chat records, after encoding them under their own key
        other = None
    assert len(encodings) == 2
    assert other != base.cache


def test_another_tokenizer_misses(tiny_config, demo_tokenizer, data_paths, cache_dir, encodings):
    from conftest import DEMO_MODEL
    from transformers import AutoTokenizer

    config = tiny_config(data_paths=data_paths, cache_dir=str(cache_dir))
    base = build(config, demo_tokenizer)
    extended = AutoTokenizer.from_pretrained(DEMO_MODEL)
    extended.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    assert build(config, extended).cache != base.cache and len(encodings) == 2


def test_cached_samples_are_memory_mapped_views(tiny_config, demo_tokenizer, data_paths, cache_dir):
    data = build(tiny_config(data_paths=data_paths, cache_dir=str(cache_dir)), demo_tokenizer)
    meta = json.loads((data.cache / META).read_text())
    assert meta["tables"] == ["0/train", "0/valid", "1/train", "1/valid", "2/train", "2/valid"]
    assert type(load_from_disk(str(data.cache / "0" / "train")).data).__name__ == "MemoryMappedTable"
    sample = data.train[0]
    assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == np.uint8
    assert not sample.input_ids.flags.owndata  # a view of the Arrow buffer, not a copy
    assert not list(cache_dir.glob("*.tmp-*"))


def test_parallel_tokenizing_gives_the_same_samples(tiny_config, demo_tokenizer, data_paths, tmp_path):
    one = build(tiny_config(data_paths=data_paths, cache_dir=str(tmp_path / "one"), num_proc=1), demo_tokenizer)
    two = build(tiny_config(data_paths=data_paths, cache_dir=str(tmp_path / "two"), num_proc=2), demo_tokenizer)
    assert as_lists(two.train + two.valid) == as_lists(one.train + one.valid)
    assert two.report_dict() == one.report_dict()


def test_a_failed_encoding_leaves_no_entry(tiny_config, demo_tokenizer, data_paths, cache_dir):
    bad = Path(data_paths[0]) / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: record: no known format"):
        build(tiny_config(data_paths=data_paths, cache_dir=str(cache_dir)), demo_tokenizer)
    assert list(cache_dir.iterdir()) == []


def test_a_cache_inside_the_output_dir_is_refused(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"cache_dir: .* is inside output_dir"):
        tiny_config(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "run" / "cache"))


@pytest.mark.e2e
def test_preprocess_builds_the_cache_that_training_loads(tiny_config, data_paths, cache_dir, tmp_path, capsys):
    config = tiny_config(data_paths=data_paths, cache_dir=str(cache_dir), padding_mode="pack", max_train_steps=1)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    assert main(["preprocess", str(path)]) == 0
    out = capsys.readouterr().out
    (entry,) = [p for p in cache_dir.iterdir()]
    assert f"data cache: encoded into {entry}" in out
    assert "fill" in out.splitlines()[1] and "code_completion" in out
    assert f"data report: {entry / REPORT}" in out
    report = json.loads((entry / REPORT).read_text())
    assert set(report) == {"code_completion", "text_to_code", "unit_test_generation"}
    assert all(0 < task["fill_rate"] <= 1 and task["train_samples"] > 0 for task in report.values())

    assert main(["train", str(path)]) == 0
    assert f"data cache: loaded {entry}" in capsys.readouterr().out

    assert main(["preprocess", str(path), "seq_lenght=100"]) == 2
    assert "seq_lenght: unknown key; did you mean 'seq_length'?" in capsys.readouterr().err


@pytest.mark.dist
def test_in_a_launch_one_process_encodes_and_the_other_loads(tiny_config, small_data, tmp_path):
    """Two processes, a fresh cache, pack mode and no updates: rank 0 encodes, rank 1 waits and loads
    (it never encodes), and the packed validation over both ranks equals one process's."""
    cache_dir = tmp_path / "cache"
    config = tiny_config(cache_dir=str(cache_dir), padding_mode="pack", learning_rate=0.0, max_train_steps=2,
                         per_device_eval_batch_size=2, output_dir=str(tmp_path / "two"))  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", "0", "-m", "mftcoder", "train", str(path),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=launch_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    assert "world_size=2" in console
    encoded = [line for line in console.splitlines() if line.startswith("data cache: encoded into")]
    assert len(encoded) == 1 and encoded[0].endswith("(process 0)"), console[-4000:]
    assert len(list(cache_dir.iterdir())) == 1

    from mftcoder.training.trainer import train

    train(config.model_copy(update={"output_dir": str(tmp_path / "one")}))
    (two,) = [m for m in read_metrics(tmp_path / "two") if m["split"] == "valid"]
    (one,) = [m for m in read_metrics(tmp_path / "one") if m["split"] == "valid"]
    for task, loss in one["task_loss"].items():
        assert two["task_loss"][task] == pytest.approx(loss, rel=1e-5), task
