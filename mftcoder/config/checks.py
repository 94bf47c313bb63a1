"""Rules that involve several fields of the config and nothing else; what the data and model layers
know about a config is checked there (`mftcoder.run_config` reports it all together)."""

from __future__ import annotations

from pathlib import Path

from mftcoder.config.schema import RoleMarkers, TrainConfig
from mftcoder.errors import Issue


def _why_task_weights_are_unused(config: TrainConfig) -> str:
    """Why the loss mode would ignore static task weights ("" when it applies them)."""
    mode = config.loss_mode
    if mode.needs_validation:
        return f"weighted_loss_mode {mode.name} learns the task weights from validation losses"
    if not mode.balances_tasks:
        name = mode.label or mode.name
        return f"weighted_loss_mode {name} balances tokens or samples, not tasks, and would ignore them"
    return ""


def config_issues(config: TrainConfig) -> list[Issue]:
    issues = []
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
    if config.quantization_bits is not None and config.peft_type != "qlora":
        issues.append(Issue("quantization_bits", "applies to peft_type: qlora only; remove it or set peft_type: qlora"))
    if config.min_lr > config.learning_rate:
        issues.append(Issue("min_lr", f"min_lr {config.min_lr:g} exceeds learning_rate {config.learning_rate:g}"))
    if config.valid_fraction == 0:
        for name, without in config.validation_users.items():
            issues.append(Issue(name, f"needs a validation split; set data_split (e.g. [0.98, 0.02]) or {without}"))
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        issues.append(Issue("output_dir", f"{config.output_dir} is a file"))
    return issues
