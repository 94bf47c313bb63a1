"""The training loop: explicit, on Accelerate, one optimizer step at a time.

Each step prefetches its micro-batches (gradient accumulation), all-reduces their per-task
counts, then runs forward/backward per micro-batch with token coefficients from those global
counts (`mftcoder.losses.modes`), so the objective is that of the whole step on all ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mftcoder.config.loading import dump_config
from mftcoder.config.schema import TrainConfig
from mftcoder.data.batching import collate, epoch_order, rank_micro_batches
from mftcoder.data.dataset import MultiTaskData, build_datasets, steps_per_epoch
from mftcoder.merge import BASE_INFO
from mftcoder.losses.modes import batch_counts, task_sums, token_coefficients
from mftcoder.models.loading import chat_format, load_model, load_tokenizer, wrap_lora
from mftcoder.training import outputs
from mftcoder.training.evaluation import Evaluation, evaluate, forward_token_losses, to_device
from mftcoder.training.launch import COMPUTE_DTYPE, build_accelerator, run_info
from mftcoder.training.metrics import MetricsLog, TrainWindow, per_task
from mftcoder.training.optim import build_optimizer, build_scheduler, warmup_steps


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    targets: int = 0
    train_seconds: float = 0.0
    best_loss: float = math.inf
    best_step: int | None = None
    stalls: int = 0
    last_eval_step: int | None = None
    evaluations: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    progress: Progress


def _print_data_report(accelerator, data: MultiTaskData) -> None:
    accelerator.print(f"{'task':<28}{'records':>9}{'train':>8}{'valid':>8}{'dropped':>9}{'tokens':>10}{'targets':>10}")
    for name, rep in data.report.items():
        accelerator.print(
            f"{name:<28}{rep.records:>9}{rep.train_samples:>8}{rep.valid_samples:>8}"
            f"{rep.dropped_overlength:>9}{rep.tokens:>10}{rep.supervised_tokens:>10}"
        )
        for example in rep.dropped_examples:
            accelerator.print(f"  dropped: {example}")


class Trainer:
    """Holds one run's state; `train()` is the whole story, top to bottom."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.accelerator = build_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.out = Path(config.output_dir)
        self.logs = self.out / "logs"
        self.checkpoints = self.out / "checkpoints"

    # --- setup -----------------------------------------------------------------------------
    def _prepare_output_dir(self, info: dict, stale: list[str]) -> None:
        if self.main:
            if stale:
                self.accelerator.print(f"overwrite_output_dir: removing {', '.join(stale)} from {self.out}")
                outputs.clear_artefacts(self.out, stale)
            self.logs.mkdir(parents=True, exist_ok=True)
            outputs.write_atomic(self.out / "config.yaml", dump_config(self.config))
            outputs.write_json(self.out / "run.json", info)
        self.accelerator.wait_for_everyone()

    def _build_model(self, tokenizer):
        config = self.config
        compute = COMPUTE_DTYPE[self.accelerator.mixed_precision]
        # Trainable weights and optimizer state stay fp32; a frozen LoRA base may live in the compute dtype.
        storage = compute if config.peft_type else torch.float32
        model = load_model(config, tokenizer, storage)
        base_ref = config.pretrained_model_path
        if config.model_init == "from_config":
            base_dir = self.out / "base_model"
            if self.main:
                outputs.save_pretrained(base_dir, model, tokenizer, state_dict=None)
            base_ref = str(base_dir)
        if config.peft_type:
            set_seed(config.seed)  # identical LoRA initialisation on every rank
            model = wrap_lora(config, model)
            model.peft_config["default"].base_model_name_or_path = base_ref
        return model

    # --- one optimizer step ----------------------------------------------------------------
    def _step(self, micro_batches: list[list[int]], window: TrainWindow) -> float:
        acc, config, data = self.accelerator, self.config, self.data
        num_tasks = len(data.tasks)
        batches = [collate([data.train[i] for i in indices], self.pad_id) for indices in micro_batches]
        local_counts = [batch_counts(b, num_tasks) for b in batches]
        step_counts = acc.reduce(torch.stack(local_counts).sum(0).to(acc.device), reduction="sum")
        # accelerate divides by its accumulation steps; DDP averages over ranks: undo both, since the
        # coefficients already normalise over the whole step.
        scale = config.gradient_accumulation_steps * acc.num_processes
        for i, (indices, batch) in enumerate(zip(micro_batches, batches, strict=True)):
            last = i == len(batches) - 1
            acc.sync_gradients = last
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                batch = to_device(batch, acc.device)
                ce = forward_token_losses(self.model, batch)
                coef = token_coefficients(config.weighted_loss_mode, batch, step_counts, self.task_weights)
                objective = (coef * ce).sum()
                acc.backward(objective * scale)
            tokens = sum(len(data.train[j].input_ids) for j in indices)
            window.add_micro_batch(objective, task_sums(ce.detach(), batch, num_tasks), local_counts[i][0], tokens)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        window.steps += 1
        window.grad_norms.append(float(grad_norm))
        return lr

    # --- logging, evaluation, saving -------------------------------------------------------
    def _log_train(self, window: TrainWindow, lr: float, epoch: float) -> dict:
        reduced = self.accelerator.reduce(window.sums.clone(), reduction="sum")
        objective, task_ce, task_tokens, tokens = window.split(reduced)
        self.progress.tokens += tokens
        self.progress.targets += int(task_tokens.sum())
        record = {
            "step": self.progress.step,
            "epoch": round(epoch, 4),
            "split": "train",
            "loss": objective / window.steps,
            "lr": lr,
            "grad_norm": sum(window.grad_norms) / len(window.grad_norms),
            "task_loss": per_task(self.data.tasks, task_ce, task_tokens),
            "tokens": self.progress.tokens,
            "targets": self.progress.targets,
            "train_seconds": round(self.progress.train_seconds, 3),
            "tokens_per_s": round(self.progress.tokens / max(self.progress.train_seconds, 1e-9), 1),
        }
        if self.config.task_weights is not None:
            record["task_weight"] = dict(zip(self.data.tasks, self.task_weights.tolist(), strict=True))
        self.metrics.write(record)
        window.reset()
        return record

    def _evaluate(self) -> Evaluation:
        result = evaluate(
            self.model, self.accelerator, self.data.valid, self.data.tasks,
            self.config.per_device_eval_batch_size, self.pad_id,
        )
        p = self.progress
        p.last_eval_step = p.step
        record = {"step": p.step, "split": "valid", "loss": result.loss, "task_loss": result.task_loss}
        p.evaluations.append(record)
        self.metrics.write(record)
        if result.loss < p.best_loss:
            p.best_loss, p.best_step, p.stalls = result.loss, p.step, 0
        else:
            p.stalls += 1
        return result

    def _save(self, directory: Path) -> None:
        """Every rank takes part (sharded states are gathered); the main process writes."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)
        if self.main:
            tmp = directory.with_name(directory.name + ".tmp")
            if tmp.exists():
                outputs.clear_artefacts(tmp.parent, [tmp.name])
            model = acc.unwrap_model(self.model)
            outputs.save_pretrained(tmp, model, self.tokenizer, state)
            if self.config.peft_type:
                base = model.get_base_model().config
                outputs.write_json(tmp / BASE_INFO, {"model_type": base.model_type, "architectures": base.architectures})
            outputs.write_json(tmp / "trainer_state.json", {
                "step": self.progress.step,
                "best_valid_loss": None if self.progress.best_step is None else self.progress.best_loss,
                "best_step": self.progress.best_step,
            })
            outputs.publish(tmp, directory)
        acc.wait_for_everyone()

    def _checkpoint(self) -> None:
        step = self.progress.step
        self._save(outputs.checkpoint_dir(self.checkpoints, step))
        if self.main:
            outputs.write_atomic(self.checkpoints / "latest", f"step-{step}\n")
            keep = {step} | ({self.progress.best_step} if self.progress.best_step is not None else set())
            outputs.rotate_checkpoints(self.checkpoints, self.config.saving_limit, keep)
        self.accelerator.wait_for_everyone()

    # --- the run ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        acc, config = self.accelerator, self.config
        info = run_info(acc, config)
        # Refuse a used output directory before anything is written; write nothing until the data
        # has loaded, so that a bad record leaves no half-started run behind.
        stale = outputs.check_output_dir(self.out, config.overwrite_output_dir)
        acc.print(
            f"mftcoder: world_size={info['world_size']} distributed={info['distributed_type']} "
            f"mixed_precision={info['mixed_precision']} gradient_accumulation={config.gradient_accumulation_steps} "
            f"global_batch={info['global_batch_size']} device={info['device']}"
        )

        self.tokenizer = load_tokenizer(config)
        self.pad_id = self.tokenizer.pad_token_id
        self.data = build_datasets(config, self.tokenizer, chat_format(config, self.tokenizer))
        acc.wait_for_everyone()  # every rank has checked the output directory before it changes
        self._prepare_output_dir(info, stale)
        if self.main:
            outputs.write_json(self.logs / "data_report.json", self.data.report_dict())
            _print_data_report(acc, self.data)

        weights = config.task_weights or [1.0] * len(self.data.tasks)
        self.task_weights = torch.tensor(weights, dtype=torch.float32, device=acc.device)
        world, rank = acc.num_processes, acc.process_index
        per_epoch = steps_per_epoch(
            len(self.data.train), config.per_device_train_batch_size, world, config.gradient_accumulation_steps
        )
        total = config.max_train_steps or per_epoch * config.num_train_epochs
        epochs = math.ceil(total / per_epoch)
        warmup, warning = warmup_steps(config.num_warmup_steps, total)
        if warning:
            acc.print(f"warning: {warning}")

        model = self._build_model(self.tokenizer)
        optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(optimizer, config, total, warmup)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.model.train()
        set_seed(config.seed, device_specific=True)
        if self.main and config.peft_type:
            acc.unwrap_model(self.model).print_trainable_parameters()

        self.metrics = MetricsLog(self.logs, enabled=self.main)
        self.progress = p = Progress()
        window = TrainWindow(len(self.data.tasks), acc.device)
        bar = tqdm(total=total, disable=not self.main, desc="train", dynamic_ncols=True)
        acc.print(f"training {total} steps ({per_epoch} per epoch, {epochs} epochs), warm-up {warmup}")
        stop = False
        for epoch in range(epochs):
            order = epoch_order(len(self.data.train), config.seed, epoch)
            micro = rank_micro_batches(order, config.per_device_train_batch_size, world, rank)
            step_groups = [micro[i : i + config.gradient_accumulation_steps] for i in range(0, len(micro), config.gradient_accumulation_steps)]
            for index, group in enumerate(step_groups):
                started = time.perf_counter()
                lr = self._step(group, window)
                p.train_seconds += time.perf_counter() - started
                p.step += 1
                bar.update(1)
                epoch_end = index == len(step_groups) - 1
                if p.step % config.log_interval == 0 or p.step == total:
                    record = self._log_train(window, lr, epoch + (index + 1) / len(step_groups))
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.data.valid and config.evaluation_steps and p.step % config.evaluation_steps == 0:
                    result = self._evaluate()
                    acc.print(f"\nstep {p.step} valid loss {result.loss:.4f} " + " ".join(f"{t}={v:.4f}" for t, v in result.task_loss.items()))
                    stop = config.early_stopping and p.stalls >= config.early_stopping_stall_num
                if (config.checkpointing_steps and p.step % config.checkpointing_steps == 0) or (
                    config.epoch_checkpointing and epoch_end
                ):
                    self._checkpoint()
                if stop:
                    acc.print(f"early stopping at step {p.step}: no improvement in {p.stalls} evaluations")
                if stop or p.step >= total:
                    break
            if stop or p.step >= total:
                break
        bar.close()
        if window.steps:
            self._log_train(window, lr, epoch + 1)
        if self.data.valid and p.last_eval_step != p.step:
            result = self._evaluate()
            acc.print(f"final valid loss {result.loss:.4f} " + " ".join(f"{t}={v:.4f}" for t, v in result.task_loss.items()))
        final = self.out / "final"
        self._save(final)
        self.metrics.close()
        acc.print(f"saved {final}")
        acc.end_training()
        return TrainResult(self.out, final, p.step, p)


def train(config: TrainConfig) -> TrainResult:
    return Trainer(config).train()
