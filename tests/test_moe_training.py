"""MoE training: the router load-balancing loss enters the objective and is logged on its own."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import DEMO_MODEL, read_metrics
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mftcoder.training.step import optimizer_step
from mftcoder.training.step_outcome import Outcome
from mftcoder.training.trainer import Trainer, train

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


def assert_closer_to(logged: float, expected: float, than: float) -> None:
    """`logged` is `expected`, and 10x closer to it than to the value with the padding counted in."""
    assert logged == pytest.approx(expected, rel=1e-5)
    assert abs(logged - expected) < abs(than - expected) / 10, (logged, expected, than)


def first_step_aux_loss(tiny_config, tmp_path, padding_mode):
    """The logged aux_loss of step 1, and the trainer (its data and the step's micro-batch)."""
    model = tiny_mixtral(tmp_path / f"model_{padding_mode}", 0.5)
    # eager: packed rows with padding after their last sample (sdpa on the CPU packs one flat row, no padding)
    config = tiny_config(
        pretrained_model_path=str(model), output_dir=str(tmp_path / padding_mode), max_train_steps=1,
        padding_mode=padding_mode, lora_dropout=0.0, attn_implementation="eager",
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    (record,) = [r for r in read_metrics(tmp_path / padding_mode) if r["split"] == "train"]
    (indices,) = trainer.epoch_steps(0)[0]  # one micro-batch: 1 process, no accumulation
    # Step 1 ran on the initial weights: LoRA's B starts at 0, so the base alone is that model.
    base = AutoModelForCausalLM.from_pretrained(tmp_path / padding_mode / "base_model", dtype=torch.float32).eval()
    return record["aux_loss"], trainer.run.data.train.batch(indices, trainer.run.pad_id), base


def test_logged_aux_loss_is_transformers_own_over_the_real_tokens(tiny_config, tmp_path):
    """Padding mode: the logged value is what Mixtral computes itself from its attention mask."""
    logged, batch, base = first_step_aux_loss(tiny_config, tmp_path, "padding")
    assert not batch["attention_mask"].all(), "the batch has no padding to exclude"
    with torch.no_grad():
        out = base(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_router_logits=True,
            use_cache=False,
        )
        unmasked = load_balancing_loss_func(out.router_logits, 4, 2)
    assert_closer_to(logged, float(out.aux_loss), than=float(unmasked))


def test_logged_aux_loss_in_pack_mode_excludes_the_row_padding(tiny_config, tmp_path):
    """Pack mode has no attention mask: the loss is transformers' formula over the router logits of
    the packed samples' tokens, each sample's equal to its logits when run alone."""
    logged, batch, base = first_step_aux_loss(tiny_config, tmp_path, "pack")
    real = batch["tokens"].reshape(-1).bool()
    assert not real.all(), "the packed rows have no padding to exclude"
    with torch.no_grad():
        # No cache and no attention mask: transformers then isolates the samples by their position ids.
        out = base(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], output_router_logits=True, use_cache=False
        )
    expected = load_balancing_loss_func(tuple(layer[real] for layer in out.router_logits), 4, 2)
    assert_closer_to(logged, float(expected), than=float(load_balancing_loss_func(out.router_logits, 4, 2)))


def test_an_empty_micro_batch_adds_no_router_loss(tiny_config, tmp_path):
    """With 2+ ranks, a rank whose share of a step ran out gets a dummy micro-batch; in pack mode it
    has no real token, where the balance formula is 0/0: the step must stay finite (a NaN would
    make the trainer skip it, or stop with on_nan: stop)."""
    model = tiny_mixtral(tmp_path / "model", 0.5)
    config = tiny_config(
        pretrained_model_path=str(model), max_train_steps=1, padding_mode="pack", lora_dropout=0.0,
        per_device_train_batch_size=1, gradient_accumulation_steps=2,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    result = optimizer_step(trainer.accelerator, config, trainer.run, [[1], []])
    assert result.outcome is Outcome.APPLIED
    aux = trainer.run.window.split(result.sums)[-1]
    assert math.isfinite(aux) and aux > 0  # micro-batch [1]'s loss, plus 0 for the dummy
