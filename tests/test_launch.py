"""Launcher settings against the train config: what accelerate would silently drop or override is
refused, DeepSpeed's batch settings come from the train config only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, launch_env

from mftcoder.config import dump_config
from mftcoder.errors import LaunchError
from mftcoder.training.launch import (
    DEEPSPEED_CPU_ADAMW,
    Launcher,
    _deepspeed_precision,
    build_accelerator,
    check_launcher,
    deepspeed_plugin,
    optimizer_in_use,
    resolve_mixed_precision,
)

PRESETS = REPO / "configs" / "accelerate"


@pytest.mark.unit
def test_launcher_settings_are_read_from_what_accelerate_launch_exports():
    env = {
        "WORLD_SIZE": "2",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_USE_FSDP": "false",
        "ACCELERATE_USE_CPU": "False",  # accelerate writes str(bool)
    }
    assert Launcher.from_env(env) == Launcher(2, "bf16", 4, deepspeed=True, fsdp=False, use_cpu=False)
    assert Launcher.from_env({}) == Launcher(1, None, None, deepspeed=False, fsdp=False, use_cpu=False)
    # DeepSpeed's own spelling for "not set"
    assert Launcher.from_env({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "auto"}).gradient_accumulation_steps is None


@pytest.mark.unit
def test_fsdp_without_gpus_is_refused_saying_why_and_what_to_use(tiny_config):
    with pytest.raises(LaunchError) as err:
        check_launcher(Launcher(2, fsdp=True), tiny_config(), cuda=False)
    message = str(err.value)
    assert "silently runs FSDP as plain DDP" in message
    assert "configs/accelerate/ddp.yaml" in message and "deepspeed_zero3.yaml" in message
    check_launcher(Launcher(2, fsdp=True), tiny_config(), cuda=True)  # a GPU machine goes ahead


@pytest.mark.unit
def test_fsdp_refuses_8bit_weights_and_8bit_optimizers_naming_the_fix(tiny_config):
    """Under FSDP2 (run on CPU through FSDP_ON_CPU in tests/conftest.py) LLM.int8 QLoRA fails at the
    first forward ('Parameter' object has no attribute 'CB') and an 8-bit optimizer at the first update
    (no DTensor sharding strategy for bitsandbytes' update op); 4-bit QLoRA with AdamW trains there."""
    eight_bit = tiny_config(peft_type="qlora", quantization_bits=8, optimizer="adamw_8bit")
    with pytest.raises(LaunchError) as err:
        check_launcher(Launcher(2, fsdp=True), eight_bit, cuda=True)
    message = str(err.value)
    assert message.startswith("not supported under FSDP: quantization_bits: 8")
    assert "use 4-bit QLoRA (quantization_bits: 4, the default)" in message
    assert "optimizer: adamw_8bit: bitsandbytes' 8-bit optimizers" in message and "set optimizer: adamw" in message
    with pytest.raises(LaunchError, match="optimizer: paged_adamw_8bit"):
        check_launcher(Launcher(2, fsdp=True), tiny_config(optimizer="paged_adamw_8bit"), cuda=True)
    check_launcher(Launcher(2, fsdp=True), tiny_config(peft_type="qlora"), cuda=True)
    check_launcher(Launcher(2), eight_bit, cuda=True)  # without FSDP they run


@pytest.mark.unit
def test_deepspeed_with_use_cpu_is_refused(tiny_config):
    with pytest.raises(LaunchError, match="turns DeepSpeed off"):
        check_launcher(Launcher(2, deepspeed=True, use_cpu=True), tiny_config(), cuda=False)
    check_launcher(Launcher(2, deepspeed=True), tiny_config(), cuda=False)


@pytest.mark.unit
def test_launcher_gradient_accumulation_must_equal_the_configs(tiny_config):
    config = tiny_config(gradient_accumulation_steps=2)
    with pytest.raises(LaunchError, match="the launcher set 4 but the config says 2"):
        check_launcher(Launcher(2, gradient_accumulation_steps=4), config, cuda=True)
    check_launcher(Launcher(2, gradient_accumulation_steps=2), config, cuda=True)


@pytest.mark.unit
def test_dtype_auto_follows_the_launcher_and_an_explicit_dtype_must_agree(tiny_config):
    assert resolve_mixed_precision(tiny_config(dtype="auto"), "bf16", cuda=False) == "bf16"
    assert resolve_mixed_precision(tiny_config(dtype="auto"), "no", cuda=False) == "no"
    assert resolve_mixed_precision(tiny_config(dtype="auto"), None, cuda=False) == "no"
    assert resolve_mixed_precision(tiny_config(dtype="bf16"), "bf16", cuda=False) == "bf16"
    assert resolve_mixed_precision(tiny_config(dtype="bf16"), None, cuda=False) == "bf16"
    with pytest.raises(LaunchError, match="the config asks for fp32 but the launcher set mixed_precision=bf16"):
        resolve_mixed_precision(tiny_config(dtype="fp32"), "bf16", cuda=False)
    with pytest.raises(LaunchError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision(tiny_config(dtype="fp16"), None, cuda=False)


def _deepspeed_env(monkeypatch, **values: str) -> None:
    for name in list(os.environ):
        if name.startswith("ACCELERATE_"):
            monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(f"ACCELERATE_{name}", value)


@pytest.mark.unit
def test_deepspeed_auto_values_are_filled_from_the_train_config(monkeypatch, tiny_config):
    _deepspeed_env(monkeypatch, DEEPSPEED_ZERO_STAGE="2")  # what deepspeed_zero2.yaml exports
    config = tiny_config(per_device_train_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5)
    ds = deepspeed_plugin(config, world_size=4).deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    # max_grad_norm: null means no clipping, which DeepSpeed spells 0
    assert deepspeed_plugin(tiny_config(max_grad_norm=None), world_size=1).deepspeed_config["gradient_clipping"] == 0.0


@pytest.mark.unit
def test_a_deepspeed_config_that_disagrees_with_the_train_config_is_refused(monkeypatch, tiny_config, tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
    }))  # fmt: skip
    _deepspeed_env(monkeypatch, DEEPSPEED_CONFIG_FILE=str(ds_json))
    config = tiny_config(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(LaunchError) as err:
        deepspeed_plugin(config, world_size=2)
    message = str(err.value)
    assert "gradient_accumulation_steps=8 (the train config gives 1)" in message
    assert "micro_batch" not in message and "gradient_clipping" not in message  # those two agree
    assert "set them to auto" in message


@pytest.mark.unit
def test_zero3_must_gather_16bit_weights_to_save(monkeypatch, tiny_config):
    _deepspeed_env(monkeypatch, DEEPSPEED_ZERO_STAGE="3", DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="false")
    with pytest.raises(LaunchError, match="zero3_save_16bit_model: true"):
        deepspeed_plugin(tiny_config(), world_size=2)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
    assert deepspeed_plugin(tiny_config(), world_size=2).zero_stage == 3


@pytest.mark.unit
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_an_8bit_optimizer_with_deepspeed_optimizer_offload_is_refused(monkeypatch, tiny_config, optimizer):
    """Under optimizer offload accelerate swaps any optimizer for DeepSpeed's CPU Adam, in AdamW mode for
    torch's AdamW only: an 8-bit AdamW would silently become Adam with L2 decay and 32-bit states."""
    _deepspeed_env(monkeypatch, DEEPSPEED_ZERO_STAGE="2", DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu")  # zero2_offload
    with pytest.raises(LaunchError) as err:
        deepspeed_plugin(tiny_config(optimizer=optimizer), world_size=2)
    message = str(err.value)
    assert f"optimizer: {optimizer} cannot run with offload_optimizer_device: cpu" in message
    assert "Set optimizer: adamw" in message and "configs/accelerate/deepspeed_zero2.yaml" in message
    # adamw goes ahead, and run.json names what really runs.
    adamw = tiny_config(optimizer="adamw")
    assert optimizer_in_use(adamw, deepspeed_plugin(adamw, world_size=2)) == DEEPSPEED_CPU_ADAMW
    # Without optimizer offload the 8-bit optimizer runs as built.
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    eight_bit = tiny_config(optimizer=optimizer)
    assert optimizer_in_use(eight_bit, deepspeed_plugin(eight_bit, world_size=2)) == optimizer
    assert optimizer_in_use(eight_bit, None) == optimizer  # no DeepSpeed


@pytest.mark.unit
def test_a_deepspeed_json_that_offloads_the_optimizer_is_checked_too(monkeypatch, tiny_config, tmp_path):
    """The same swap from a DeepSpeed json (here ZeRO-3), unless it sets zero_force_ds_cpu_optimizer:
    false, which makes accelerate pass the 8-bit optimizer through to run on the offloaded states."""
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "stage3_gather_16bit_weights_on_model_save": True}
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": zero}))
    _deepspeed_env(monkeypatch, DEEPSPEED_CONFIG_FILE=str(ds_json))
    with pytest.raises(LaunchError, match="optimizer: adamw_8bit cannot run with offload_optimizer_device: cpu"):
        deepspeed_plugin(tiny_config(optimizer="adamw_8bit"), world_size=2)
    ds_json.write_text(json.dumps({"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}))
    config = tiny_config(optimizer="adamw_8bit")
    assert optimizer_in_use(config, deepspeed_plugin(config, world_size=2)) == "adamw_8bit"


@pytest.mark.unit
def test_deepspeed_settings_that_would_hide_non_finite_updates_are_refused(monkeypatch, tiny_config, tmp_path):
    """DeepSpeed steps inside the last backward; the trainer can only report a skip that DeepSpeed made,
    and reads the gradient norm DeepSpeed computes."""
    ds_json = tmp_path / "ds.json"
    _deepspeed_env(monkeypatch, DEEPSPEED_CONFIG_FILE=str(ds_json))
    ds_json.write_text(
        json.dumps({"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 2}})
    )
    with pytest.raises(LaunchError, match=r"on_nan: skip cannot hold with bf16.check_grad_overflow: false"):
        deepspeed_plugin(tiny_config(on_nan="skip"), world_size=2)
    assert deepspeed_plugin(tiny_config(on_nan="stop"), world_size=2).zero_stage == 2
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}))
    for on_nan in ("skip", "stop"):
        with pytest.raises(LaunchError, match=r"zero_optimization.compute_grad_norm: false in the DeepSpeed config"):
            deepspeed_plugin(tiny_config(on_nan=on_nan), world_size=2)


@pytest.mark.unit
def test_a_precision_enabled_in_a_deepspeed_json_is_the_launchers(monkeypatch, tiny_config, tmp_path):
    """accelerate rejects mixed_precision beside a DeepSpeed json and then reports `no`; the json's
    bf16 is what the run gets, so `dtype` is checked against it."""
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    _deepspeed_env(monkeypatch, DEEPSPEED_CONFIG_FILE=str(ds_json))
    plugin = deepspeed_plugin(tiny_config(), world_size=2)
    assert _deepspeed_precision(plugin, "no") == "bf16"
    assert resolve_mixed_precision(tiny_config(dtype="auto"), _deepspeed_precision(plugin, "no"), cuda=False) == "bf16"
    with pytest.raises(LaunchError, match="the config asks for fp32 but the launcher set mixed_precision=bf16"):
        resolve_mixed_precision(tiny_config(dtype="fp32"), _deepspeed_precision(plugin, "no"), cuda=False)
    with pytest.raises(LaunchError, match="enables bf16"):
        _deepspeed_precision(plugin, "fp16")


@pytest.mark.dist
@pytest.mark.parametrize(
    ("preset", "flags", "overrides", "message"),
    [
        pytest.param(
            "deepspeed_zero2.yaml", ["--gradient_accumulation_steps", "4"], [],
            "error: gradient_accumulation_steps: the launcher set 4 but the config says 1",
            id="gradient-accumulation",
        ),
        pytest.param(
            "ddp.yaml", [], ["dtype=fp32"],
            "error: dtype: the config asks for fp32 but the launcher set mixed_precision=bf16",
            id="mixed-precision",
        ),
        pytest.param("fsdp2.yaml", [], [], "error: FSDP needs CUDA GPUs", id="fsdp-on-cpu"),
    ],
)  # fmt: skip
def test_a_launcher_that_disagrees_with_the_config_stops_with_a_clear_error(
    preset, flags, overrides, message, tiny_config, tmp_path
):
    """Through the real launcher, 2 processes: the error comes before any model, data or DeepSpeed
    set-up, once (from rank 0, or from rank 1 when the launcher stopped a slower rank 0 first),
    without a traceback from mftcoder, and nothing is written."""
    config_file = tmp_path / "train.yaml"
    config_file.write_text(dump_config(tiny_config(gradient_accumulation_steps=1, dtype="auto")))
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PRESETS / preset),
        "--num_processes", "2", "--main_process_port", "0", *flags,
        "-m", "mftcoder", "train", str(config_file), f"output_dir={out}", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0, console[-3000:]
    problem = message.removeprefix("error: ")
    reports = [line for line in console.splitlines() if line.startswith(("error: ", "error (process 1): "))]
    assert len(reports) == 1 and reports[0].split(": ", 1)[1].startswith(problem), console[-3000:]
    assert "[rank0]: Traceback" not in console and "[rank1]: Traceback" not in console, console[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_fp32_is_faster(monkeypatch, tiny_config, capsys, native):
    # What the CPU can do is the hardware's: the test decides it.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    build_accelerator(tiny_config(dtype="bf16"))
    assert ("bf16 on a CPU without native bf16" in capsys.readouterr().out) != native
