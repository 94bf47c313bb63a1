"""`mftcoder plot OUTPUT_DIR`: PNG charts of a run's per-task losses and weights over its steps.

Reads `OUTPUT_DIR/logs/metrics.jsonl` and writes next to it `task_loss.png` (train and validation
loss per task, and over all tasks) and, when the run logged per-task weights, `task_weight.png`.
Uses matplotlib's object API on the Agg canvas: no display and no global backend switch.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from mftcoder.errors import DataError

ALL_TASKS = "all tasks"

Series = dict[str, tuple[list[int], list[float]]]  # name -> (steps, values)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; it is written by `mftcoder train` into OUTPUT_DIR/logs/")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "split" not in record:
            raise DataError(f"{path}:{number}: a metrics record is a JSON object with `step` and `split`")
        records.append(record)
    return records


def series(records: list[dict], split: str, key: str) -> Series:
    """Per-task values of `key` (a mapping task -> value) in the records of `split`, by step."""
    found: Series = defaultdict(lambda: ([], []))
    for record in records:
        if record["split"] != split:
            continue
        for task, value in record.get(key, {}).items():
            found[task][0].append(record["step"])
            found[task][1].append(value)
        if key == "task_loss" and "loss" in record:
            found[ALL_TASKS][0].append(record["step"])
            found[ALL_TASKS][1].append(record["loss"])
    return dict(found)


def _draw(axes, lines: Series, colors: dict[str, str], title: str, ylabel: str) -> None:
    for name, (steps, values) in lines.items():
        style = {"color": "black", "linestyle": "--"} if name == ALL_TASKS else {"color": colors[name]}
        axes.plot(steps, values, label=name, marker="." if len(steps) < 30 else None, **style)
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if lines:
        axes.legend(fontsize="small")


def plot_run(output_dir: str | Path) -> list[Path]:
    """Write the charts of the run in `output_dir`; returns the files written."""
    logs = Path(output_dir) / "logs"
    records = read_metrics(logs / "metrics.jsonl")
    train, valid = series(records, "train", "task_loss"), series(records, "valid", "task_loss")
    weights = series(records, "train", "task_weight")
    tasks = list(dict.fromkeys(t for lines in (train, valid, weights) for t in lines if t != ALL_TASKS))
    colors = {task: f"C{i % 10}" for i, task in enumerate(tasks)}

    written = []
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    _draw(left, train, colors, "train loss", "mean token cross-entropy")
    _draw(right, valid, colors, "validation loss", "mean token cross-entropy")
    written.append(logs / "task_loss.png")
    figure.savefig(written[-1], dpi=100)
    if weights:
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        _draw(figure.subplots(), weights, colors, "task weight", "weight")
        written.append(logs / "task_weight.png")
        figure.savefig(written[-1], dpi=100)
    return written
