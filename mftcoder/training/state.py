"""What one run trains with and where it stands: built once at setup, read by the loop and the checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mftcoder.data.dataset import MultiTaskData
from mftcoder.losses.balancing import Balancing
from mftcoder.losses.moe import RouterBalance
from mftcoder.losses.preference import PreferenceLoss
from mftcoder.training.metrics import MetricsLog, TrainWindow


@dataclass
class Progress:
    """The counters and decisions a resumed run continues from (saved in trainer_state.json)."""

    step: int = 0
    tokens: int = 0
    targets: int = 0
    train_seconds: float = 0.0
    best_metric: float = math.inf
    best_step: int | None = None
    stalls: int = 0
    last_eval_step: int | None = None
    last_checkpoint_step: int | None = None
    skipped_steps: int = 0  # non-finite steps (on_nan: skip)
    overflow_steps: int = 0  # fp16 loss-scale overflows
    consecutive_nan: int = 0
    lr: float = 0.0
    logged_lines: int = 0  # lines in metrics.jsonl (main process)


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps; every epoch has `per_epoch` steps. The learning rate warms up
    over `warmup` steps and decays over `lr_steps`: the run's length, or the original run's when a resumed
    run was made longer or shorter."""

    total: int
    per_epoch: int
    warmup: int
    lr_steps: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.per_epoch)


@dataclass(frozen=True)
class Resume:
    """A checkpoint to resume from, as it was written: its trainer state and the config of its run."""

    checkpoint: Path
    progress: dict[str, Any]
    world_size: int
    data_fingerprint: str
    lr_steps: int | None  # absent from checkpoints that predate it
    config: dict[str, Any]  # as saved: keys it predates are absent


@dataclass
class Run:
    """Everything the loop trains with: the prepared model and optimizer, the data, the balancing strategy
    and where the run stands."""

    model: Any  # as `accelerator.prepare` returned it
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    data: MultiTaskData
    data_fingerprint: str
    schedule: Schedule
    balancing: Balancing
    moe: RouterBalance | None  # None for a dense model
    window: TrainWindow
    metrics: MetricsLog
    progress: Progress
    resumed_from: Path | None  # the checkpoint this launch resumed from
    preference: PreferenceLoss | None = None  # training_stage dpo or orpo
    # The frozen reference model of a full fine-tuning DPO run; None with LoRA (its base with the adapter
    # disabled is the reference) and for ORPO (none needed).
    reference: Any = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id
