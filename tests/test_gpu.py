"""Mixed precision where it really runs: fp16 with accelerate's own GradScaler and bf16 autocast, on a CUDA
GPU. Skipped elsewhere; the CPU suite drives the same trainer paths through tests/test_checkpoint.py (a
real GradScaler on the CPU) and the bf16 presets of tests/test_scale.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import poison_forward, read_metrics
from safetensors.torch import load_file

from mftcoder.training.trainer import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.e2e,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def run(tiny_config, dtype: str):
    config = tiny_config(
        dtype=dtype, max_train_steps=6, evaluation_steps=3, lora_modules_to_save=["embed_tokens", "lm_head"]
    )
    result = train(config)
    info = json.loads((result.output_dir / "run.json").read_text())
    lines = [m for m in read_metrics(result.output_dir) if m["split"] == "train"]
    return result, info, lines


def test_fp16_on_cuda_trains_under_a_grad_scaler_and_survives_an_overflow(tiny_config, monkeypatch, capsys):
    """accelerate's own GradScaler: a huge loss at step 3 overflows the fp16 gradients; the update is
    skipped, the scale lowered, and training goes on to the end."""
    poison_forward(monkeypatch, {3}, 1e9)
    result, info, lines = run(tiny_config, "fp16")
    assert info["mixed_precision"] == "fp16" and info["device"].startswith("cuda")
    assert result.steps == 6 and result.progress.overflow_steps >= 1 and result.progress.skipped_steps == 0
    assert "step 3: fp16 gradients overflowed; update skipped, loss scale lowered" in capsys.readouterr().out
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert 3 not in [m["step"] for m in lines]
    # Logged after each step: the overflow at step 3 lowered the scale that step 4 reports.
    by_step = {m["step"]: m["loss_scale"] for m in lines}
    assert by_step[4] < by_step[2]
    adapter = load_file(result.output_dir / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}


def test_bf16_on_cuda_trains_without_loss_scaling(tiny_config):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result, info, lines = run(tiny_config, "bf16")
    assert info["mixed_precision"] == "bf16"
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(math.isfinite(m["loss"]) and "loss_scale" not in m for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    adapter = load_file(result.output_dir / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
