"""The Accelerator, with every launcher setting checked against the config (no silent fallbacks).

`accelerate launch` hands its settings to each process as environment variables (ACCELERATE_*,
WORLD_SIZE); they are read once here and compared with the train config before anything is built.
Accelerate 1.15 drops some settings without a word on a machine without GPUs: `cpu=True` turns
DeepSpeed off, FSDP becomes plain DDP, and DeepSpeed without the gloo backend leaves the processes
unconnected. Each of those is either handled here or refused with a LaunchError.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import LaunchError

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
COMPUTE_DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIBRARIES = ("mftcoder", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "deepspeed")
GATHER_16BIT = "zero_optimization.stage3_gather_16bit_weights_on_model_save"
OFFLOAD_OPTIMIZER = "zero_optimization.offload_optimizer.device"
# What DeepSpeed runs in place of `optimizer: adamw` when the optimizer states are offloaded.
DEEPSPEED_CPU_ADAMW = "DeepSpeedCPUAdam(adamw_mode=True)"


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Launcher:
    """What the launcher asked for, as it reaches this process."""

    world_size: int = 1
    mixed_precision: str | None = None
    gradient_accumulation_steps: int | None = None
    deepspeed: bool = False
    fsdp: bool = False
    use_cpu: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launcher:
        # Looked up at call time: a library may rebind `os.environ` after this module was imported.
        env = os.environ if env is None else env
        ga = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        return cls(
            world_size=int(env.get("WORLD_SIZE", "1")),
            mixed_precision=env.get("ACCELERATE_MIXED_PRECISION") or None,
            gradient_accumulation_steps=int(ga) if ga and ga.isdigit() else None,
            deepspeed=_flag(env.get("ACCELERATE_USE_DEEPSPEED")),
            fsdp=_flag(env.get("ACCELERATE_USE_FSDP")),
            use_cpu=_flag(env.get("ACCELERATE_USE_CPU")),
        )


def check_launcher(launcher: Launcher, config: TrainConfig, cuda: bool) -> None:
    """Refuse launcher settings that accelerate would silently turn into something else, or that
    would override the train config."""
    if launcher.fsdp and not cuda:
        raise LaunchError(
            "FSDP needs CUDA GPUs: on a machine without them accelerate 1.15 silently runs FSDP as plain DDP "
            "(every process holding the whole model). Use configs/accelerate/ddp.yaml, or a DeepSpeed preset "
            "(configs/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml) to shard on CPU"
        )
    if launcher.fsdp:
        # Both would fail only at the first forward or update, once the model has loaded on every GPU.
        problems = []
        if config.peft_type == "qlora" and config.quantization_bits == 8:
            problems.append(
                "quantization_bits: 8 (LLM.int8): FSDP2 turns the int8 weights into plain sharded tensors, dropping "
                "the layout bitsandbytes computes with; use 4-bit QLoRA (quantization_bits: 4, the default), whose "
                "weights FSDP shards"
            )
        if config.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            problems.append(
                f"optimizer: {config.optimizer}: bitsandbytes' 8-bit optimizers cannot update FSDP2's sharded "
                "(DTensor) parameters; set optimizer: adamw"
            )
        if problems:
            raise LaunchError("not supported under FSDP: " + "; ".join(problems))
    if launcher.deepspeed and launcher.use_cpu:
        raise LaunchError(
            "use_cpu / --cpu turns DeepSpeed off in accelerate (the processes would train as plain DDP); "
            "remove it from the accelerate config: mftcoder selects the CPU itself when there is no GPU"
        )
    launcher_ga = launcher.gradient_accumulation_steps
    if launcher_ga is not None and launcher_ga != config.gradient_accumulation_steps:
        raise LaunchError(
            f"gradient_accumulation_steps: the launcher set {launcher_ga} but the config says "
            f"{config.gradient_accumulation_steps}; the train config is the one source, remove it from the launcher"
        )


def resolve_mixed_precision(config: TrainConfig, launcher: str | None, cuda: bool) -> str:
    """Accelerate's mixed-precision setting for the config's `dtype`, given the launcher's setting."""
    if config.dtype == "auto":
        if launcher:
            return launcher
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    wanted = MIXED_PRECISION[config.dtype]
    if launcher and launcher != wanted:
        raise LaunchError(
            f"dtype: the config asks for {config.dtype} but the launcher set mixed_precision={launcher}; "
            f"make them agree (set dtype: auto to follow the launcher, or change the accelerate config)"
        )
    if wanted == "fp16" and not cuda:
        raise LaunchError("dtype: fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return wanted


def _deepspeed_precision(plugin: DeepSpeedPlugin, launcher: str | None) -> str | None:
    """The launcher's precision when a DeepSpeed json enables one itself (accelerate then sets `no`)."""
    enabled = [name for name in ("bf16", "fp16") if plugin.get_value(f"{name}.enabled") is True]
    json_precision = enabled[0] if enabled else None
    if json_precision and launcher not in (None, "no", json_precision):
        raise LaunchError(
            f"the accelerate config sets mixed_precision={launcher} but its DeepSpeed config enables "
            f"{json_precision}; keep one of them"
        )
    return json_precision or launcher


def deepspeed_plugin(config: TrainConfig, world_size: int) -> DeepSpeedPlugin:
    """The launcher's DeepSpeed settings, with the batch settings DeepSpeed needs taken from the
    train config: a value left out or `auto` is filled in, a different one is refused. So is an
    optimizer that DeepSpeed would replace by another one."""
    plugin = DeepSpeedPlugin()
    batch = config.per_device_train_batch_size
    wanted = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": batch * config.gradient_accumulation_steps * world_size,
        "gradient_clipping": float(config.max_grad_norm or 0.0),  # 0: DeepSpeed does not clip
    }
    conflicts = []
    for key, value in wanted.items():
        given = plugin.get_value(key)
        if given in (None, "auto"):
            plugin.deepspeed_config[key] = value
        elif float(given) != value:
            conflicts.append(f"{key}={given} (the train config gives {value:g})")
    if conflicts:
        raise LaunchError(
            "the DeepSpeed config disagrees with the train config: "
            + "; ".join(conflicts)
            + ". The train config is the only source of batch size, accumulation and clipping "
            "(max_grad_norm): remove these from the accelerate / DeepSpeed config or set them to auto"
        )
    if config.optimizer != "adamw" and replaces_optimizer(plugin):
        raise LaunchError(
            f"optimizer: {config.optimizer} cannot run with offload_optimizer_device: "
            f"{plugin.get_value(OFFLOAD_OPTIMIZER)} (zero_optimization.offload_optimizer in a DeepSpeed json): "
            "accelerate would silently replace it by DeepSpeed's CPU Adam, with 32-bit states and the weight "
            "decay added to the gradient (L2) rather than decoupled as in AdamW. Set optimizer: adamw (DeepSpeed "
            "then runs its CPU Adam as AdamW, the states in CPU RAM), or keep the 8-bit optimizer with a preset "
            "that does not offload the optimizer (configs/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml)"
        )
    if plugin.get_value("zero_optimization.compute_grad_norm") is False:
        raise LaunchError(
            "zero_optimization.compute_grad_norm: false in the DeepSpeed config: mftcoder logs the gradient norm "
            "and checks it for non-finite steps; remove the setting"
        )
    if config.on_nan == "skip" and plugin.get_value("bf16.check_grad_overflow") is False:
        raise LaunchError(
            "on_nan: skip cannot hold with bf16.check_grad_overflow: false in the DeepSpeed config: DeepSpeed "
            "applies the update inside the last backward, before mftcoder sees the gradient norm, and with this "
            "check off it would apply a non-finite one. Remove the setting, or set on_nan: stop"
        )
    if plugin.zero_stage == 3 and plugin.get_value(GATHER_16BIT) is not True:
        raise LaunchError(
            "ZeRO-3 without zero3_save_16bit_model could not save loadable weights (they stay sharded); set "
            "zero3_save_16bit_model: true in the accelerate config (stage3_gather_16bit_weights_on_model_save "
            "in a DeepSpeed json), as configs/accelerate/deepspeed_zero3.yaml does"
        )
    return plugin


