"""Checkpoints that resume exactly, and the models a run exports.

    OUTPUT_DIR/base_model/               the seeded initial weights of a model built from a config
    OUTPUT_DIR/checkpoints/step-<N>/     written as step-<N>.tmp, renamed once complete
        adapter or model + tokenizer     HF-loadable, as in final/
        config.yaml                      the config of the run that wrote it
        trainer_state.json               step (= the data position), progress, early stopping, best
        optimizer.pt, scheduler.pt       one copy: single process and DDP replicate them
        scaler.pt                        the fp16 loss scale, when torch's GradScaler keeps one
        balancing.pt                     the task-weighting state (e.g. CoBa's loss history)
        state/                           instead of the optimizer, under DeepSpeed/FSDP (sharded, via Accelerate)
        rank-<i>.pt                      per rank: RNG states and the partial sums of the log window
    OUTPUT_DIR/checkpoints/latest        names the newest complete checkpoint; written last
    OUTPUT_DIR/final/, best/             HF-loadable model or adapter + tokenizer, nothing to resume with

The data position needs no sampler state: the order of every epoch is a pure function of
(seed, epoch) and every epoch has the same number of steps, so the global step says where to go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers.integrations import is_deepspeed_zero3_enabled

from mftcoder.config.loading import dump_config
from mftcoder.config.schema import TrainConfig
from mftcoder.errors import TrainingError
from mftcoder.models.provenance import BASE_INFO, base_model_info
from mftcoder.training import outputs
from mftcoder.training.state import Progress, Resume, Run

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
CONFIG = "config.yaml"
OPTIMIZER = "optimizer.pt"
SCALER = "scaler.pt"
SCHEDULER = "scheduler.pt"
BALANCING = "balancing.pt"
SHARDED = "state"
RANK_FILES = "rank-*.pt"
# What only resuming needs: an exported best/ leaves it out.
TRAINING_ONLY = (OPTIMIZER, SCALER, SCHEDULER, BALANCING, RANK_FILES, SHARDED, CONFIG)
# Under these, Accelerate saves and loads the (sharded) optimizer, model and scheduler in state/.
SHARDED_STATE = (DistributedType.DEEPSPEED, DistributedType.FSDP)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rank_file(rank: int) -> str:
    return RANK_FILES.replace("*", str(rank))


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step}"


def checkpoint_steps(checkpoints: Path) -> list[int]:
    if not checkpoints.is_dir():
        return []
    return sorted(int(m.group(1)) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


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


def rotate_checkpoints(checkpoints: Path, limit: int | None, keep: set[int]) -> list[int]:
    """Delete the oldest step checkpoints beyond `limit`, never one in `keep` (latest, best)."""
    if limit is None:
        return []
    steps = checkpoint_steps(checkpoints)
    removable = [s for s in steps if s not in keep]
    excess = len(steps) - limit
    doomed = removable[: max(0, excess)]
    for step in doomed:
        shutil.rmtree(checkpoint_dir(checkpoints, step))
    return doomed


def load_weights(model, directory: Path, peft: bool) -> None:
    """A checkpoint's weights into a freshly built (unwrapped) model."""
    if peft:
        result = set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        unexpected = result.unexpected_keys
    else:
        index = directory / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
        state = {}
        for name in files:
            state.update(load_file(directory / name))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        if untied := [k for k in missing if k not in tied]:
            raise TrainingError(f"{directory}: the checkpoint lacks weights {untied[:5]}")
    if unexpected:
        raise TrainingError(f"{directory}: the checkpoint holds weights the model does not have: {unexpected[:5]}")


