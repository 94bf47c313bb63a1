"""Checkpoints that resume exactly, and the decision whether and from where to resume.

    OUTPUT_DIR/checkpoints/step-<N>/     written as step-<N>.tmp, renamed once complete
        adapter or model + tokenizer     HF-loadable, as in final/
        config.yaml                      the config of the run that wrote it
        trainer_state.json               step (= the data position), progress, early stopping, best
        optimizer.pt, scheduler.pt       one copy: single process and DDP replicate them
        state/                           instead of those, under DeepSpeed/FSDP (sharded, via Accelerate)
        rank-<i>.pt                      per rank: RNG states and the partial sums of the log window
    OUTPUT_DIR/checkpoints/latest        names the newest complete checkpoint; written last

The data position needs no sampler state: the order of every epoch is a pure function of
(seed, epoch) and every epoch has the same number of steps, so the global step says where to go on.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
import yaml

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import ConfigError, Issue
from mftcoder.training.outputs import checkpoint_dir, checkpoint_steps

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"

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
# Safe keys that decide what is trained in some loss modes: the validation draws of self_paced and
# coba are batches of `per_device_eval_batch_size`, and their losses set the task weights.
TRAINED_IN_MODES = MappingProxyType({"per_device_eval_batch_size": ("self_paced", "coba")})


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and not directory.name.endswith(".tmp") and (directory / TRAINER_STATE).is_file()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step-<N>
    (a run killed between the rename and the pointer update). `.tmp` directories never count."""
    pointer = checkpoints / LATEST
    if pointer.is_file():
        named = checkpoints / pointer.read_text().strip()
        if is_complete(named):
            return named
    for step in reversed(checkpoint_steps(checkpoints)):
        if is_complete(checkpoint_dir(checkpoints, step)):
            return checkpoint_dir(checkpoints, step)
    return None


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
    return yaml.safe_load((checkpoint / "config.yaml").read_text())


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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_fingerprint(samples: Iterable) -> str:
    """Identifies the tokenized training data; a resume on edited data is refused."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.input_ids.tobytes())
        digest.update(sample.loss_mask.tobytes())
        digest.update(int(sample.task_id).to_bytes(4, "little"))
    return digest.hexdigest()


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def free_space_problem(directory: Path, needed: int) -> str:
    """A reason not to start writing a checkpoint of about `needed` bytes, or ""."""
    free = shutil.disk_usage(directory).free
    margin = needed // 5 + (64 << 20)
    if free < needed + margin:
        return f"only {free / 2**20:.0f} MiB free in {directory}, a checkpoint needs about {needed / 2**20:.0f} MiB"
    return ""