def replaces_optimizer(plugin: DeepSpeedPlugin) -> bool:
    """Whether accelerate hands DeepSpeed its CPU Adam in place of the optimizer mftcoder built. It does
    whenever the optimizer states are offloaded, unless the DeepSpeed json sets
    zero_force_ds_cpu_optimizer: false; it keeps AdamW's decoupled weight decay only for torch's AdamW."""
    offloaded = plugin.get_value(OFFLOAD_OPTIMIZER, "none") != "none"
    return offloaded and bool(plugin.get_value("zero_force_ds_cpu_optimizer", True))


def optimizer_in_use(config: TrainConfig, plugin: DeepSpeedPlugin | None) -> str:
    """The optimizer that really updates the weights: the config's, or the one DeepSpeed swaps in."""
    if plugin is not None and replaces_optimizer(plugin):
        return DEEPSPEED_CPU_ADAMW  # deepspeed_plugin lets only adamw through to the swap
    return config.optimizer


def build_accelerator(config: TrainConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    launcher = Launcher.from_env()
    check_launcher(launcher, config, cuda)
    plugin = deepspeed_plugin(config, launcher.world_size) if launcher.deepspeed else None
    precision = _deepspeed_precision(plugin, launcher.mixed_precision) if plugin else launcher.mixed_precision
    mixed = resolve_mixed_precision(config, precision, cuda)
    process_group = InitProcessGroupKwargs(timeout=timedelta(seconds=config.init_timeout_seconds))
    if not cuda and (launcher.world_size > 1 or plugin):
        # DeepSpeed would otherwise pick a backend that does not exist on CPU and run unconnected.
        process_group.backend = "gloo"
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # accelerate ignores DeepSpeed under cpu=True; DeepSpeed finds the CPU by itself.
        cpu=not cuda and plugin is None,
        deepspeed_plugin=plugin,
        kwargs_handlers=[process_group],
        step_scheduler_with_optimizer=False,
    )
    check_accelerator(accelerator, launcher, mixed)
    if mixed == "bf16" and not cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        accelerator.print(
            "warning: dtype bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) runs its matmuls far slower "
            "than fp32 (30x on an AVX2 CPU in benchmarks/throughput.py); dtype: auto trains in fp32 here"
        )
    return accelerator


