"""Rules that involve several fields or the file system, run before any model or data loads."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

from mftcoder.config.schema import DataSource, RoleMarkers, TrainConfig
from mftcoder.data.cache import cache_root
from mftcoder.data.packing import packing_issues
from mftcoder.data.tasks import task_files, task_name
from mftcoder.errors import DataError, Issue
from mftcoder.models.families import config_issues
from mftcoder.models.resolve import locate_model


def _why_task_weights_are_unused(config: TrainConfig) -> str:
    """Why the loss mode would ignore static task weights ("" when it applies them)."""
    mode = config.weighted_loss_mode
    if mode in ("self_paced", "coba"):
        return f"weighted_loss_mode {mode} learns the task weights from validation losses"
    if mode in ("case1", "case2") or (mode == "focal" and config.focal_level == "sample"):
        name = "focal with focal_level: sample" if mode == "focal" else mode
        return f"weighted_loss_mode {name} balances tokens or samples, not tasks, and would ignore them"
    return ""


def _data_issues(config: TrainConfig) -> list[Issue]:
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
    if config.template == "tokenizer" and config.role_markers != RoleMarkers():
        issues.append(
            Issue(
                "role_markers",
                "apply to template: mftcoder; with template: tokenizer the tokenizer's chat template sets the layout",
            )
        )
    if config.task_weights is not None and (unused := _why_task_weights_are_unused(config)):
        issues.append(
            Issue(
                "task_weights",
                f"{unused}; remove task_weights, or use case3, case4 or focal (focal_level: task) for static task weights",
            )
        )
    if config.task_weights is not None and len(config.task_weights) != len(config.data_paths):
        issues.append(
            Issue(
                "task_weights",
                f"{len(config.task_weights)} weights for {len(config.data_paths)} tasks; give one per data_paths entry",
            )
        )
    return issues


def _model_issues(config: TrainConfig) -> list[Issue]:
    issues = []
    model_dir, problem = locate_model(config.pretrained_model_path)
    if problem:
        issues.append(Issue("pretrained_model_path", problem))
    elif model_dir is not None and not (model_dir / "config.json").is_file():
        issues.append(Issue("pretrained_model_path", f"{model_dir} has no config.json"))
    elif model_dir is not None:
        issues += _family_issues(config, model_dir / "config.json")
    for field, value in (("peft_type", "qlora"), ("optimizer", "adamw_8bit"), ("optimizer", "paged_adamw_8bit")):
        if getattr(config, field) == value and importlib.util.find_spec("bitsandbytes") is None:
            issues.append(Issue(field, f"{value} needs bitsandbytes (>= 0.50 on CPU): pip install bitsandbytes"))
    if config.quantization_bits is not None and config.peft_type != "qlora":
        issues.append(Issue("quantization_bits", "applies to peft_type: qlora only; remove it or set peft_type: qlora"))
    if config.tokenizer_path is not None:
        _, problem = locate_model(config.tokenizer_path)
        if problem:
            issues.append(Issue("tokenizer_path", problem))
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        issues.append(
            Issue(
                "attn_implementation",
                "flash_attention_2 needs the flash-attn package (CUDA only); install it or use auto/sdpa",
            )
        )
    return issues


def _family_issues(config: TrainConfig, model_config: Path) -> list[Issue]:
    try:
        model_type = json.loads(model_config.read_text(encoding="utf-8")).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        return [Issue("pretrained_model_path", f"{model_config} is not a JSON object: {err}")]
    return config_issues(model_type, config) + packing_issues(model_type, config)


def _schedule_issues(config: TrainConfig) -> list[Issue]:
    issues = []
    if config.min_lr > config.learning_rate:
        issues.append(Issue("min_lr", f"min_lr {config.min_lr:g} exceeds learning_rate {config.learning_rate:g}"))
    if config.valid_fraction == 0:
        for name, without in config.validation_users.items():
            issues.append(Issue(name, f"needs a validation split; set data_split (e.g. [0.98, 0.02]) or {without}"))
    return issues


def _output_issues(config: TrainConfig) -> list[Issue]:
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        return [Issue("output_dir", f"{config.output_dir} is a file")]
    cached = cache_root(config)
    if cached == out.resolve() or out.resolve() in cached.parents:
        given = "" if config.cache_dir else " (from $MFTCODER_CACHE)"
        return [
            Issue("cache_dir", f"{cached}{given} is inside output_dir, which a new run may clear; put it elsewhere")
        ]
    return []


def cross_field_issues(config: TrainConfig) -> list[Issue]:
    return _data_issues(config) + _model_issues(config) + _schedule_issues(config) + _output_issues(config)


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute, so the saved copy runs from any directory."""

    def local(p: str) -> str:
        path = Path(p).expanduser()
        return str(path.resolve()) if path.exists() else p

    def local_source(entry: str | DataSource) -> str | DataSource:
        if isinstance(entry, DataSource):
            return entry.model_copy(update={"path": local(entry.path)})
        return local(entry)

    return config.model_copy(
        update={
            "data_paths": [local_source(entry) for entry in config.data_paths],
            "output_dir": str(Path(config.output_dir).expanduser().resolve()),
            "pretrained_model_path": local(config.pretrained_model_path),
            "tokenizer_path": local(config.tokenizer_path) if config.tokenizer_path else None,
        }
    )
