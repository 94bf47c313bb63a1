"""Whether and from where a run resumes, and which changes since the checkpoint a resumed run accepts."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import yaml

from mftcoder.config.loss_modes import LOSS_MODES
from mftcoder.config.schema import TrainConfig
from mftcoder.errors import ConfigError, Issue, LaunchError
from mftcoder.training.checkpoint import CONFIG, SHARDED, SHARDED_STATE, TRAINER_STATE, is_complete, latest_checkpoint
from mftcoder.training.state import Resume

# Keys that may differ between a checkpoint and the run resuming it: they change when things happen
# or how they are reported, not what the finished steps computed.
SAFE_TO_CHANGE = frozenset(
    {
        "max_train_steps",
        "num_train_epochs",
        "log_interval",
        "evaluation_steps",
        "checkpointing_steps",
        "epoch_checkpointing",
        "saving_limit",
        "early_stopping",
        "early_stopping_stall_num",
        "init_timeout_seconds",
        "per_device_eval_batch_size",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "allow_inexact_resume",
        "on_nan",
        "max_consecutive_nan",
        "metric_for_best",  # the trainer then tracks the best model afresh
        "output_dir",
        "cache_dir",
        "num_proc",
    }
)
# Safe keys that decide what is trained in some loss modes: the validation draws of a mode that learns
# its task weights from validation losses are batches of `per_device_eval_batch_size`.
TRAINED_IN_MODES = MappingProxyType(
    {"per_device_eval_batch_size": tuple(name for name, mode in LOSS_MODES.items() if mode.needs_validation)}
)


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    choice = config.resume_from_checkpoint
    if choice is None:
        return None
    if choice == "auto":
        return latest_checkpoint(Path(config.output_dir) / "checkpoints")
    path = Path(choice).expanduser()
    if not is_complete(path):
        raise ConfigError(
            [Issue("resume_from_checkpoint", f"{choice} is not a complete mftcoder checkpoint (no {TRAINER_STATE})")]
        )
    return path.resolve()


def compatibility(saved: dict, current: TrainConfig, saved_world: int, world: int) -> tuple[list[str], list[str]]:
    """(accepted changes, refused changes) between a checkpoint's config and the resuming one."""
    now = current.model_dump(mode="json")
    # A key the checkpoint predates (a newer mftcoder) counts as having had its default.
    defaults = TrainConfig.model_construct().model_dump(mode="json")
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    accepted, refused = [], []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) == now.get(key):
            continue
        change = f"{key}: {saved.get(key)!r} -> {now.get(key)!r}"
        safe = key in SAFE_TO_CHANGE and current.weighted_loss_mode not in TRAINED_IN_MODES.get(key, ())
        (accepted if safe else refused).append(change)
    if saved_world != world:
        change = f"world size: {saved_world} -> {world}"
        (accepted if current.allow_inexact_resume else refused).append(change)
    return accepted, refused


def saved_config(checkpoint: Path) -> dict:
    """The config a checkpoint was written with, as saved (keys it predates are absent)."""
    return yaml.safe_load((checkpoint / CONFIG).read_text())


def check_compatible(checkpoint: Path, config: TrainConfig, saved_world: int, world: int) -> list[str]:
    """The accepted changes; refuses (naming them) changes that would make the resumed run another run."""
    saved = saved_config(checkpoint)
    accepted, refused = compatibility(saved, config, saved_world, world)
    if refused:
        raise ConfigError(
            [
                Issue(
                    "resume_from_checkpoint",
                    f"the config changed since {checkpoint} in ways that change what is trained: "
                    + "; ".join(refused)
                    + ". Restore those values (or start a new run in another output_dir"
                    + (
                        "; a different world size is accepted with allow_inexact_resume: true"
                        if any(c.startswith("world size") for c in refused)
                        else ""
                    )
                    + ")",
                )
            ]
        )
    return accepted


def resume_point(config: TrainConfig, accelerator) -> Resume | None:
    """The checkpoint this launch resumes from, checked against the launch and the config; None: a fresh start."""
    checkpoint = resolve_resume(config)
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if accelerator.distributed_type in SHARDED_STATE and not (checkpoint / SHARDED).is_dir():
        raise LaunchError(
            f"{checkpoint} was written without DeepSpeed/FSDP state; resume it with the launcher that wrote it"
        )
    for change in check_compatible(checkpoint, config, state["world_size"], accelerator.num_processes):
        accelerator.print(f"resume: accepted change {change}")
    return Resume(
        checkpoint=checkpoint,
        progress=state["progress"],
        world_size=state["world_size"],
        data_fingerprint=state["data"],
        lr_steps=state.get("lr_steps"),
        config=saved_config(checkpoint),
    )


def check_same_data(resume: Resume, fingerprint: str) -> None:
    if resume.data_fingerprint != fingerprint:
        raise LaunchError(
            f"the training data changed since {resume.checkpoint} (its tokenized samples differ): an exact resume "
            "is impossible; restore the data or start a new run"
        )
