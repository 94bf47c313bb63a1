"""2-process CPU training through `accelerate launch`, and the guard against unconnected processes.

The launch is `accelerate launch --multi_gpu --num_processes 2` with no ACCELERATE_USE_CPU: on a
machine without GPUs mftcoder must select the CPU (gloo, MULTI_CPU) by itself. Other spellings
(`--cpu`, no `--multi_gpu`) make accelerate start one process only; see the last test.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import PartialState
from conftest import DEMO_MODEL, DEMO_TASKS, EQUIVALENCE_ADAM_EPSILON, launch_env
from safetensors.torch import load_file

from mftcoder.cli import main
from mftcoder.config import dump_config
from mftcoder.run_config import validate_mapping
from mftcoder.training.cpu_allocator import applies

pytestmark = pytest.mark.dist

LAUNCH_TIMEOUT = 300
# Global batch 4 in both runs: 2 processes x 1 sample x 2 accumulation steps here, 1 process x 4
# samples in the reference run. The 2-process run goes through DDP's no_sync path as well.
DDP_OVERRIDES = ["per_device_train_batch_size=1", "gradient_accumulation_steps=2"]
SERIAL_OVERRIDES = ["per_device_train_batch_size=4", "gradient_accumulation_steps=1"]
STEPS = 4
# Validation samples one per batch: the same shapes in both layouts, no padding noise in the
# validation losses, whose slopes the validation-driven modes turn into weights (they amplify it:
# with 8-sample batches split 4 + 4 the weights differed by up to 9e-5 relative).
EVAL_ONE_BY_ONE = ["per_device_eval_batch_size=1"]
# Every loss mode, the loss-driven ones with settings that move their weights from the first steps.
MODES = {
    "case3": [],
    "case4": ["weighted_loss_mode=case4"],
    "focal_task": ["weighted_loss_mode=focal", "focal_level=task"],
    "focal_sample": ["weighted_loss_mode=focal", "focal_level=sample"],
    "self_paced": [
        "weighted_loss_mode=self_paced", "selfpaced_history_length=2", *EVAL_ONE_BY_ONE, "selfpaced_sample_valid_num=8",
    ],
    "coba": [
        "weighted_loss_mode=coba", "coba_warmup_steps=1", "coba_history_length=3", *EVAL_ONE_BY_ONE, "coba_sample_valid_num=8",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def config_file(small_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    config = validate_mapping(
        {
            "pretrained_model_path": str(DEMO_MODEL),
            "model_init": "from_config",
            "data_paths": small_data,
            "data_split": [0.9, 0.1],
            "seq_length": 512,
            "output_dir": str(root / "unused"),  # every run overrides it
            "peft_type": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,  # dropout masks would differ between the two layouts
            "per_device_eval_batch_size": 8,
            "learning_rate": 2e-2,
            "adam_epsilon": EQUIVALENCE_ADAM_EPSILON,
            "num_warmup_steps": 0,
            "max_train_steps": STEPS,
            "log_interval": 1,
            "evaluation_steps": None,
            "checkpointing_steps": None,
            "early_stopping": False,
            "seed": 7,
        }
    )
    path = root / "train.yaml"
    path.write_text(dump_config(config))
    return path


def launch_two(config_file: Path, out: Path, *overrides: str) -> str:
    """A 2-process training launch; returns its console output."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
        "-m", "mftcoder", "train", str(config_file), f"output_dir={out}", *DDP_OVERRIDES, *overrides,
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=config_file.parent
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{console[-6000:]}"
    assert "mftcoder: world_size=2 distributed=MULTI_CPU" in console, console[-3000:]
    return console


@pytest.fixture(scope="module")
def ddp_run(config_file) -> tuple[Path, str]:
    """One 2-process launch in the default mode, shared by the tests below: (OUTPUT_DIR, console output)."""
    out = config_file.parent / "ddp"
    return out, launch_two(config_file, out)


