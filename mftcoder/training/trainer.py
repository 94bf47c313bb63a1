"""The training loop: explicit, on Accelerate, one optimizer step at a time.

Each step prefetches its micro-batches (gradient accumulation), all-reduces their per-task
counts, then runs forward/backward per micro-batch with token coefficients from those global
counts (`mftcoder.losses.modes`), so the objective is that of the whole step on all ranks.

The global step is also the data position (every epoch has the same number of steps and its order
is a pure function of the seed and the epoch), which makes resuming exact: a checkpoint holds the
weights, the optimizer and scheduler, every rank's RNG and partial log window, and the counters.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers.integrations import is_deepspeed_zero3_enabled

from mftcoder.config.loading import dump_config
from mftcoder.config.schema import TrainConfig
from mftcoder.data.batching import rank_micro_batches
from mftcoder.data.dataset import build_datasets, report_table, steps_per_epoch
from mftcoder.data.template import chat_format
from mftcoder.data.tokenizer import load_tokenizer
from mftcoder.errors import LaunchError, TrainingError
from mftcoder.losses.balancing import loss_vector
from mftcoder.losses.modes import batch_counts, task_sums, token_losses
from mftcoder.losses.moe import router_balance, router_balance_loss
from mftcoder.losses.weighting import balancing_warnings, build_balancing
from mftcoder.models.loading import cast_trainable, load_model, wrap_lora
from mftcoder.models.packing_check import check_packed_isolation
from mftcoder.models.provenance import BASE_INFO, base_model_info
from mftcoder.training import checkpoint as ckpt
from mftcoder.training import outputs
from mftcoder.training.evaluation import Evaluation, evaluate, forward_token_losses, model_outputs, to_device
from mftcoder.training.launch import COMPUTE_DTYPE, build_accelerator, run_info
from mftcoder.training.metrics import MetricsLog, TrainWindow, per_task
from mftcoder.training.optim import build_optimizer, build_scheduler, lr_at, warmup_steps
from mftcoder.training.signals import StopRequest
from mftcoder.training.step_outcome import Outcome, step_outcome

SHARDED_STATE = (DistributedType.DEEPSPEED, DistributedType.FSDP)


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
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when stopped by a signal (a checkpoint was saved instead)
    steps: int  # the global step reached
    steps_run: int  # optimizer steps made by this process (fewer than `steps` after a resume)
    progress: Progress
    stopped_by: str = ""  # "SIGTERM" / "SIGINT" when preempted


def _load_weights(model, directory: Path, peft: bool) -> None:
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


def _real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where a batch holds tokens rather than padding: its attention mask, or in pack mode `tokens`."""
    return (batch["attention_mask"] if "attention_mask" in batch else batch["tokens"]).bool()


