"""Metrics: `logs/metrics.jsonl` (one JSON object per line) and TensorBoard, main process only.

TensorBoard tags follow MFTCoder: `Loss/train`, `Loss/valid`, `{task}_loss/train`,
`{task}_loss/valid`; we add `LR/train`, `GradNorm/train`, `TokensPerSecond/train`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


def per_task(tasks: list[str], sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Token-weighted mean per task; a task without tokens is omitted (never NaN)."""
    return {t: float(s / c) for t, s, c in zip(tasks, sums.tolist(), counts.tolist(), strict=True) if c > 0}


class TrainWindow:
    """Sums over the optimizer steps since the last train log line, on this rank."""

    def __init__(self, num_tasks: int, device: torch.device):
        self.num_tasks = num_tasks
        self.device = device
        self.reset()

    def reset(self) -> None:
        # [objective sum, task CE sums (T), task target counts (T), tokens]
        self.sums = torch.zeros(2 + 2 * self.num_tasks, dtype=torch.float64, device=self.device)
        self.steps = 0
        self.grad_norms: list[float] = []

    def add_micro_batch(self, objective: torch.Tensor, task_ce: torch.Tensor, task_tokens: torch.Tensor, tokens: int):
        t = self.num_tasks
        self.sums[0] += objective.detach().double()
        self.sums[1 : 1 + t] += task_ce.double()
        self.sums[1 + t : 1 + 2 * t] += task_tokens.double()
        self.sums[-1] += tokens

    def split(self, reduced: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, int]:
        t = self.num_tasks
        return float(reduced[0]), reduced[1 : 1 + t], reduced[1 + t : 1 + 2 * t], int(reduced[-1])


class MetricsLog:
    def __init__(self, logs_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (logs_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.tb = SummaryWriter(str(logs_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        # allow_nan=False: a non-finite value is a bug upstream, and bare NaN is not JSON.
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()
        step, split = record["step"], record["split"]
        self.tb.add_scalar(f"Loss/{split}", record["loss"], step)
        for task, value in record.get("task_loss", {}).items():
            self.tb.add_scalar(f"{task}_loss/{split}", value, step)
        if split == "train":
            self.tb.add_scalar("LR/train", record["lr"], step)
            self.tb.add_scalar("GradNorm/train", record["grad_norm"], step)
            self.tb.add_scalar("TokensPerSecond/train", record["tokens_per_s"], step)
            for task, value in record.get("task_weight", {}).items():
                self.tb.add_scalar(f"{task}_weight/train", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
