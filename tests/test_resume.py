"""Exact resume: a run killed at any moment and resumed ends where an uninterrupted run ends.

The runs are real subprocesses (`python -m mftcoder train`), killed with SIGKILL or stopped with
SIGTERM at a random step after the first checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_MODEL, REPO, launch_env, read_metrics
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

TOTAL = 24
TIMING = {"train_seconds", "tokens_per_s"}
MFTCODER = ("-m", "mftcoder")


def write_config(path: Path, data_paths: list[str], output_dir: Path, **overrides) -> Path:
    config = {
        "pretrained_model_path": str(DEMO_MODEL),
        "model_init": "from_config",
        "data_paths": data_paths,
        "data_split": [0.9, 0.1],
        "seq_length": 512,
        "output_dir": str(output_dir),
        "peft_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,  # dropout: RNG must resume too
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 8,
        "learning_rate": 5e-3,
        "num_warmup_steps": 3,
        "max_train_steps": TOTAL,
        "log_interval": 1,
        "evaluation_steps": 5,
        "checkpointing_steps": 3,
        "early_stopping": False,
        "seed": 11,
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def launch(
    config: Path, *extra: str, processes: int = 1, preset: str | None = None, entry: tuple[str, ...] = MFTCODER
) -> subprocess.Popen:
    """`python -m mftcoder train`, or `accelerate launch` with `processes` processes (and a preset);
    `entry` runs in place of `-m mftcoder`."""
    if processes == 1 and preset is None:
        command = [sys.executable, *entry, "train", str(config), *extra]
    else:
        launcher = ["--config_file", str(REPO / "configs" / "accelerate" / preset)] if preset else ["--multi_gpu"]
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launcher,
            "--num_processes",
            str(processes),
            "--main_process_port",
            "0",
            *entry,
            "train",
            str(config),
            *extra,
        ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**launch_env(), "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def logged_step(output_dir: Path) -> int:
    path = output_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [int(m) for m in re.findall(r'"step": (\d+), "epoch"', path.read_text())]
    return max(steps, default=0)


def interrupt_at(process: subprocess.Popen, output_dir: Path, step: int, sig: int) -> None:
    """Send `sig` to the whole run (launcher and workers) once it has logged `step`."""
    deadline = time.monotonic() + 240
    while logged_step(output_dir) < step:
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    os.killpg(process.pid, sig)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    final = output_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(final / name)


def assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = final_weights(resumed), final_weights(reference)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"final weights differ by {worst}"
    strip = lambda lines: [{k: v for k, v in m.items() if k not in TIMING} for m in lines]  # noqa: E731
    assert strip(read_metrics(resumed)) == strip(read_metrics(reference))


def resumed_step(output: str) -> int:
    match = re.search(r"resumed from (\S+) at step (\d+)", output)
    assert match, output[-3000:]
    return int(match.group(2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import write_subset

    return write_subset(tmp_path_factory.mktemp("resume_data"), 30)


def reference_run(
    tmp_path: Path, data: list[str], processes: int = 1, preset: str | None = None, entry=MFTCODER, **overrides
) -> Path:
    out = tmp_path / "reference"
    config = write_config(tmp_path / "reference.yaml", data, out, **overrides)
    code, output = finish(launch(config, processes=processes, preset=preset, entry=entry))
    assert code == 0, output[-3000:]
    return out


CASES = {
    "lora": {},
    "full": {"peft_type": None},
    "pack": {"padding_mode": "pack"},
    # CoBa's histories, initial losses and validation draws must resume too; warm-up ends mid-run.
    "coba": {"weighted_loss_mode": "coba", "coba_warmup_steps": 4, "coba_history_length": 6},
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_at_a_random_step_then_resume_is_exact(tmp_path, data, case):
    reference = reference_run(tmp_path, data, **CASES[case])
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", data, out, **CASES[case])
    kill_at = random.randint(4, TOTAL - 3)
    process = launch(config)
    interrupt_at(process, out, kill_at, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "final").exists()

    code, output = finish(launch(config, "resume_from_checkpoint=auto"))
    assert code == 0, output[-3000:]
    start = resumed_step(output)
    # checkpoints: every 3 steps, and at each evaluation (every 5) that improved the best
    assert start <= kill_at and (start % 3 == 0 or start % 5 == 0), (start, kill_at)
    assert f"finished at step {TOTAL} ({TOTAL - start} steps in this process)" in output, (kill_at, output[-2000:])
    assert_same_run(out, reference)


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path, data):
    reference = reference_run(tmp_path, data)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", data, out)
    process = launch(config)
    interrupt_at(process, out, random.randint(2, TOTAL - 4), signal.SIGTERM)
    code, output = finish(process)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", output).group(1))
    assert (out / "checkpoints" / f"step-{stopped}").is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped}"

    code, output = finish(launch(config, "resume_from_checkpoint=auto"))
    assert code == 0, output[-3000:]
    assert resumed_step(output) == stopped
    assert f"({TOTAL - stopped} steps in this process)" in output
    assert_same_run(out, reference)


@pytest.mark.dist
def test_two_process_ddp_killed_and_resumed_is_exact(tmp_path, data):
    reference = reference_run(tmp_path, data, processes=2, per_device_train_batch_size=1)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", data, out, per_device_train_batch_size=1)
    process = launch(config, processes=2)
    interrupt_at(process, out, random.randint(4, TOTAL - 3), signal.SIGKILL)
    process.wait(timeout=60)
    code, output = finish(launch(config, "resume_from_checkpoint=auto", processes=2))
    assert code == 0, output[-3000:]
    start = resumed_step(output)
    assert f"({TOTAL - start} steps in this process)" in output
    assert "world_size=2" in output
    assert_same_run(out, reference)


@pytest.mark.dist
def test_two_process_sigterm_stops_every_rank_at_the_same_step(tmp_path, data):
    reference = reference_run(tmp_path, data, processes=2, per_device_train_batch_size=1)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", data, out, per_device_train_batch_size=1)
    process = launch(config, processes=2)
    interrupt_at(process, out, random.randint(2, TOTAL - 4), signal.SIGTERM)
    code, output = finish(process)
    assert code != 0
    stopped = {int(s) for s in re.findall(r"stopped by \S+ at step (\d+)", output)}
    assert len(stopped) == 1, output[-3000:]
    code, output = finish(launch(config, "resume_from_checkpoint=auto", processes=2))
    assert code == 0, output[-3000:]
    assert resumed_step(output) == stopped.pop()
    assert_same_run(out, reference)


SHARDED_CASES = {
    "zero2-lora": ("deepspeed_zero2.yaml", {}),
    # ZeRO-3 builds the model already partitioned: the checkpoint's weights must reach the shards, the
    # adapter's as well as full copies of base modules (modules_to_save) and, in full fine-tuning, all.
    "zero3-lora-modules-to-save": ("deepspeed_zero3.yaml", {"lora_modules_to_save": ["embed_tokens", "lm_head"]}),
    "zero3-full": ("deepspeed_zero3.yaml", {"peft_type": None, "learning_rate": 1e-3}),
    # FSDP2 in the preset's bf16 (its mixed-precision policy), on CPU through `fsdp_entry`.
    "fsdp2-lora-modules-to-save": ("fsdp2.yaml", {"lora_modules_to_save": ["embed_tokens", "lm_head"]}),
    "fsdp2-full": ("fsdp2.yaml", {"peft_type": None, "learning_rate": 1e-3}),
}


@pytest.mark.dist
@pytest.mark.parametrize("case", list(SHARDED_CASES))
def test_sharded_state_killed_and_resumed_is_exact(tmp_path, data, case, fsdp_entry):
    """Under DeepSpeed and FSDP2 the sharded model and optimizer state go through Accelerate's
    save_state/load_state."""
    preset, overrides = SHARDED_CASES[case]
    fsdp = preset == "fsdp2.yaml"
    run = dict(processes=2, preset=preset, entry=fsdp_entry if fsdp else MFTCODER)
    common = dict(per_device_train_batch_size=1, max_grad_norm=1.0, **overrides)
    reference = reference_run(tmp_path, data, **run, **common)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", data, out, **common)
    process = launch(config, **run)
    interrupt_at(process, out, random.randint(4, TOTAL - 3), signal.SIGKILL)
    process.wait(timeout=60)
    code, output = finish(launch(config, "resume_from_checkpoint=auto", **run))
    assert code == 0, output[-3000:]
    assert f"distributed={'FSDP' if fsdp else 'DEEPSPEED'}" in output
    start = resumed_step(output)
    assert (out / "checkpoints" / f"step-{start}" / "state").is_dir()
    assert f"({TOTAL - start} steps in this process)" in output
    assert_same_run(out, reference)
