"""`mftcoder plot OUTPUT_DIR`: charts from logs/metrics.jsonl."""

import json

import pytest

from mftcoder.cli import main
from mftcoder.errors import DataError
from mftcoder.plotting import ALL_TASKS, plot_run, read_metrics, series

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(output_dir, records):
    logs = output_dir / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return logs


def train(step, losses, weights=None):
    record = {"step": step, "split": "train", "loss": sum(losses.values()) / len(losses), "task_loss": losses}
    return record | ({"task_weight": weights} if weights else {})


RUN = [
    train(1, {"a": 2.0, "b": 3.0}, {"a": 0.5, "b": 0.5}),
    train(2, {"a": 1.5, "b": 2.9}, {"a": 0.4, "b": 0.6}),
    {"step": 2, "split": "valid", "loss": 2.0, "task_loss": {"a": 1.6, "b": 2.5}},
    train(3, {"b": 2.5}, {"a": 0.3, "b": 0.7}),  # task a had no targets in this window
]


def test_series_per_task_and_over_all_tasks():
    losses = series(RUN, "train", "task_loss")
    assert losses["a"] == ([1, 2], [2.0, 1.5]) and losses["b"] == ([1, 2, 3], [3.0, 2.9, 2.5])
    assert losses[ALL_TASKS][0] == [1, 2, 3]
    assert series(RUN, "train", "task_weight")["b"] == ([1, 2, 3], [0.5, 0.6, 0.7])
    assert series(RUN, "valid", "task_loss")["a"] == ([2], [1.6])


def test_plot_writes_loss_and_weight_charts(tmp_path):
    logs = write_metrics(tmp_path, RUN)
    assert plot_run(tmp_path) == [logs / "task_loss.png", logs / "task_weight.png"]
    for path in (logs / "task_loss.png", logs / "task_weight.png"):
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000


def test_no_weight_chart_without_logged_weights(tmp_path):
    logs = write_metrics(tmp_path, [train(1, {"a": 2.0})])
    assert plot_run(tmp_path) == [logs / "task_loss.png"]


def test_cli_plot(tmp_path, capsys):
    logs = write_metrics(tmp_path, RUN)
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(logs / "task_loss.png"), str(logs / "task_weight.png")]
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_bad_line_is_named(tmp_path):
    logs = write_metrics(tmp_path, RUN)
    with (logs / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train"}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:5: a metrics record is a JSON object with `step` and `split`"):
        read_metrics(logs / "metrics.jsonl")
