"""configs/train/demo_coba.yaml: CoBa takes weight from the task that stopped converging.

The demo's noisy_answers task answers with random characters: its validation loss stops falling
within the warm-up while the two code tasks keep improving, so after the warm-up CoBa gives it
less than a third of the weight, in one process and in two (where the trainer checks that both
ranks hold the same weights), and a resumed run continues with exactly the same weights.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, launch_env, read_metrics

from mftcoder.run_config import load_config
from mftcoder.training.trainer import train

CONFIG = REPO / "configs" / "train" / "demo_coba.yaml"
WARMUP = 12  # coba_warmup_steps of the demo
HARD = "noisy_answers"


def mean_weights_after_warmup(output_dir: Path) -> dict[str, float]:
    records = [r for r in read_metrics(output_dir) if r["split"] == "train" and r["step"] > WARMUP]
    tasks = records[0]["task_weight"]
    return {task: sum(r["task_weight"][task] for r in records) / len(records) for task in tasks}


def assert_the_hard_task_loses_weight(output_dir: Path) -> None:
    weights = mean_weights_after_warmup(output_dir)
    assert weights[HARD] < 1 / 3 and weights[HARD] == min(weights.values()), weights
    # Uniform during the warm-up: the first update, after step WARMUP, sets the weights of the next step.
    early = [r["task_weight"] for r in read_metrics(output_dir) if r["split"] == "train" and r["step"] <= WARMUP]
    assert len(early) == WARMUP and all(w == pytest.approx({t: 1 / 3 for t in w}) for w in early)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coba") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the demo config's paths are relative to the repository
        train(load_config(CONFIG, [f"output_dir={out}"]))
    return out


@pytest.mark.e2e
def test_coba_demo_moves_weight_from_the_hard_task(single_run):
    assert_the_hard_task_loses_weight(single_run)


@pytest.mark.e2e
def test_coba_demo_resumes_with_the_same_weights(single_run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    resumed = tmp_path / "run"
    shutil.copytree(single_run, resumed, ignore=shutil.ignore_patterns("step-60", "final", "best"))
    (resumed / "checkpoints" / "latest").write_text("step-30\n")
    train(load_config(CONFIG, [f"output_dir={resumed}", "resume_from_checkpoint=auto"]))
    weights = [(r["step"], r["task_weight"]) for r in read_metrics(resumed) if r["split"] == "train"]
    assert weights == [(r["step"], r["task_weight"]) for r in read_metrics(single_run) if r["split"] == "train"]


@pytest.mark.dist
def test_coba_demo_on_two_processes(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", "0", "-m", "mftcoder", "train", str(CONFIG), f"output_dir={out}",
        "per_device_train_batch_size=4",  # the same global batch of 8
    ]  # fmt: skip
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "world_size=2" in proc.stdout + proc.stderr
    assert_the_hard_task_loses_weight(out)