def _train_records(out: Path) -> list[dict]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_two_cpu_processes_train_as_one_ddp_run(ddp_run):
    out, _ = ddp_run
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2
    assert info["distributed_type"] == "MULTI_CPU"
    assert info["global_batch_size"] == 4
    assert info["deepspeed"] is False
    if applies(os.environ, platform.libc_ver()[0]):  # the ranks inherit this environment
        assert info["cpu_allocator"] == {"mmap_threshold": 1 << 30, "trim_threshold": 1 << 30}

    records = _train_records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert isinstance(record["loss"], float) and math.isfinite(record["loss"]), record
        assert record["task_loss"], record
        assert set(record["task_loss"]) <= set(DEMO_TASKS)
        assert all(math.isfinite(v) for v in record["task_loss"].values()), record
    # Counts are all-reduced: 3 steps of 4 samples, tokens over both ranks.
    assert records[-1]["tokens"] > 0 and records[-1]["targets"] > 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "final").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 33).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_equal_one_process_with_the_same_global_batch(ddp_run, config_file, mode):
    """In every loss mode, 2 ranks make the updates 1 rank makes with the same global batch: the
    objective is normalised over the global step, the sampler deals each sample to exactly one rank,
    the loss-driven weights come from all-reduced train losses (focal) or from validation draws
    evaluated by all ranks together (self_paced, coba). Since DDP averages rank 1's gradients into
    every update, a rank 1 that drifted (other weights, other or duplicated samples) would show up
    in rank 0's weights too.

    Compared: the final adapter (every step's gradients, through Adam with a large eps), and per
    step the objective, the gradient norm, the per-task losses and the task weights. Not bit-exact:
    padding shapes and reduction order differ (float noise, measured: at most 3.5e-7 on the adapter).
    """
    ddp_out = ddp_run[0] if mode == "case3" else config_file.parent / f"ddp_{mode}"
    if mode != "case3":
        launch_two(config_file, ddp_out, *MODES[mode])
    serial_out = config_file.parent / f"serial_{mode}"
    assert main(["train", str(config_file), f"output_dir={serial_out}", *SERIAL_OVERRIDES, *MODES[mode]]) == 0
    serial_info = json.loads((serial_out / "run.json").read_text())
    assert serial_info["world_size"] == 1 and serial_info["global_batch_size"] == 4

    # Same random base (seeded from_config) in both runs.
    ddp_base = load_file(ddp_out / "base_model" / "model.safetensors")
    serial_base = load_file(serial_out / "base_model" / "model.safetensors")
    assert all(torch.equal(ddp_base[k], serial_base[k]) for k in serial_base)

    ddp = load_file(ddp_out / "final" / "adapter_model.safetensors")
    serial = load_file(serial_out / "final" / "adapter_model.safetensors")
    assert ddp.keys() == serial.keys()
    for key in serial:
        torch.testing.assert_close(ddp[key], serial[key], atol=1e-6, rtol=1e-5)

    # (Adam hides a constant gradient scale, e.g. DDP's averaging over ranks not undone; grad_norm does not.)
    ddp_records, serial_records = _train_records(ddp_out), _train_records(serial_out)
    assert [r["step"] for r in ddp_records] == [r["step"] for r in serial_records] == list(range(1, STEPS + 1))
    for ddp_record, serial_record in zip(ddp_records, serial_records, strict=True):
        step = serial_record["step"]
        for key in ("loss", "grad_norm"):
            assert ddp_record[key] == pytest.approx(serial_record[key], rel=1e-5, abs=1e-6), (step, key)
        assert ddp_record["task_loss"] == pytest.approx(serial_record["task_loss"], rel=1e-5), step
        assert ("task_weight" in ddp_record) == ("task_weight" in serial_record), step
        if "task_weight" in serial_record:
            # Weights from validation slopes amplify float noise (measured up to 6.5e-6 relative);
            # self_paced drives some to ~1e-10, compared in absolute terms.
            assert ddp_record["task_weight"] == pytest.approx(serial_record["task_weight"], rel=1e-4, abs=1e-7), step
    if mode not in ("case3", "case4", "focal_sample"):
        # The weights did move, or the comparison above would prove nothing about them.
        first, last = serial_records[0]["task_weight"], serial_records[-1]["task_weight"]
        assert last != pytest.approx(first, rel=1e-3), (first, last)


def test_unconnected_processes_are_refused(config_file, tmp_path, monkeypatch, capsys):
    """A process launched as one of 2 (WORLD_SIZE=2) whose Accelerator sees a world of 1 stops
    with LaunchError instead of training alone.

    This cannot be reproduced through `accelerate launch` with mftcoder on a CPU machine:
    `--multi_gpu --num_processes 2` with mftcoder's `cpu=True` always connects (MULTI_CPU), and
    `--num_processes 2` or `--cpu --num_processes 2` without `--multi_gpu` start ONE process
    with no WORLD_SIZE at all (nothing to check against; run.json then says world_size 1).
    The unconnected state arises when accelerate's process state was created before mftcoder's
    Accelerator without `cpu=True` (accelerate then ignores `cpu=True`), so we create it that
    way here, with the environment rank 0 of a 2-process launch would have (no LOCAL_RANK, so
    no process group is attempted and nothing waits for a peer).
    """
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    state = PartialState(cpu=False)
    assert state.num_processes == 1  # the situation: launched as 2, connected to nobody

    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["train", str(config_file), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the launcher started 2 processes but this one sees a world of 1"), err
    assert "--multi_gpu --num_processes N" in err
    assert "Traceback" not in err
    assert not out.exists(), "refused, yet it started writing a run"
