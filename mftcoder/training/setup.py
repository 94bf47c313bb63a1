"""Setting a run up, once: where it resumes from, its output directory, the data, the schedule, the model
and optimizer prepared by Accelerate, and the state a resumed run continues from."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from mftcoder.config.loading import dump_config
from mftcoder.config.schema import TrainConfig
from mftcoder.data.dataset import MultiTaskData, build_datasets, report_table, steps_per_epoch
from mftcoder.data.template import chat_format
from mftcoder.data.tokenizer import load_tokenizer
from mftcoder.losses.moe import router_balance
from mftcoder.losses.weighting import balancing_warnings, build_balancing
from mftcoder.models.attention import FLAT_LAYOUT, resolve_attention
from mftcoder.models.loading import cast_trainable, load_model, wrap_lora
from mftcoder.models.logits import base_class, logits_at_mask
from mftcoder.models.packing_check import check_packed_isolation
from mftcoder.training import outputs
from mftcoder.training.checkpoint import SHARDED_STATE, Checkpointer, data_fingerprint, load_weights
from mftcoder.training.cpu_allocator import keep_freed_memory
from mftcoder.training.launch import COMPUTE_DTYPE, run_info
from mftcoder.training.metrics import MetricsLog, TrainWindow
from mftcoder.training.optim import build_optimizer, build_scheduler, lr_at, warmup_steps
from mftcoder.training.preference import build_preference
from mftcoder.training.resume import check_same_data, resume_point
from mftcoder.training.state import Progress, Resume, Run, Schedule


def set_up(config: TrainConfig, accelerator, checkpointer: Checkpointer) -> Run:
    """Everything the loop needs, at the step resumed from. Refuses a used output directory before anything
    is written, and writes nothing until the data has loaded, so that a bad record leaves no half-started run."""
    info = run_info(accelerator, config)
    if accelerator.device.type == "cpu":
        info["cpu_allocator"] = keep_freed_memory()
    resume = resume_point(config, accelerator)
    if resume is not None:
        info["resumed_from"] = str(resume.checkpoint)
    stale = _output_dir_plan(config, accelerator, resume)
    accelerator.print(
        f"mftcoder: world_size={info['world_size']} distributed={info['distributed_type']} "
        f"mixed_precision={info['mixed_precision']} gradient_accumulation={config.gradient_accumulation_steps} "
        f"global_batch={info['global_batch_size']} device={info['device']}"
    )
    attention = resolve_attention(config, accelerator.device)
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer, chat_format(config, tokenizer), flat=attention in FLAT_LAYOUT)
    fingerprint = data_fingerprint(data.train + data.valid)
    if resume is not None:
        check_same_data(resume, fingerprint)
    accelerator.wait_for_everyone()  # every rank has checked the output directory before it changes
    _prepare_output_dir(config, accelerator, info, stale)
    if accelerator.is_main_process:
        outputs.write_json(Path(config.output_dir) / "logs" / "data_report.json", data.report_dict())
        accelerator.print(report_table(data.report))
    schedule = plan_schedule(config, accelerator, data, resume)
    return _build_run(config, accelerator, checkpointer, resume, attention, tokenizer, data, fingerprint, schedule)


def _output_dir_plan(config: TrainConfig, accelerator, resume: Resume | None) -> list[str]:
    """What of an earlier run in output_dir to remove; refuses (changing nothing) when not allowed."""
    out = Path(config.output_dir)
    if resume is not None and out.resolve() in resume.checkpoint.resolve().parents:
        return []  # continuing the run that lives here
    if resume is None and config.resume_from_checkpoint == "auto":
        accelerator.print(
            f"resume_from_checkpoint=auto: no complete checkpoint in {out / 'checkpoints'}; starting fresh"
        )
        return outputs.check_output_dir(out, overwrite=True)
    return outputs.check_output_dir(out, config.overwrite_output_dir)


def _prepare_output_dir(config: TrainConfig, accelerator, info: dict, stale: list[str]) -> None:
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        if stale:
            accelerator.print(f"removing {', '.join(stale)} of an earlier run from {out}")
            outputs.clear_artefacts(out, stale)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        outputs.write_atomic(out / "config.yaml", dump_config(config))
        outputs.write_json(out / "run.json", info)
    accelerator.wait_for_everyone()


def plan_schedule(config: TrainConfig, accelerator, data: MultiTaskData, resume: Resume | None) -> Schedule:
    per_epoch = steps_per_epoch(
        data.epoch_size,
        config.per_device_train_batch_size,
        accelerator.num_processes,
        config.gradient_accumulation_steps,
    )
    total = config.max_train_steps or per_epoch * config.num_train_epochs
    # A resumed run continues the learning-rate schedule it started, even when it is now longer or shorter:
    # rebuilt for the new length, the rate would jump at the resumed step.
    lr_steps = total
    if resume is not None:
        before = resume.config  # a checkpoint that predates `lr_steps` ran the schedule of its own length
        lr_steps = resume.lr_steps or before.get("max_train_steps") or per_epoch * before["num_train_epochs"]
    warmup, warning = warmup_steps(config.num_warmup_steps, lr_steps)
    for message in ([warning] if warning else []) + balancing_warnings(config, total):
        accelerator.print(f"warning: {message}")
    if lr_steps != total:
        shape = dict(peak=config.learning_rate, min_lr=config.min_lr, warmup=warmup, total=lr_steps)
        final_rate = lr_at(lr_steps, **shape, kind=config.lr_scheduler_type)
        after = (
            f"steps {lr_steps + 1}-{total} run at its final rate {final_rate:g}"
            if total > lr_steps
            else f"the run stops at step {total}, before the schedule ends"
        )
        accelerator.print(
            f"resume: the run now has {total} steps, its learning-rate schedule keeps the original {lr_steps} "
            f"(warm-up {warmup}); {after}. Not the run a fresh start with these settings would make"
        )
    return Schedule(total, per_epoch, warmup, lr_steps)


def build_model(config: TrainConfig, accelerator, checkpointer: Checkpointer, tokenizer, attention: str):
    """The model to train, before `prepare`: the base (seeded and saved when built from a config), wrapped
    with LoRA when the run trains an adapter."""
    compute = COMPUTE_DTYPE[accelerator.mixed_precision]
    # Trainable weights and optimizer state stay fp32; a frozen (Q)LoRA base lives in the compute dtype.
    storage = compute if config.peft_type else torch.float32
    model = load_model(config, tokenizer, storage, attention)
    base_ref = config.pretrained_model_path
    if config.model_init == "from_config":
        base_dir = checkpointer.save_base(model, tokenizer)
        base_ref = str(base_dir)
        if config.peft_type == "qlora":  # bitsandbytes quantises while loading: read the saved weights back
            model = load_model(config, tokenizer, storage, attention, source=base_dir)
    if config.peft_type:
        set_seed(config.seed)  # identical LoRA initialisation on every rank
        model = wrap_lora(config, model)
        model.peft_config["default"].base_model_name_or_path = base_ref
        # DeepSpeed keeps its own fp32 master copy and trains in the compute dtype; elsewhere the
        # trainable weights are the master copy and stay fp32.
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        cast_trainable(model, compute if deepspeed else torch.float32)
    if config.torch_compile:
        model.compile()  # in place: state-dict keys, saving and unwrapping stay as they are
    return model


def _build_run(
    config: TrainConfig,
    accelerator,
    checkpointer: Checkpointer,
    resume: Resume | None,
    attention: str,
    tokenizer,
    data: MultiTaskData,
    fingerprint: str,
    schedule: Schedule,
) -> Run:
    """Model, optimizer, scheduler, balancing, log window and metrics, at the step resumed from."""
    acc = accelerator
    balancing = build_balancing(config, len(data.tasks), acc.device)
    model = build_model(config, acc, checkpointer, tokenizer, attention)
    if not logits_at_mask(model):
        acc.print(
            f"note: {base_class(model).__name__} cannot compute logits at the target positions only (its forward "
            "does not slice by a boolean logits_to_keep): it computes them everywhere, the loss takes the targets' "
            "rows. Same loss, more compute and memory"
        )
    moe = router_balance(model.config)
    # Before a checkpoint's weights are loaded: a full fine-tuning DPO run's reference is the base.
    preference, reference = build_preference(config, acc, model, len(data.tasks))
    # Before `prepare`, every rank loads the same files. A model that ZeRO-3 built partitioned cannot
    # take them (its parameters are empty shards): DeepSpeed's own checkpoint in state/ restores the
    # trained parameters in `load_state`, and the frozen ones are the base's.
    if resume is not None and not is_deepspeed_zero3_enabled():
        load_weights(model, resume.checkpoint, bool(config.peft_type))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, schedule.lr_steps, schedule.warmup)
    model, optimizer = acc.prepare(model, optimizer)
    if acc.distributed_type in SHARDED_STATE:
        acc.register_for_checkpointing(scheduler)
    if config.padding_mode == "pack":
        # On the loaded class, not its name (validation cannot see remote code or an unread hub id); after
        # `prepare`, where every rank can run a forward of the (ZeRO-3 or FSDP sharded) model together.
        check_packed_isolation(model, data.train.flatten, COMPUTE_DTYPE[acc.mixed_precision], acc.device)
    model.train()
    set_seed(config.seed, device_specific=True)
    window = TrainWindow(len(data.tasks), acc.device, pairs=preference is not None)
    progress = Progress()
    if resume is not None:
        progress = checkpointer.restore(resume, optimizer, scheduler, balancing, window)
    if acc.is_main_process and config.peft_type:
        acc.unwrap_model(model).print_trainable_parameters()
    metrics = MetricsLog(
        Path(config.output_dir) / "logs",
        enabled=acc.is_main_process,
        resume=(progress.step, progress.logged_lines) if resume is not None else None,
        weight_tag=config.loss_mode.log_tag,
    )
    if resume is not None:
        acc.print(f"resumed from {resume.checkpoint} at step {progress.step}")
    if progress.step >= schedule.total:
        acc.print(f"the run already reached step {progress.step} of {schedule.total}")
    acc.print(
        f"training {schedule.total} steps ({schedule.per_epoch} per epoch, {schedule.epochs} epochs), "
        f"warm-up {schedule.warmup}"
    )
    return Run(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        data=data,
        data_fingerprint=fingerprint,
        schedule=schedule,
        balancing=balancing,
        moe=moe,
        window=window,
        metrics=metrics,
        progress=progress,
        resumed_from=None if resume is None else resume.checkpoint,
        preference=preference,
        reference=reference,
    )
