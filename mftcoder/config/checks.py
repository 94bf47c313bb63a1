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
    return issues + _preference_issues(config)


# How a preference objective averages its pairs (docs/preference.md).
PREFERENCE_MODES = {"case2": "every pair counts once", "case3": "each task's mean pair loss, averaged over tasks"}


def _preference_issues(config: TrainConfig) -> list[Issue]:
    stage = config.training_stage
    if stage == "sft":
        if config.rpo_alpha is not None:
            return [Issue("rpo_alpha", "applies to training_stage: dpo only; remove it")]
        return []
    issues = []
    if config.weighted_loss_mode not in PREFERENCE_MODES:
        modes = "; ".join(f"{mode}: {meaning}" for mode, meaning in PREFERENCE_MODES.items())
        issues.append(
            Issue(
                "weighted_loss_mode",
                f"{config.weighted_loss_mode} balances tokens or learns weights of SFT losses; training_stage: "
                f"{stage} averages pair losses ({modes})",
            )
        )
    if config.padding_mode != "padding":
        issues.append(
            Issue("padding_mode", f"training_stage: {stage} scores each response in a row of its own; use padding")
        )
    if config.rpo_alpha is not None and stage != "dpo":
        issues.append(Issue("rpo_alpha", "applies to training_stage: dpo only (ORPO always adds the chosen NLL)"))
    for i, entry in enumerate(config.data_paths):
        if not isinstance(entry, str) and entry.format != "auto":
            issues.append(
                Issue(
                    f"data_paths.{i}.format",
                    f"training_stage: {stage} reads preference records (prompt/chosen/rejected, or MFTCoder's "
                    "chosen/rejected conversations); leave format: auto",
                )
            )
    return issues