def data_fingerprint(samples: Iterable) -> str:
    """Identifies the tokenized training data; a resume on edited data is refused."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.input_ids.tobytes())
        digest.update(sample.loss_mask.tobytes())
        digest.update(int(sample.task_id).to_bytes(4, "little"))
    return digest.hexdigest()


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


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def free_space_problem(directory: Path, needed: int) -> str:
    """A reason not to start writing a checkpoint of about `needed` bytes, or ""."""
    free = shutil.disk_usage(directory).free
    margin = needed // 5 + (64 << 20)
    if free < needed + margin:
        return f"only {free / 2**20:.0f} MiB free in {directory}, a checkpoint needs about {needed / 2**20:.0f} MiB"
    return ""


class Checkpointer:
    """Writes one run's checkpoints and exported models, and restores a run from a checkpoint. Every
    method is called on every rank: the ranks write their shards and agree on the outcome."""

    def __init__(self, accelerator, config: TrainConfig):
        self.accelerator = accelerator
        self.config = config
        self.main = accelerator.is_main_process
        self.out = Path(config.output_dir)
        self.dir = self.out / "checkpoints"
        self.sharded = accelerator.distributed_type in SHARDED_STATE

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, run: Run) -> None:
        """Write checkpoints/step-<N>.tmp, rename it, then point `latest` at it; a failure leaves the
        previous checkpoint and `latest` as they were, and training goes on."""
        p, acc = run.progress, self.accelerator
        if p.last_checkpoint_step == p.step:
            return
        directory = checkpoint_dir(self.dir, p.step)
        tmp = directory.with_name(directory.name + ".tmp")
        state = acc.get_state_dict(run.model)
        problem = ""
        if self.main:
            try:
                previous = latest_checkpoint(self.dir)
                self.dir.mkdir(parents=True, exist_ok=True)
                needed = directory_bytes(previous) if previous else self._first_checkpoint_bytes(run.model)
                problem = free_space_problem(self.dir, needed)
                if not problem:
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    self._write_model(tmp, run, state)
                    self._write_training_state(tmp, run)
            except OSError as err:
                problem = f"{type(err).__name__}: {err}"
        problem = self._agree(problem)
        if not problem:
            try:
                if self.sharded:
                    acc.save_state(str(tmp / SHARDED))
                torch.save({"rng": rng_state(), "window": run.window.state_dict()}, tmp / rank_file(acc.process_index))
            except OSError as err:
                problem = f"{type(err).__name__}: {err}"
            problem = self._agree(problem)
        if self.main and not problem:
            try:
                outputs.publish(tmp, directory)
                outputs.write_atomic(self.dir / LATEST, f"{directory.name}\n")
            except OSError as err:
                problem = f"{type(err).__name__}: {err}"
        problem = self._agree(problem)
        if problem:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
                kept = latest_checkpoint(self.dir)
                acc.print(
                    f"\nwarning: checkpoint {directory.name} was not written ({problem}); "
                    + (
                        f"the previous checkpoint {kept.name} and `latest` are intact"
                        if kept
                        else "no earlier checkpoint exists"
                    )
                    + "; training goes on"
                )
        else:
            p.last_checkpoint_step = p.step
            if self.main:
                keep = {p.step} | ({p.best_step} if p.best_step is not None else set())
                rotate_checkpoints(self.dir, self.config.saving_limit, keep)
        acc.wait_for_everyone()

    def restore(self, resume: Resume, optimizer, scheduler, balancing, window) -> Progress:
        """The optimizer, scheduler, balancing state, RNG and log window of a prepared run, and the progress it
        continues from (the weights were loaded before `prepare`, or come with the sharded state)."""
        acc, checkpoint = self.accelerator, resume.checkpoint
        if self.sharded:
            acc.load_state(str(checkpoint / SHARDED))
        else:
            optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER, map_location="cpu", weights_only=False))
            if acc.scaler is not None and (checkpoint / SCALER).is_file():
                acc.scaler.load_state_dict(torch.load(checkpoint / SCALER, weights_only=False))
            elif acc.scaler is not None:
                acc.print(f"resume: {checkpoint} holds no fp16 loss scale (written without fp16); it starts afresh")
        scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER, weights_only=False))
        balancing.load_state_dict(torch.load(checkpoint / BALANCING, weights_only=False))
        progress = Progress(**resume.progress)
        if resume.config.get("metric_for_best") != self.config.metric_for_best:
            # The best so far was measured by another number: comparing against it would mislead best/ and
            # early stopping.
            progress.best_metric, progress.best_step, progress.stalls = math.inf, None, 0
            acc.print(f"resume: metric_for_best is now {self.config.metric_for_best}; the best model is tracked afresh")
        rank_state = checkpoint / rank_file(acc.process_index)
        if resume.world_size == acc.num_processes and rank_state.is_file():
            saved = torch.load(rank_state, weights_only=False)
            set_rng_state(saved["rng"])
            window.load_state_dict(saved["window"])
        else:
            acc.print("resuming on another world size: RNG and log-window state start afresh (inexact resume)")
        return progress

    # --- exported models ---------------------------------------------------------------------
    def save_base(self, model, tokenizer) -> Path:
        """The seeded initial weights, written once (a resume finds them there) and atomically.
        Under ZeRO-3 the model is built sharded: gather it (every rank) for the main process to write."""
        base_dir = self.out / "base_model"
        if base_dir.is_dir():
            return base_dir
        gather = contextlib.nullcontext()
        if is_deepspeed_zero3_enabled():
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
        with gather:
            if self.main:
                tmp = base_dir.with_name("base_model.tmp")
                if tmp.exists():
                    shutil.rmtree(tmp)
                outputs.save_pretrained(tmp, model, tokenizer, state_dict=None)
                outputs.publish(tmp, base_dir)
        self.accelerator.wait_for_everyone()
        return base_dir

    def save_final(self, run: Run) -> Path:
        acc = self.accelerator
        final = self.out / "final"
        state = acc.get_state_dict(run.model)
        if self.main:
            tmp = final.with_name("final.tmp")
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                self._write_model(tmp, run, state)
                outputs.publish(tmp, final)
            except OSError as err:
                raise TrainingError(
                    f"the final model could not be written to {final} ({type(err).__name__}: {err}); "
                    f"the latest checkpoint in {self.dir} is intact"
                ) from None
        acc.wait_for_everyone()
        return final

    def export_best(self, progress: Progress) -> None:
        """best/: the checkpoint of the best step without what only resuming needs."""
        best = progress.best_step
        source = checkpoint_dir(self.dir, best) if best is not None else None
        if not self.main or source is None or not source.is_dir():
            return
        tmp = self.out / "best.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*TRAINING_ONLY))
        outputs.publish(tmp, self.out / "best")
        self.accelerator.print(f"best/ = step {best} ({self.config.metric_for_best} {progress.best_metric:.4f})")

    # --- parts -------------------------------------------------------------------------------
    def _write_model(self, directory: Path, run: Run, state: dict) -> None:
        """HF-loadable adapter or model + tokenizer (main process)."""
        model = self.accelerator.unwrap_model(run.model)
        outputs.save_pretrained(directory, model, run.tokenizer, state)
        if self.config.peft_type:
            outputs.write_json(directory / BASE_INFO, base_model_info(model.get_base_model()))

    def _write_training_state(self, directory: Path, run: Run) -> None:
        """What resuming needs beyond the weights (main process; DeepSpeed/FSDP shard theirs in state/)."""
        run.progress.logged_lines = run.metrics.lines
        if not self.sharded:
            torch.save(run.optimizer.state_dict(), directory / OPTIMIZER)
            if self.accelerator.scaler is not None:  # the fp16 loss scale and its growth tracker
                torch.save(self.accelerator.scaler.state_dict(), directory / SCALER)
        torch.save(run.scheduler.state_dict(), directory / SCHEDULER)
        torch.save(run.balancing.state_dict(), directory / BALANCING)
        outputs.write_atomic(directory / CONFIG, dump_config(self.config))
        outputs.write_json(
            directory / TRAINER_STATE,
            {
                "progress": asdict(run.progress),
                "world_size": self.accelerator.num_processes,
                "data": run.data_fingerprint,
                "lr_steps": run.schedule.lr_steps,
            },
        )

    def _agree(self, problem: str) -> str:
        """Every rank learns whether any rank failed (they must all keep or all drop the checkpoint)."""
        failed = torch.tensor(float(bool(problem)), device=self.accelerator.device)
        if float(self.accelerator.reduce(failed, reduction="sum")) and not problem:
            return "another process could not write its part"
        return problem

    def _first_checkpoint_bytes(self, model) -> int:
        """Rough size of a first checkpoint: the saved weights plus two fp32 Adam moments."""
        params = list(self.accelerator.unwrap_model(model).parameters())
        trainable = sum(q.numel() for q in params if q.requires_grad)
        saved = trainable * 4 if self.config.peft_type else sum(q.numel() * q.element_size() for q in params)
        return saved + 8 * trainable
