"""MoE training: the router load-balancing loss enters the objective and is logged on its own."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from safetensors.torch import load_file
from transformers import MixtralConfig

from conftest import DEMO_MODEL, read_metrics
from mftcoder.training.trainer import train

pytestmark = pytest.mark.e2e


def tiny_mixtral(directory, coefficient):
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, directory / name)
    vocab = json.loads((DEMO_MODEL / "config.json").read_text())["vocab_size"]
    MixtralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=coefficient,
    ).save_pretrained(directory)  # fmt: skip
    return directory


@pytest.fixture
def runs(tiny_config, tmp_path):
    def run(name, coefficient):
        model = tiny_mixtral(tmp_path / f"model_{name}", coefficient)
        out = tmp_path / name
        train(tiny_config(pretrained_model_path=str(model), output_dir=str(out), max_train_steps=3, lora_dropout=0.0))
        return out

    return run


def test_router_balance_loss_is_logged_and_trains(runs):
    with_aux, without = runs("aux", 0.5), runs("plain", 0.0)
    records = [r for r in read_metrics(with_aux) if r["split"] == "train"]
    assert all(math.isfinite(r["aux_loss"]) and r["aux_loss"] > 0 for r in records)
    assert all("aux_loss" not in r for r in read_metrics(without))
    # The same seed and data: only the balance loss separates the two adapters.
    a, b = (load_file(run / "final" / "adapter_model.safetensors") for run in (with_aux, without))
    assert any(not (a[k] == b[k]).all() for k in a)
