"""The training loop: explicit, on Accelerate, one optimizer step at a time.

`setup.set_up` builds the run once (data, model, optimizer and, when resuming, the state it continues
from); the loop trains it one optimizer step at a time (`step.optimizer_step`) and does what is due
after each step: task-weight updates, log lines, evaluation, checkpoints (`checkpoint.Checkpointer`).

The global step is also the data position (every epoch has the same number of steps and its order
is a pure function of the seed and the epoch), which makes resuming exact: a checkpoint holds the
weights, the optimizer and scheduler, every rank's RNG and partial log window, and the counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mftcoder.config.schema import TrainConfig
from mftcoder.data.batching import rank_micro_batches
from mftcoder.errors import TrainingError
from mftcoder.losses.balancing import loss_vector
from mftcoder.training.checkpoint import Checkpointer
from mftcoder.training.evaluation import Evaluation, evaluate
from mftcoder.training.launch import build_accelerator
from mftcoder.training.metrics import per_task
from mftcoder.training.preference import evaluate_pairs, preference_step, train_record
from mftcoder.training.setup import set_up
from mftcoder.training.signals import StopRequest
from mftcoder.training.state import Progress, Run
from mftcoder.training.step import StepResult, loss_scale, optimizer_step
from mftcoder.training.step_outcome import Outcome


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when stopped by a signal (a checkpoint was saved instead)
    steps: int  # the global step reached
    steps_run: int  # optimizer steps made by this process (fewer than `steps` after a resume)
    progress: Progress
    stopped_by: str = ""  # "SIGTERM" / "SIGINT" when preempted


class Trainer:
    """One run; `train()` tells the story top to bottom, one method per chapter."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.accelerator = build_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.checkpointer = Checkpointer(self.accelerator, config)
        self.run: Run | None = None  # built by setup()

    def setup(self) -> Run:
        self.run = set_up(self.config, self.accelerator, self.checkpointer)
        if self.run.balancing.needs_validation and self.run.resumed_from is None:
            self._validation_update(full=True)
        return self.run

    def train(self) -> TrainResult:
        p = self.setup().progress
        start = p.step
        stopped_by = self._train_until_stopped()
        if stopped_by:
            return TrainResult(self.checkpointer.out, None, p.step, p.step - start, p, stopped_by)
        return self._finish(start)

    # --- the loop ----------------------------------------------------------------------------
    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of every step of `epoch` (lists of sample indices)."""
        config, acc = self.config, self.accelerator
        order = self.run.data.epoch_order(config.seed, epoch)
        micro = rank_micro_batches(order, config.per_device_train_batch_size, acc.num_processes, acc.process_index)
        ga = config.gradient_accumulation_steps
        return [micro[i : i + ga] for i in range(0, len(micro), ga)]

    def _positions(self):
        """(epoch, index in the epoch, the epoch's steps) of every step from the current one on."""
        start, schedule = self.run.progress.step, self.run.schedule
        if start >= schedule.total:
            return
        for epoch in range(start // schedule.per_epoch, schedule.epochs):
            steps = self.epoch_steps(epoch)
            for index in range(max(0, start - epoch * schedule.per_epoch), len(steps)):
                yield epoch, index, steps

    def _train_until_stopped(self) -> str:
        """Train until the last step, early stopping or a signal on any rank; returns the signal's name
        ("" when not stopped by one), having left a checkpoint to resume from."""
        acc, p, total = self.accelerator, self.run.progress, self.run.schedule.total
        bar = tqdm(total=total, initial=p.step, disable=not self.main, desc="train", dynamic_ncols=True)
        stop_early = signalled = False
        with StopRequest() as stop_request:
            for epoch, index, steps in self._positions():
                # Decided together, within the step: the signal may have reached only some ranks, and every
                # rank must take the same way out (a checkpoint, or the end of the run).
                signalled = self._train_step(steps[index], lambda: stop_request.received is not None)
                bar.update(1)
                stop_early = self._after_step(epoch + (index + 1) / len(steps), index == len(steps) - 1, bar)
                if stop_early or p.step >= total or signalled:
                    break
            bar.close()
            if not signalled and (p.step >= total or stop_early):
                if stop_early:
                    acc.print(f"early stopping at step {p.step}: no improvement in {p.stalls} evaluations")
                return ""
            self.checkpointer.save(self.run)
            name = stop_request.name or "a signal on another process"
            acc.print(
                f"stopped by {name} at step {p.step}; checkpoint {self.checkpointer.dir}/step-{p.step}. "
                "Resume with resume_from_checkpoint=auto"
            )
            self.run.metrics.close()
            return stop_request.name or "signal"

    def _train_step(self, micro_batches: list[list[int]], stop_requested: Callable[[], bool]) -> bool:
        """One optimizer step and its counters; a non-finite one is counted (or stops the run). True when a
        process received a stop signal."""
        run = self.run
        p = run.progress
        # Logged with the step: the validation update after it sets the next step's weights.
        weights = None if run.balancing.weights is None else run.balancing.weights.clone()
        started = time.perf_counter()
        step = optimizer_step if run.preference is None else preference_step
        result = step(self.accelerator, self.config, run, micro_batches, stop_requested)
        p.train_seconds += time.perf_counter() - started
        p.step += 1
        if result.outcome is Outcome.APPLIED:
            p.consecutive_nan = 0
            run.window.add_step(result.sums, result.grad_norm, weights)
        elif result.outcome is Outcome.OVERFLOW:
            self._overflow(result)
        else:
            self._non_finite(micro_batches)
        return result.stop_requested

    def _overflow(self, result: StepResult) -> None:
        p = self.run.progress
        p.overflow_steps += 1
        before, now = result.loss_scale, loss_scale(self.accelerator, self.run.model)
        change = f"lowered from {before:g} to {now:g}" if now < before else f"kept at {now:g}"
        self.accelerator.print(
            f"\nstep {p.step}: fp16 gradients overflowed; update skipped, loss scale {change} "
            f"({p.overflow_steps} overflows so far; not counted by on_nan)"
        )

    def _non_finite(self, group: list[list[int]]) -> None:
        """Count a skipped update, or stop naming the step and its tasks."""
        p, config, data = self.run.progress, self.config, self.run.data
        tasks = sorted({data.tasks[t] for indices in group for t in data.train.task_ids(indices)})
        where = f"step {p.step}: non-finite loss or gradient norm (tasks in this rank's batch: {', '.join(tasks)})"
        p.skipped_steps += 1
        p.consecutive_nan += 1
        if config.on_nan == "stop" or p.consecutive_nan >= config.max_consecutive_nan:
            reason = "on_nan: stop" if config.on_nan == "stop" else f"{p.consecutive_nan} in a row"
            raise TrainingError(f"{where}; stopping ({reason}). Lower the learning rate or check the data")
        self.accelerator.print(f"\n{where}; update skipped ({p.skipped_steps} so far)")

    def _after_step(self, epoch: float, epoch_end: bool, bar) -> bool:
        """What is due after a step: weight update, log line, evaluation, checkpoint; True to stop early."""
        config, run = self.config, self.run
        p = run.progress
        if run.balancing.validation_due(p.step):
            self._validation_update(full=False)
        if run.window.steps and (p.step % config.log_interval == 0 or p.step == run.schedule.total):
            record = self._log_train(epoch)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{p.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        stop_early = improved = False
        if run.data.valid and config.evaluation_steps and p.step % config.evaluation_steps == 0:
            stop_early, improved = self._evaluate()
        # best/ is exported from a checkpoint, so the best step always gets one.
        if (
            improved
            or (config.checkpointing_steps and p.step % config.checkpointing_steps == 0)
            or (config.epoch_checkpointing and epoch_end)
        ):
            self.checkpointer.save(run)
        return stop_early

    def _finish(self, start: int) -> TrainResult:
        """The last log line and evaluation, final/ and best/."""
        acc, run = self.accelerator, self.run
        p = run.progress
        if run.window.steps:
            self._log_train(p.step / run.schedule.per_epoch)
        if run.data.valid and p.last_eval_step != p.step and self._evaluate()[1]:
            self.checkpointer.save(run)
        final = self.checkpointer.save_final(run)
        self.checkpointer.export_best(p)
        run.metrics.close()
        acc.print(f"saved {final}; finished at step {p.step} ({p.step - start} steps in this process)")
        acc.end_training()
        return TrainResult(self.checkpointer.out, final, p.step, p.step - start, p)

    # --- logging, evaluation -----------------------------------------------------------------
    def _log_train(self, epoch: float) -> dict:
        acc, run = self.accelerator, self.run
        window, p = run.window, run.progress
        reduced = acc.reduce(window.sums.clone(), reduction="sum")
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
            "task_loss": per_task(run.data.tasks, task_ce, task_tokens),
            "tokens": p.tokens,
            "targets": p.targets,
            "train_seconds": round(p.train_seconds, 3),
            "tokens_per_s": round(p.tokens / max(p.train_seconds, 1e-9), 1),
        }
        if run.preference is not None:
            record.update(train_record(run.data.tasks, window.pair_parts(reduced)))
        if p.skipped_steps:
            record["skipped_steps"] = p.skipped_steps
        if (scale := loss_scale(acc, run.model)) is not None:
            record["loss_scale"] = scale
        if p.overflow_steps:
            record["overflow_steps"] = p.overflow_steps
        if run.moe is not None:
            forwards = window.steps * self.config.gradient_accumulation_steps * acc.num_processes
            record["aux_loss"] = aux / forwards  # the router balance loss per forward, before its coefficient
        weights = window.weights
        if weights is not None:
            # Every rank computes the weights from the same all-reduced inputs: checked, not assumed.
            if not bool((acc.gather(weights[None]) == weights).all()):
                raise TrainingError(f"step {p.step}: the processes disagree on the task weights")
            record["task_weight"] = dict(zip(run.data.tasks, weights.tolist(), strict=True))
        run.metrics.write(record)
        window.reset()
        return record

    def _evaluate(self) -> tuple[bool, bool]:
        """Evaluate, log, track the best; (early stopping says stop, this step is the best so far)."""
        config, run = self.config, self.run
        p = run.progress
        batch_size = config.per_device_eval_batch_size
        if run.preference is None:
            result: Evaluation = evaluate(
                run.model, self.accelerator, run.data.valid, run.data.tasks, batch_size, run.pad_id
            )
        else:
            result = evaluate_pairs(run, self.accelerator, run.data.valid, batch_size)
        p.last_eval_step = p.step
        run.metrics.write(
            {"step": p.step, "split": "valid", "loss": result.loss, "task_mean": result.task_mean,
             "task_loss": result.task_loss, **result.extra}
        )  # fmt: skip
        self.accelerator.print(
            f"\nstep {p.step} valid loss {result.loss:.4f} task_mean {result.task_mean:.4f} "
            + " ".join(f"{t}={v:.4f}" for t, v in result.task_loss.items())
        )
        metric = result.metric(config.metric_for_best)
        improved = metric < p.best_metric
        if improved:
            p.best_metric, p.best_step, p.stalls = metric, p.step, 0
        else:
            p.stalls += 1
        return config.early_stopping and p.stalls >= config.early_stopping_stall_num, improved

    def _validation_update(self, full: bool) -> None:
        """Feed a validation-driven strategy (self-paced, CoBa): the whole split before training, then
        the samples it draws for this step; evaluated together by every rank."""
        run = self.run
        units = None if full else run.balancing.validation_indices(run.data.valid.units)
        result = evaluate(
            run.model, self.accelerator, run.data.valid, run.data.tasks, self.config.per_device_eval_batch_size,
            run.pad_id, units=units,
        )  # fmt: skip
        if full:
            run.metrics.write(
                {"step": run.progress.step, "split": "valid", "loss": result.loss, "task_loss": result.task_loss}
            )
        run.balancing.update(run.progress.step, loss_vector(run.data.tasks, result.task_loss))


def train(config: TrainConfig) -> TrainResult:
    return Trainer(config).train()