def check_accelerator(accelerator: Accelerator, launcher: Launcher, mixed: str) -> None:
    """What accelerate set up is what was asked for."""
    if launcher.world_size != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launcher.world_size} processes but this one sees a world of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); on a machine without GPUs "
            "launch with `accelerate launch --multi_gpu --num_processes N` (mftcoder selects the CPU itself)"
        )
    asked = DistributedType.DEEPSPEED if launcher.deepspeed else DistributedType.FSDP if launcher.fsdp else None
    if asked and accelerator.distributed_type != asked:
        raise LaunchError(
            f"the launcher asked for {asked.value} but accelerate set up {accelerator.distributed_type.value}; "
            "check the accelerate config"
        )
    if accelerator.mixed_precision != mixed:
        raise LaunchError(
            f"mixed precision: expected {mixed} but accelerate set up {accelerator.mixed_precision}; "
            "check mixed_precision in the accelerate config and dtype in the train config"
        )


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _deepspeed_plugin(accelerator: Accelerator) -> DeepSpeedPlugin | None:
    return accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None


def _deepspeed_info(accelerator: Accelerator) -> dict | bool:
    plugin = _deepspeed_plugin(accelerator)
    if plugin is None:
        return False
    return {
        "zero_stage": plugin.zero_stage,
        "offload_optimizer": plugin.get_value(OFFLOAD_OPTIMIZER, "none"),
        "offload_param": plugin.get_value("zero_optimization.offload_param.device", "none"),
        "zero3_init": bool(plugin.zero3_init_flag),
        "gather_16bit_on_save": bool(plugin.get_value(GATHER_16BIT, False)),
    }


def _fsdp_info(accelerator: Accelerator) -> dict | bool:
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    plugin = accelerator.state.fsdp_plugin
    return {"version": plugin.fsdp_version, "state_dict_type": str(plugin.state_dict_type.name)}


def run_info(accelerator: Accelerator, config: TrainConfig) -> dict:
    """What this run really is: recorded in run.json and printed at start."""
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "global_batch_size": config.per_device_train_batch_size
        * config.gradient_accumulation_steps
        * accelerator.num_processes,
        "device": str(accelerator.device),
        "optimizer": optimizer_in_use(config, _deepspeed_plugin(accelerator)),
        "deepspeed": _deepspeed_info(accelerator),
        "fsdp": _fsdp_info(accelerator),
        "start_time": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
    }
