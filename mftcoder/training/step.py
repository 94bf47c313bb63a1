"""One optimizer step: forward/backward over its micro-batches, clipping, the update and what became of it.

The step prefetches its micro-batches (gradient accumulation) and all-reduces their per-task counts,
then runs forward/backward per micro-batch with token coefficients from those global counts
(`mftcoder.losses.modes`), so the objective is that of the whole step on all ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from mftcoder.config.schema import TrainConfig
from mftcoder.losses.modes import batch_counts, task_sums, token_losses
from mftcoder.losses.moe import router_balance_loss
from mftcoder.training.evaluation import forward_token_losses, model_outputs, to_device
from mftcoder.training.state import Run
from mftcoder.training.step_outcome import Outcome, step_outcome


@dataclass(frozen=True)
class StepResult:
    sums: torch.Tensor  # this rank's contribution to the log window
    grad_norm: float
    outcome: Outcome  # the same on every rank
    loss_scale: float | None  # the fp16 loss scale the step ran with, if any
    stop_requested: bool  # a process received a stop signal (the same on every rank)


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where a batch holds tokens rather than padding: its attention mask, or in pack mode `tokens`."""
    return (batch["attention_mask"] if "attention_mask" in batch else batch["tokens"]).bool()


# What one micro-batch gives the step: the loss to backpropagate (before the step's scale) and this rank's
# contribution to the log window. Called with the batch on the device, its sample indices, the step's
# all-reduced counts, this micro-batch's own counts and the step's scale.
MicroBatchLoss = Callable[[dict, list[int], torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def backward_over_micro_batches(
    accelerator,
    config: TrainConfig,
    run: Run,
    micro_batches: list[list[int]],
    counts: Callable[[dict], torch.Tensor],
    micro_batch_loss: MicroBatchLoss,
) -> torch.Tensor:
    """Forward/backward over the step's micro-batches (lists of sample indices; empty: this rank's share ran
    out), gradients synchronised at the last one; returns this rank's sums for the log window. The
    micro-batches' `counts` are all-reduced over the step first, so that each contributes its share of the
    whole step's objective on all ranks."""
    acc = accelerator
    batches = [run.data.train.batch(indices, run.pad_id) for indices in micro_batches]
    local_counts = [counts(b) for b in batches]
    step_counts = acc.reduce(torch.stack(local_counts).sum(0).to(acc.device), reduction="sum")
    # accelerate divides by its accumulation steps; DDP averages over ranks: undo both, since the
    # coefficients already normalise over the whole step.
    scale = config.gradient_accumulation_steps * acc.num_processes
    step_sums = run.window.zeros()
    for i, (indices, batch) in enumerate(zip(micro_batches, batches, strict=True)):
        last = i == len(batches) - 1
        acc.sync_gradients = last
        with contextlib.nullcontext() if last else acc.no_sync(run.model):
            loss, contribution = micro_batch_loss(
                to_device(batch, acc.device), indices, step_counts, local_counts[i], scale
            )
            acc.backward(loss * scale)
        step_sums += contribution
    return step_sums


def optimizer_step(
    accelerator,
    config: TrainConfig,
    run: Run,
    micro_batches: list[list[int]],
    stop_requested: Callable[[], bool] = lambda: False,
) -> StepResult:
    """One supervised optimizer step over the micro-batches and the update. `stop_requested`: whether this
    process has received a stop signal, asked after the backward passes; the ranks learn together whether
    any did, with the step's own reads."""
    num_tasks = len(run.data.tasks)

    def micro_batch_loss(batch, indices, step_counts, own_counts, scale):
        if run.moe is None:
            ce, aux = forward_token_losses(run.model, batch), None
        else:
            out = model_outputs(run.model, batch, output_router_logits=True)
            ce = token_losses(out.logits, batch)
            # A rank whose share of the step ran out runs a dummy row without real tokens:
            # nothing to balance (the formula would be 0/0); a zero tied to the router keeps
            # the same parameters in every rank's graph.
            aux = (
                router_balance_loss(out.router_logits, run.moe, real_tokens(batch))
                if indices
                else out.router_logits[0].sum() * 0
            )
        objective = (run.balancing.coefficients(batch, ce, step_counts) * ce).sum()
        # The router balance loss of each forward, averaged over the step's forwards on all ranks.
        loss = objective if aux is None else objective + run.moe.coefficient * aux / scale
        contribution = run.window.micro_batch(
            objective, task_sums(ce.detach(), batch, num_tasks), own_counts[0], run.data.train.tokens(indices),
            0.0 if aux is None else aux.detach(),
        )  # fmt: skip
        return loss, contribution

    step_sums = backward_over_micro_batches(
        accelerator, config, run, micro_batches, lambda b: batch_counts(b, num_tasks), micro_batch_loss
    )
    return finish_step(accelerator, config, run, step_sums, stop_requested)


def finish_step(
    accelerator, config: TrainConfig, run: Run, step_sums: torch.Tensor, stop_requested: Callable[[], bool]
) -> StepResult:
    """After the step's backward passes (`step_sums`: this rank's contribution to the log window): clipping,
    whether the step was finite and whether a process was asked to stop (the ranks agree), the update."""
    acc, window = accelerator, run.window
    norm = acc.clip_grad_norm_(run.model.parameters(), config.max_grad_norm or math.inf)
    # One all-reduce tells every rank whether the step was finite and feeds the step's per-task
    # train losses to the balancing strategy (focal's task difficulty).
    step_total = acc.reduce(step_sums.clone(), reduction="sum")
    stops = acc.reduce(torch.tensor(float(stop_requested()), dtype=torch.float64, device=acc.device), reduction="sum")
    # The step's one read on the host: whether to update, and whether to stop, are decided there.
    # FSDP2 returns the norm as a (replicated) DTensor, which only reads out whole.
    norm = torch.as_tensor(norm.full_tensor() if isinstance(norm, DTensor) else norm, device=acc.device).double()
    total_loss, grad_norm, stops = torch.stack([step_total[0], norm, stops]).tolist()
    loss_finite = math.isfinite(total_loss)
    finite = loss_finite and math.isfinite(grad_norm)
    run.progress.lr = run.optimizer.param_groups[0]["lr"]
    scale_before = loss_scale(acc, run.model)
    applied = _update(acc, run, finite)
    outcome = step_outcome(loss_finite, math.isfinite(grad_norm), applied, scale_before, run.progress.step + 1)
    if outcome is Outcome.APPLIED:
        run.balancing.observe(*window.task_parts(step_total))
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_sums, grad_norm, outcome, scale_before, stops > 0)


def _update(accelerator, run: Run, finite: bool) -> bool:
    """Apply the step's update where this is still to decide; True when it reached the weights."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The engine already stepped inside the last backward, and skipped the update itself on
        # non-finite gradients: ask it what it did.
        return run.model.was_step_applied()
    if accelerator.scaler is not None:
        if not finite:
            # The scaler still closes the step (unscale_ ran in clipping) and lowers its scale, or the next
            # step would fail.
            accelerator.scaler.update()
            return False
        run.optimizer.step()
        return not run.optimizer.step_was_skipped
    if finite:
        run.optimizer.step()
    return finite


def loss_scale(accelerator, model) -> float | None:
    """The dynamic fp16 loss scale in use, if any (torch's GradScaler, or DeepSpeed's own)."""
    if accelerator.scaler is not None:
        return float(accelerator.scaler.get_scale())
    if accelerator.distributed_type == DistributedType.DEEPSPEED and model.fp16_enabled():
        return float(model.optimizer.loss_scale)
    return None