class Trainer:
    """Holds one run's state; `train()` tells the story top to bottom, one method per chapter."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.accelerator = build_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.out = Path(config.output_dir)
        self.logs = self.out / "logs"
        self.checkpoints = self.out / "checkpoints"
        self.progress = Progress()

    # --- setup -----------------------------------------------------------------------------
    def _output_dir_plan(self, resume_from: Path | None) -> list[str]:
        """What of an earlier run in output_dir to remove; refuses (changing nothing) when not allowed."""
        if resume_from is not None and self.out.resolve() in resume_from.resolve().parents:
            return []  # continuing the run that lives here
        if resume_from is None and self.config.resume_from_checkpoint == "auto":
            self.accelerator.print(
                f"resume_from_checkpoint=auto: no complete checkpoint in {self.checkpoints}; starting fresh"
            )
            return outputs.check_output_dir(self.out, overwrite=True)
        return outputs.check_output_dir(self.out, self.config.overwrite_output_dir)

    def _prepare_output_dir(self, info: dict, stale: list[str]) -> None:
        if self.main:
            if stale:
                self.accelerator.print(f"removing {', '.join(stale)} of an earlier run from {self.out}")
                outputs.clear_artefacts(self.out, stale)
            self.logs.mkdir(parents=True, exist_ok=True)
            outputs.write_atomic(self.out / "config.yaml", dump_config(self.config))
            outputs.write_json(self.out / "run.json", info)
        self.accelerator.wait_for_everyone()

    def _save_base(self, base_dir: Path, model, tokenizer) -> None:
        """The seeded initial weights, written once (a resume finds them there) and atomically.
        Under ZeRO-3 the model is built sharded: gather it (every rank) for the main process to write."""
        if base_dir.is_dir():
            return
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

    def _build_model(self, tokenizer):
        config = self.config
        compute = COMPUTE_DTYPE[self.accelerator.mixed_precision]
        # Trainable weights and optimizer state stay fp32; a frozen (Q)LoRA base lives in the compute dtype.
        storage = compute if config.peft_type else torch.float32
        model = load_model(config, tokenizer, storage)
        base_ref = config.pretrained_model_path
        if config.model_init == "from_config":
            base_dir = self.out / "base_model"
            self._save_base(base_dir, model, tokenizer)
            base_ref = str(base_dir)
            if config.peft_type == "qlora":  # bitsandbytes quantises while loading: read the saved weights back
                model = load_model(config, tokenizer, storage, source=base_dir)
        if config.peft_type:
            set_seed(config.seed)  # identical LoRA initialisation on every rank
            model = wrap_lora(config, model)
            model.peft_config["default"].base_model_name_or_path = base_ref
            # DeepSpeed keeps its own fp32 master copy and trains in the compute dtype; elsewhere the
            # trainable weights are the master copy and stay fp32.
            deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
            cast_trainable(model, compute if deepspeed else torch.float32)
        if config.torch_compile:
            model.compile()  # in place: state-dict keys, saving and unwrapping stay as they are
        return model

    # --- one optimizer step ----------------------------------------------------------------
    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of every step of `epoch` (lists of sample indices)."""
        config, acc = self.config, self.accelerator
        order = self.data.epoch_order(config.seed, epoch)
        micro = rank_micro_batches(order, config.per_device_train_batch_size, acc.num_processes, acc.process_index)
        ga = config.gradient_accumulation_steps
        return [micro[i : i + ga] for i in range(0, len(micro), ga)]

    def _optimizer_step(self, micro_batches: list[list[int]]) -> tuple[torch.Tensor, float, Outcome]:
        """Forward/backward over the step's micro-batches and the update; returns this rank's sums for
        the log window, the gradient norm, and what became of the update (the same on every rank)."""
        acc, config, data = self.accelerator, self.config, self.data
        num_tasks = len(data.tasks)
        batches = [data.train.batch(indices, self.pad_id) for indices in micro_batches]
        local_counts = [batch_counts(b, num_tasks) for b in batches]
        step_counts = acc.reduce(torch.stack(local_counts).sum(0).to(acc.device), reduction="sum")
        # accelerate divides by its accumulation steps; DDP averages over ranks: undo both, since the
        # coefficients already normalise over the whole step.
        scale = config.gradient_accumulation_steps * acc.num_processes
        step_sums = self.window.zeros()
        for i, (indices, batch) in enumerate(zip(micro_batches, batches, strict=True)):
            last = i == len(batches) - 1
            acc.sync_gradients = last
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                batch = to_device(batch, acc.device)
                if self.moe is None:
                    ce, aux = forward_token_losses(self.model, batch), None
                else:
                    out = model_outputs(self.model, batch, output_router_logits=True)
                    ce = token_losses(out.logits, batch["targets"])
                    # A rank whose share of the step ran out runs a dummy row without real tokens:
                    # nothing to balance (the formula would be 0/0); a zero tied to the router keeps
                    # the same parameters in every rank's graph.
                    aux = (
                        router_balance_loss(out.router_logits, self.moe, _real_tokens(batch))
                        if indices
                        else out.router_logits[0].sum() * 0
                    )
                coef = self.balancing.coefficients(batch, ce, step_counts)
                objective = (coef * ce).sum()
                # The router balance loss of each forward, averaged over the step's forwards on all ranks.
                loss = objective if aux is None else objective + self.moe.coefficient * aux / scale
                acc.backward(loss * scale)
            tokens = data.train.tokens(indices)
            step_sums += self.window.micro_batch(
                objective, task_sums(ce.detach(), batch, num_tasks), local_counts[i][0], tokens,
                0.0 if aux is None else aux.detach(),
            )  # fmt: skip
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm or math.inf))
        # One all-reduce tells every rank whether the step was finite and feeds the step's per-task
        # train losses to the balancing strategy (focal's task difficulty).
        step_total = acc.reduce(step_sums.clone(), reduction="sum")
        loss_finite = math.isfinite(float(step_total[0]))
        finite = loss_finite and math.isfinite(grad_norm)
        self.progress.lr = self.optimizer.param_groups[0]["lr"]
        scale = self._loss_scale()
        applied = self._update(finite)
        outcome = step_outcome(loss_finite, math.isfinite(grad_norm), applied, scale, self.progress.step + 1)
        if outcome is Outcome.OVERFLOW:
            self._overflow(scale)
        if outcome is Outcome.APPLIED:
            _, task_ce, task_targets, _, _ = self.window.split(step_total)
            self.balancing.observe(task_ce, task_targets)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_sums, grad_norm, outcome

    def _update(self, finite: bool) -> bool:
        """Apply the step's update where this is still to decide; True when it reached the weights."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # The engine already stepped inside the last backward, and skipped the update itself on
            # non-finite gradients: ask it what it did.
            return self.model.was_step_applied()
        if acc.scaler is not None:
            if not finite:
                # The scaler still closes the step (unscale_ ran in clipping) and lowers its scale, or the next
                # step would fail.
                acc.scaler.update()
                return False
            self.optimizer.step()
            return not self.optimizer.step_was_skipped
        if finite:
            self.optimizer.step()
        return finite

    def _loss_scale(self) -> float | None:
        """The dynamic fp16 loss scale in use, if any (torch's GradScaler, or DeepSpeed's own)."""
        acc = self.accelerator
        if acc.scaler is not None:
            return float(acc.scaler.get_scale())
        if acc.distributed_type == DistributedType.DEEPSPEED and self.model.fp16_enabled():
            return float(self.model.optimizer.loss_scale)
        return None

    def _overflow(self, scale: float) -> None:
        p = self.progress
        p.overflow_steps += 1
        now = self._loss_scale()
        change = f"lowered from {scale:g} to {now:g}" if now < scale else f"kept at {now:g}"
        self.accelerator.print(
            f"\nstep {p.step + 1}: fp16 gradients overflowed; update skipped, loss scale {change} "
            f"({p.overflow_steps} overflows so far; not counted by on_nan)"
        )

    def _non_finite(self, group: list[list[int]]) -> None:
        """Count a skipped update, or stop naming the step and its tasks."""
        p, config = self.progress, self.config
        tasks = sorted({self.data.tasks[t] for indices in group for t in self.data.train.task_ids(indices)})
        where = f"step {p.step}: non-finite loss or gradient norm (tasks in this rank's batch: {', '.join(tasks)})"
        p.skipped_steps += 1
        p.consecutive_nan += 1
        if config.on_nan == "stop" or p.consecutive_nan >= config.max_consecutive_nan:
            reason = "on_nan: stop" if config.on_nan == "stop" else f"{p.consecutive_nan} in a row"
            raise TrainingError(f"{where}; stopping ({reason}). Lower the learning rate or check the data")
        self.accelerator.print(f"\n{where}; update skipped ({p.skipped_steps} so far)")

    # --- logging, evaluation -----------------------------------------------------------------
    def _log_train(self, epoch: float) -> dict:
        window, p = self.window, self.progress
        reduced = self.accelerator.reduce(window.sums.clone(), reduction="sum")
        objective, task_ce, task_tokens, tokens, aux = window.split(reduced)
        p.tokens += tokens
        p.targets += int(task_tokens.sum())
        record = {
            "step": p.step,
            "epoch": round(epoch, 4),
            "split": "train",
            "loss": objective / window.steps,
            "lr": p.lr,
            "grad_norm": sum(window.grad_norms) / len(window.grad_norms),
            "task_loss": per_task(self.data.tasks, task_ce, task_tokens),
            "tokens": p.tokens,
            "targets": p.targets,
            "train_seconds": round(p.train_seconds, 3),
            "tokens_per_s": round(p.tokens / max(p.train_seconds, 1e-9), 1),
        }
        if p.skipped_steps:
            record["skipped_steps"] = p.skipped_steps
        if (scale := self._loss_scale()) is not None:
            record["loss_scale"] = scale
        if p.overflow_steps:
            record["overflow_steps"] = p.overflow_steps
        if self.moe is not None:
            forwards = window.steps * self.config.gradient_accumulation_steps * self.accelerator.num_processes
            record["aux_loss"] = aux / forwards  # the router balance loss per forward, before its coefficient
        weights = window.weights
        if weights is not None:
            # Every rank computes the weights from the same all-reduced inputs: checked, not assumed.
            if not bool((self.accelerator.gather(weights[None]) == weights).all()):
                raise TrainingError(f"step {p.step}: the processes disagree on the task weights")
            record["task_weight"] = dict(zip(self.data.tasks, weights.tolist(), strict=True))
        self.metrics.write(record)
        window.reset()
        return record

    def _evaluate(self) -> bool:
        """Evaluate, log, track the best; True when early stopping says stop."""
        config, p = self.config, self.progress
        result: Evaluation = evaluate(
            self.model,
            self.accelerator,
            self.data.valid,
            self.data.tasks,
            config.per_device_eval_batch_size,
            self.pad_id,
        )
        p.last_eval_step = p.step
        self.metrics.write(
            {
                "step": p.step,
                "split": "valid",
                "loss": result.loss,
                "task_mean": result.task_mean,
                "task_loss": result.task_loss,
            }
        )
        self.accelerator.print(
            f"\nstep {p.step} valid loss {result.loss:.4f} task_mean {result.task_mean:.4f} "
            + " ".join(f"{t}={v:.4f}" for t, v in result.task_loss.items())
        )
        metric = result.metric(config.metric_for_best)
        if metric < p.best_metric:
            p.best_metric, p.best_step, p.stalls = metric, p.step, 0
            # best/ is exported from a checkpoint, so the best step always gets one.
            self._checkpoint()
        else:
            p.stalls += 1
        return config.early_stopping and p.stalls >= config.early_stopping_stall_num

    def _validation_update(self, full: bool) -> None:
        """Feed a validation-driven strategy (self-paced, CoBa): the whole split before training, then
        the samples it draws for this step; evaluated together by every rank."""
        config, p = self.config, self.progress
        units = None if full else self.balancing.validation_indices(self.data.valid.units)
        result = evaluate(
            self.model,
            self.accelerator,
            self.data.valid,
            self.data.tasks,
            config.per_device_eval_batch_size,
            self.pad_id,
            units=units,
        )
        if full:
            self.metrics.write({"step": p.step, "split": "valid", "loss": result.loss, "task_loss": result.task_loss})
        self.balancing.update(p.step, loss_vector(self.data.tasks, result.task_loss))

    # --- saving ----------------------------------------------------------------------------
    def _write_model(self, directory: Path, state: dict) -> None:
        """HF-loadable adapter or model + tokenizer (main process)."""
        model = self.accelerator.unwrap_model(self.model)
        outputs.save_pretrained(directory, model, self.tokenizer, state)
        if self.config.peft_type:
            outputs.write_json(directory / BASE_INFO, base_model_info(model.get_base_model()))

    def _write_training_state(self, directory: Path) -> None:
        """What resuming needs beyond the weights (main process; DeepSpeed/FSDP shard theirs in state/)."""
        self.progress.logged_lines = self.metrics.lines
        if self.accelerator.distributed_type not in SHARDED_STATE:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            if self.accelerator.scaler is not None:  # the fp16 loss scale and its growth tracker
                torch.save(self.accelerator.scaler.state_dict(), directory / "scaler.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        torch.save(self.balancing.state_dict(), directory / "balancing.pt")
        outputs.write_atomic(directory / "config.yaml", dump_config(self.config))
        outputs.write_json(
            directory / ckpt.TRAINER_STATE,
            {
                "progress": asdict(self.progress),
                "world_size": self.accelerator.num_processes,
                "data": self.data_fingerprint,
                "lr_steps": self.schedule.lr_steps,
            },
        )

    def _agree(self, problem: str) -> str:
        """Every rank learns whether any rank failed (they must all keep or all drop the checkpoint)."""
        failed = torch.tensor(float(bool(problem)), device=self.accelerator.device)
        if float(self.accelerator.reduce(failed, reduction="sum")) and not problem:
            return "another process could not write its part"
        return problem

    def _checkpoint(self) -> None:
        """Write checkpoints/step-<N>.tmp, rename it, then point `latest` at it; a failure leaves the
        previous checkpoint and `latest` as they were, and training goes on."""
        p, acc = self.progress, self.accelerator
        if p.last_checkpoint_step == p.step:
            return
        directory = outputs.checkpoint_dir(self.checkpoints, p.step)
        tmp = directory.with_name(directory.name + ".tmp")
        state = acc.get_state_dict(self.model)
        problem = ""
        if self.main:
            try:
                previous = ckpt.latest_checkpoint(self.checkpoints)
                self.checkpoints.mkdir(parents=True, exist_ok=True)
                needed = ckpt.directory_bytes(previous) if previous else self._checkpoint_bytes()
                problem = ckpt.free_space_problem(self.checkpoints, needed)
                if not problem:
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    self._write_model(tmp, state)
                    self._write_training_state(tmp)
            except OSError as err:
                problem = f"{type(err).__name__}: {err}"
        problem = self._agree(problem)
        if not problem:
            try:
                if acc.distributed_type in SHARDED_STATE:
                    acc.save_state(str(tmp / "state"))
                torch.save(
                    {"rng": ckpt.rng_state(), "window": self.window.state_dict()}, tmp / f"rank-{acc.process_index}.pt"
                )
            except OSError as err:
                problem = f"{type(err).__name__}: {err}"
            problem = self._agree(problem)
        if self.main and not problem:
            try:
                outputs.publish(tmp, directory)
                outputs.write_atomic(self.checkpoints / ckpt.LATEST, f"{directory.name}\n")
            except OSError as err:
                problem = f"{type(err).__name__}: {err}"
        problem = self._agree(problem)
        if problem:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
                kept = ckpt.latest_checkpoint(self.checkpoints)
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
                outputs.rotate_checkpoints(self.checkpoints, self.config.saving_limit, keep)
        acc.wait_for_everyone()

    def _checkpoint_bytes(self) -> int:
        """Rough size of a first checkpoint: the saved weights plus two fp32 Adam moments."""
        params = list(self.accelerator.unwrap_model(self.model).parameters())
        trainable = sum(q.numel() for q in params if q.requires_grad)
        saved = trainable * 4 if self.config.peft_type else sum(q.numel() * q.element_size() for q in params)
        return saved + 8 * trainable

    def _save_final(self) -> Path:
        acc = self.accelerator
        final = self.out / "final"
        state = acc.get_state_dict(self.model)
        if self.main:
            tmp = final.with_name("final.tmp")
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                self._write_model(tmp, state)
                outputs.publish(tmp, final)
            except OSError as err:
                raise TrainingError(
                    f"the final model could not be written to {final} ({type(err).__name__}: {err}); "
                    f"the latest checkpoint in {self.checkpoints} is intact"
                ) from None
        acc.wait_for_everyone()
        return final

    def _export_best(self) -> None:
        best = self.progress.best_step
        source = outputs.checkpoint_dir(self.checkpoints, best) if best is not None else None
        if not self.main or source is None or not source.is_dir():
            return
        tmp = self.out / "best.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(
            source,
            tmp,
            ignore=shutil.ignore_patterns(
                "optimizer.pt", "scaler.pt", "scheduler.pt", "balancing.pt", "rank-*.pt", "state", "config.yaml"
            ),
        )
        outputs.publish(tmp, self.out / "best")
        self.accelerator.print(f"best/ = step {best} ({self.config.metric_for_best} {self.progress.best_metric:.4f})")

    # --- resuming --------------------------------------------------------------------------
    def _restore_training_state(self, checkpoint: Path, saved: dict) -> None:
        acc = self.accelerator
        if acc.distributed_type in SHARDED_STATE:
            acc.load_state(str(checkpoint / "state"))
        else:
            self.optimizer.load_state_dict(
                torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
            )
            if acc.scaler is not None and (checkpoint / "scaler.pt").is_file():
                acc.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=False))
            elif acc.scaler is not None:
                acc.print(f"resume: {checkpoint} holds no fp16 loss scale (written without fp16); it starts afresh")
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
        self.balancing.load_state_dict(torch.load(checkpoint / "balancing.pt", weights_only=False))
        self.progress = Progress(**saved["progress"])
        if saved["config"].get("metric_for_best") != self.config.metric_for_best:
            # The best so far was measured by another number: comparing against it would mislead best/ and
            # early stopping.
            p = self.progress
            p.best_metric, p.best_step, p.stalls = math.inf, None, 0
            acc.print(f"resume: metric_for_best is now {self.config.metric_for_best}; the best model is tracked afresh")
        rank_file = checkpoint / f"rank-{acc.process_index}.pt"
        if saved["world_size"] == acc.num_processes and rank_file.is_file():
            rank_state = torch.load(rank_file, weights_only=False)
            ckpt.set_rng_state(rank_state["rng"])
            self.window.load_state_dict(rank_state["window"])
        else:
            acc.print("resuming on another world size: RNG and log-window state start afresh (inexact resume)")

    # --- the run ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        info = run_info(self.accelerator, self.config)
        resume_from, saved = self._resume_point(info)
        # Refuse a used output directory before anything is written; write nothing until the data
        # has loaded, so that a bad record leaves no half-started run behind.
        stale = self._output_dir_plan(resume_from)
        self.accelerator.print(
            f"mftcoder: world_size={info['world_size']} distributed={info['distributed_type']} "
            f"mixed_precision={info['mixed_precision']} gradient_accumulation={self.config.gradient_accumulation_steps} "
            f"global_batch={info['global_batch_size']} device={info['device']}"
        )
        self._load_data(resume_from, saved)
        self.accelerator.wait_for_everyone()  # every rank has checked the output directory before it changes
        self._prepare_output_dir(info, stale)
        if self.main:
            outputs.write_json(self.logs / "data_report.json", self.data.report_dict())
            self.accelerator.print(report_table(self.data.report))
        schedule = self.schedule = self._schedule(saved)
        self._build_training(schedule, resume_from, saved)
        start = self.progress.step
        stopped_by = self._run(schedule)
        if stopped_by:
            return TrainResult(
                self.out, None, self.progress.step, self.progress.step - start, self.progress, stopped_by
            )
        return self._finish(schedule, start)

    def _resume_point(self, info: dict) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its trainer state, checked against this launch."""
        acc = self.accelerator
        resume_from = ckpt.resolve_resume(self.config)
        if resume_from is None:
            return None, None
        saved = json.loads((resume_from / ckpt.TRAINER_STATE).read_text())
        if acc.distributed_type in SHARDED_STATE and not (resume_from / "state").is_dir():
            raise LaunchError(
                f"{resume_from} was written without DeepSpeed/FSDP state; resume it with the launcher that wrote it"
            )
        for change in ckpt.check_compatible(resume_from, self.config, saved["world_size"], acc.num_processes):
            acc.print(f"resume: accepted change {change}")
        info["resumed_from"] = str(resume_from)
        return resume_from, {**saved, "config": ckpt.saved_config(resume_from)}

    def _load_data(self, resume_from: Path | None, saved: dict | None) -> None:
        config = self.config
        self.tokenizer = load_tokenizer(config)
        self.pad_id = self.tokenizer.pad_token_id
        self.data = build_datasets(config, self.tokenizer, chat_format(config, self.tokenizer))
        self.data_fingerprint = ckpt.data_fingerprint(self.data.train + self.data.valid)
        if saved and saved["data"] != self.data_fingerprint:
            raise LaunchError(
                f"the training data changed since {resume_from} (its tokenized samples differ): an exact resume "
                "is impossible; restore the data or start a new run"
            )

    def _schedule(self, saved: dict | None) -> Schedule:
        config, acc = self.config, self.accelerator
        per_epoch = steps_per_epoch(
            self.data.epoch_size,
            config.per_device_train_batch_size,
            acc.num_processes,
            config.gradient_accumulation_steps,
        )
        total = config.max_train_steps or per_epoch * config.num_train_epochs
        # A resumed run continues the learning-rate schedule it started, even when it is now longer or shorter:
        # rebuilt for the new length, the rate would jump at the resumed step.
        lr_steps = total
        if saved:
            before = saved["config"]  # a checkpoint that predates `lr_steps` ran the schedule of its own length
            lr_steps = saved.get("lr_steps") or before.get("max_train_steps") or per_epoch * before["num_train_epochs"]
        warmup, warning = warmup_steps(config.num_warmup_steps, lr_steps)
        for message in ([warning] if warning else []) + balancing_warnings(config, total):
            acc.print(f"warning: {message}")
        if lr_steps != total:
            shape = dict(peak=config.learning_rate, min_lr=config.min_lr, warmup=warmup, total=lr_steps)
            final_rate = lr_at(lr_steps, **shape, kind=config.lr_scheduler_type)
            after = (
                f"steps {lr_steps + 1}-{total} run at its final rate {final_rate:g}"
                if total > lr_steps
                else f"the run stops at step {total}, before the schedule ends"
            )
            acc.print(
                f"resume: the run now has {total} steps, its learning-rate schedule keeps the original {lr_steps} "
                f"(warm-up {warmup}); {after}. Not the run a fresh start with these settings would make"
            )
        return Schedule(total, per_epoch, warmup, lr_steps)

    def _build_training(self, schedule: Schedule, resume_from: Path | None, saved: dict | None) -> None:
        """Model, optimizer, scheduler, balancing, log window and metrics, at the step resumed from."""
        acc, config = self.accelerator, self.config
        self.balancing = build_balancing(config, len(self.data.tasks), acc.device)
        model = self._build_model(self.tokenizer)
        self.moe = router_balance(model.config)  # None for a dense model
        # Before `prepare`, every rank loads the same files. A model that ZeRO-3 built partitioned cannot
        # take them (its parameters are empty shards): DeepSpeed's own checkpoint in state/ restores the
        # trained parameters in `load_state`, and the frozen ones are the base's.
        if resume_from is not None and not is_deepspeed_zero3_enabled():
            _load_weights(model, resume_from, bool(config.peft_type))
        optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(optimizer, config, schedule.lr_steps, schedule.warmup)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if acc.distributed_type in SHARDED_STATE:
            acc.register_for_checkpointing(self.scheduler)
        if config.padding_mode == "pack":
            # On the loaded class, not its name (validation cannot see remote code or an unread hub id); after
            # `prepare`, where every rank can run a forward of the (ZeRO-3 or FSDP sharded) model together.
            check_packed_isolation(self.model, self.data.train.flatten, COMPUTE_DTYPE[acc.mixed_precision], acc.device)
        self.model.train()
        set_seed(config.seed, device_specific=True)
        self.window = TrainWindow(len(self.data.tasks), acc.device)
        if resume_from is not None:
            self._restore_training_state(resume_from, saved)
        if self.main and config.peft_type:
            acc.unwrap_model(self.model).print_trainable_parameters()
        p = self.progress
        self.metrics = MetricsLog(
            self.logs,
            enabled=self.main,
            resume=(p.step, p.logged_lines) if resume_from else None,
            # MFTCoder's tags: {task}_coba_weight/train, {task}_selfpaced_weight/train.
            weight_tag=f"{config.weighted_loss_mode.replace('_', '')}_weight",
        )
        if resume_from is not None:
            acc.print(f"resumed from {resume_from} at step {p.step}")
        if p.step >= schedule.total:
            acc.print(f"the run already reached step {p.step} of {schedule.total}")
        acc.print(
            f"training {schedule.total} steps ({schedule.per_epoch} per epoch, {schedule.epochs} epochs), "
            f"warm-up {schedule.warmup}"
        )
        if self.balancing.needs_validation and resume_from is None:
            self._validation_update(full=True)

    def _positions(self, schedule: Schedule):
        """(epoch, index in the epoch, the epoch's steps) of every step from the current one on."""
        start = self.progress.step
        if start >= schedule.total:
            return
        for epoch in range(start // schedule.per_epoch, schedule.epochs):
            steps = self._epoch_steps(epoch)
            for index in range(max(0, start - epoch * schedule.per_epoch), len(steps)):
                yield epoch, index, steps

    def _run(self, schedule: Schedule) -> str:
        """Train until the last step, early stopping or a signal on any rank; returns the signal's name
        ("" when not stopped by one), having left a checkpoint to resume from."""
        acc, p = self.accelerator, self.progress
        bar = tqdm(total=schedule.total, initial=p.step, disable=not self.main, desc="train", dynamic_ncols=True)
        stop_early = signalled = False
        with StopRequest() as stop_request:
            for epoch, index, steps in self._positions(schedule):
                self._train_step(steps[index])
                bar.update(1)
                stop_early = self._after_step(epoch + (index + 1) / len(steps), index == len(steps) - 1, schedule, bar)
                # Decided together: the signal may have reached only some ranks, and every rank must
                # take the same way out (a checkpoint, or the end of the run).
                received = torch.tensor(float(stop_request.received is not None), device=acc.device)
                signalled = float(acc.reduce(received, reduction="sum")) > 0
                if stop_early or p.step >= schedule.total or signalled:
                    break
            bar.close()
            if not signalled and (p.step >= schedule.total or stop_early):
                if stop_early:
                    acc.print(f"early stopping at step {p.step}: no improvement in {p.stalls} evaluations")
                return ""
            self._checkpoint()
            name = stop_request.name or "a signal on another process"
            acc.print(
                f"stopped by {name} at step {p.step}; checkpoint {self.checkpoints}/step-{p.step}. "
                "Resume with resume_from_checkpoint=auto"
            )
            self.metrics.close()
            return stop_request.name or "signal"

    def _train_step(self, micro_batches: list[list[int]]) -> None:
        """One optimizer step and its counters; a non-finite one is counted (or stops the run)."""
        p = self.progress
        # Logged with the step: the validation update after it sets the next step's weights.
        weights = None if self.balancing.weights is None else self.balancing.weights.clone()
        started = time.perf_counter()
        step_sums, grad_norm, outcome = self._optimizer_step(micro_batches)
        p.train_seconds += time.perf_counter() - started
        p.step += 1
        if outcome is Outcome.APPLIED:
            p.consecutive_nan = 0
            self.window.add_step(step_sums, grad_norm, weights)
        elif outcome is Outcome.NON_FINITE:
            self._non_finite(micro_batches)

    def _after_step(self, epoch: float, epoch_end: bool, schedule: Schedule, bar) -> bool:
        """What is due after a step: weight update, log line, evaluation, checkpoint; True to stop early."""
        config, p = self.config, self.progress
        if self.balancing.validation_due(p.step):
            self._validation_update(full=False)
        if self.window.steps and (p.step % config.log_interval == 0 or p.step == schedule.total):
            record = self._log_train(epoch)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{p.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        stop_early = False
        if self.data.valid and config.evaluation_steps and p.step % config.evaluation_steps == 0:
            stop_early = self._evaluate()
        if (config.checkpointing_steps and p.step % config.checkpointing_steps == 0) or (
            config.epoch_checkpointing and epoch_end
        ):
            self._checkpoint()
        return stop_early

    def _finish(self, schedule: Schedule, start: int) -> TrainResult:
        """The last log line and evaluation, final/ and best/."""
        acc, p = self.accelerator, self.progress
        if self.window.steps:
            self._log_train(p.step / schedule.per_epoch)
        if self.data.valid and p.last_eval_step != p.step:
            self._evaluate()
        final = self._save_final()
        self._export_best()
        self.metrics.close()
        acc.print(f"saved {final}; finished at step {p.step} ({p.step - start} steps in this process)")
        acc.end_training()
        return TrainResult(self.out, final, p.step, p.step - start, p)


def train(config: TrainConfig) -> TrainResult:
    return Trainer(config).train()
