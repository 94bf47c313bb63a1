"""What the data layer knows about a config before anything loads: the tasks and the cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mftcoder.config.schema import TrainConfig
from mftcoder.data.cache import cache_root
from mftcoder.data.tasks import task_files, task_name
from mftcoder.errors import DataError, Issue


def _task_issues(config: TrainConfig) -> list[Issue]:
    issues = []
    for i, entry in enumerate(config.data_paths):
        try:
            task_files(entry)
        except DataError as err:
            issues.append(Issue(f"data_paths.{i}", str(err)))
    names = Counter(task_name(entry) for entry in config.data_paths)
    for name, count in names.items():
        if count > 1:
            issues.append(
                Issue("data_paths", f"{count} entries give the task name '{name}'; task names must be unique")
            )
    if config.metric_for_best not in ("loss", "task_mean", *names):
        issues.append(
            Issue(
                "metric_for_best",
                f"'{config.metric_for_best}' is neither `task_mean`, `loss` nor a task ({', '.join(names)})",
            )
        )
    return issues


def _cache_issues(config: TrainConfig) -> list[Issue]:
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        return []  # the config's own checks refuse an output_dir that is a file; nothing in it to clear
    cached = cache_root(config)
    if cached == out.resolve() or out.resolve() in cached.parents:
        given = "" if config.cache_dir else " (from $MFTCODER_CACHE)"
        return [
            Issue("cache_dir", f"{cached}{given} is inside output_dir, which a new run may clear; put it elsewhere")
        ]
    return []


def data_issues(config: TrainConfig) -> list[Issue]:
    return _task_issues(config) + _cache_issues(config)
