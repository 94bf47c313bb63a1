"""Metrics: `logs/metrics.jsonl` (one JSON object per line) and TensorBoard, main process only.

TensorBoard tags follow MFTCoder: `Loss/train`, `Loss/valid`, `{task}_loss/train`,
`{task}_loss/valid`; we add `LR/train`, `GradNorm/train`, `TokensPerSecond/train`, and for preference
training `Preference/{rewards_chosen,rewards_rejected,margin,accuracy}/{split}` and
`{task}_{rewards_chosen,...}/{split}`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from mftcoder.losses.preference import PAIR_STATS

PREFERENCE_METRICS = ("rewards_chosen", "rewards_rejected", "margin", "accuracy")


def per_task(tasks: list[str], sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Token-weighted mean per task; a task without tokens is omitted (never NaN)."""
    return {t: float(s / c) for t, s, c in zip(tasks, sums.tolist(), counts.tolist(), strict=True) if c > 0}


def preference_metrics(tasks: list[str], stats: torch.Tensor) -> dict:
    """Rewards, margin and accuracy over all pairs and per task (`task_preference`) from per-task sums in the
    layout of `PAIR_STATS` ([5, T]); tasks without pairs are omitted."""

    def summary(s: list[float]) -> dict[str, float]:
        pairs, _, chosen, rejected, correct = s
        values = (chosen / pairs, rejected / pairs, (chosen - rejected) / pairs, correct / pairs)
        return dict(zip(PREFERENCE_METRICS, values, strict=True))

    stats = stats.double().cpu()
    out = summary(stats.sum(1).tolist()) if stats[0].sum() > 0 else {}
    out["task_preference"] = {t: summary(stats[:, i].tolist()) for i, t in enumerate(tasks) if stats[0, i] > 0}
    return out


class TrainWindow:
    """Sums over the optimizer steps since the last train log line, on this rank.

    Layout of `sums`: [objective, task CE sums (T), task target counts (T), (preference training: the pair
    sums of `PAIR_STATS`, 5 × T), tokens, router balance loss]. `weights` are the task weights the window's
    latest step applied (None: the mode has none to show).
    """

    def __init__(self, num_tasks: int, device: torch.device, pairs: bool = False):
        self.num_tasks = num_tasks
        self.device = device
        self.pairs = pairs
        self.reset()

    def reset(self) -> None:
        self.sums = self.zeros()
        self.steps = 0
        self.grad_norms: list[float] = []
        self.weights: torch.Tensor | None = None

    def zeros(self) -> torch.Tensor:
        pair_sums = len(PAIR_STATS) * self.num_tasks if self.pairs else 0
        return torch.zeros(3 + 2 * self.num_tasks + pair_sums, dtype=torch.float64, device=self.device)

    def micro_batch(
        self,
        objective: torch.Tensor,
        task_ce: torch.Tensor,
        task_tokens: torch.Tensor,
        tokens: int,
        aux=0.0,
        pair_stats: torch.Tensor | None = None,
    ):
        """One micro-batch's contribution, in the layout of `sums` (`aux`: its MoE router balance loss;
        `pair_stats`: its preference pairs' sums, [5, T])."""
        t = self.num_tasks
        vector = self.zeros()
        vector[0] = objective.detach().double()
        vector[1 : 1 + t] = task_ce.double()
        vector[1 + t : 1 + 2 * t] = task_tokens.double()
        if pair_stats is not None:
            vector[1 + 2 * t : -2] = pair_stats.double().flatten()
        vector[-2] = tokens
        vector[-1] = aux
        return vector

    def pair_parts(self, vector: torch.Tensor) -> torch.Tensor:
        """The preference pair sums [5, T] of a vector in the layout of `sums`."""
        t = self.num_tasks
        return vector[1 + 2 * t : -2].view(len(PAIR_STATS), t)

    def add_step(self, step_sums: torch.Tensor, grad_norm: float, weights: torch.Tensor | None) -> None:
        self.sums += step_sums
        self.steps += 1
        self.grad_norms.append(grad_norm)
        self.weights = weights

    def task_parts(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(task CE sums, task target counts) of a vector in the layout of `sums`, left on its device."""
        t = self.num_tasks
        return vector[1 : 1 + t], vector[1 + t : 1 + 2 * t]

    def split(self, reduced: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, int, float]:
        """Every part of a vector in the layout of `sums`, the scalars read to the host."""
        task_ce, task_targets = self.task_parts(reduced)
        return float(reduced[0]), task_ce, task_targets, int(reduced[-2]), float(reduced[-1])

    def state_dict(self) -> dict:
        weights = None if self.weights is None else self.weights.cpu()
        return {"sums": self.sums.cpu(), "steps": self.steps, "grad_norms": list(self.grad_norms), "weights": weights}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(self.device)
        self.steps = state["steps"]
        self.grad_norms = list(state["grad_norms"])
        weights = state.get("weights")  # None also in a rank file written before windows kept them
        self.weights = None if weights is None else weights.to(self.device)


class MetricsLog:
    def __init__(
        self, logs_dir: Path, enabled: bool, resume: tuple[int, int] | None = None, weight_tag: str = "weight"
    ):
        """`resume`: (step, lines) of the checkpoint resumed from. What an interrupted run logged after
        its checkpoint is dropped: lines beyond the count it had written, TensorBoard events after
        its step (events logged at that very step after the checkpoint may then appear twice)."""
        self.enabled = enabled
        self.lines = 0
        self.weight_tag = weight_tag  # `{task}_{weight_tag}/train`: MFTCoder's coba_weight and its kin
        if not enabled:
            return
        logs_dir.mkdir(parents=True, exist_ok=True)
        path = logs_dir / "metrics.jsonl"
        if resume is not None and path.is_file():
            kept = path.read_text(encoding="utf-8").splitlines()[: resume[1]]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self.lines = len(kept)
        self.jsonl = path.open("a", encoding="utf-8")
        self.tb = SummaryWriter(str(logs_dir), purge_step=None if resume is None else resume[0] + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        # allow_nan=False: a non-finite value is a bug upstream, and bare NaN is not JSON.
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()
        self.lines += 1
        step, split = record["step"], record["split"]
        self.tb.add_scalar(f"Loss/{split}", record["loss"], step)
        for task, value in record.get("task_loss", {}).items():
            self.tb.add_scalar(f"{task}_loss/{split}", value, step)
        if split == "train":
            self.tb.add_scalar("LR/train", record["lr"], step)
            self.tb.add_scalar("GradNorm/train", record["grad_norm"], step)
            self.tb.add_scalar("TokensPerSecond/train", record["tokens_per_s"], step)
            if "aux_loss" in record:
                self.tb.add_scalar("AuxLoss/train", record["aux_loss"], step)
            for task, value in record.get("task_weight", {}).items():
                self.tb.add_scalar(f"{task}_{self.weight_tag}/train", value, step)
        for name in PREFERENCE_METRICS:
            if name in record:
                self.tb.add_scalar(f"Preference/{name}/{split}", record[name], step)
        for task, values in record.get("task_preference", {}).items():
            for name, value in values.items():
                self.tb.add_scalar(f"{task}_{name}/{split}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
