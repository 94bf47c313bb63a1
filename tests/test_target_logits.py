"""Logits at the target positions only: the per-token losses and the gradients equal those of the full
logits path (every position's logits, torch's cross-entropy) for every family, LoRA and full fine-tuning,
padded, packed and flat batches, tied and untied heads, Gemma 2's soft-capped logits, and a model class
that cannot slice its logits by a mask (which falls back to all logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEMO_MODEL
from peft import LoraConfig, get_peft_model
from test_families import TINY, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from mftcoder.data.batching import MODEL_INPUTS, collate, collate_flat, collate_packed
from mftcoder.data.sample import Sample
from mftcoder.models.logits import logits_at_mask
from mftcoder.training.evaluation import forward_token_losses, model_outputs

pytestmark = pytest.mark.unit


def samples(vocab: int, seed: int = 0) -> list[Sample]:
    """Samples of different lengths whose prompts (the first third) carry no targets."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate((9, 14, 6, 11)):
        mask = np.ones(n, dtype=bool)
        mask[: n // 3] = False
        out.append(Sample(rng.integers(3, vocab, n), mask, i % 2))
    return out


def full_logits_losses(model, batch) -> torch.Tensor:
    """The reference: logits at every position, torch's cross-entropy, masked."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    logits = model(**inputs, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), batch["targets"].flatten(), reduction="none")
    return ce.view_as(batch["targets"]) * batch["loss_mask"]


def losses_and_grads(model, batch, losses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ce = losses(model, batch)
    # Unequal token weights, as the loss modes give.
    weights = torch.linspace(0.5, 2.0, ce.numel()).view_as(ce)
    (weights * ce).sum().backward()
    return ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_to_scale(grad: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Equal up to fp32 rounding of sums in another order: relative to the largest entry of the gradient."""
    torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6 * max(1.0, float(reference.abs().max())), msg=name)


def assert_same(model, batch) -> None:
    assert logits_at_mask(model)
    rows = int(batch["loss_mask"].sum())
    with torch.no_grad():
        assert model_outputs(model, batch).logits.shape[:-1] == (rows,), "logits were computed off the targets"
    ce, grads = losses_and_grads(model, batch, forward_token_losses)
    ce_ref, grads_ref = losses_and_grads(model, batch, full_logits_losses)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name, grad in grads.items():
        assert_close_to_scale(grad, grads_ref[name], name)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_family_trains_on_the_same_losses_from_the_targets_logits(model_type):
    model = tiny_model(model_type)  # eval: dropout (GPT-BigCode has some) would make the two paths differ
    assert_same(model, collate(samples(TINY[model_type]["vocab_size"]), pad_id=0))


def test_gemma2_soft_caps_the_targets_logits():
    model = tiny_model("gemma2")
    assert model.config.final_logit_softcapping, "the tiny Gemma 2 has no soft-cap to keep"
    batch = collate(samples(TINY["gemma2"]["vocab_size"]), pad_id=0)
    with torch.no_grad():
        logits = model_outputs(model, batch).logits
    assert float(logits.abs().max()) <= model.config.final_logit_softcapping
    assert_same(model, batch)


def demo_model(tie: bool):
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(DEMO_MODEL, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("layout", ["padding", "pack", "flat"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_demo_model_losses_and_gradients_equal_the_full_logits_path(layout, lora, tie):
    model = demo_model(tie)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        for module in model.modules():  # B starts at 0: give the adapters a gradient path through A too
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    rows = samples(model.config.vocab_size, seed=1)
    batch = {"padding": lambda: collate(rows, 0), "pack": lambda: collate_packed([rows[:2], rows[2:]], 0),
             "flat": lambda: collate_flat(rows, 0)}[layout]()  # fmt: skip
    assert_same(model.eval(), batch)


class SlicesItsOwnWay(LlamaForCausalLM):
    """Stands for a remote-code model: its module does not slice with transformers' function."""


def test_a_model_that_cannot_slice_by_mask_falls_back_to_every_positions_logits():
    torch.manual_seed(0)
    model = SlicesItsOwnWay(AutoConfig.for_model("llama", **TINY["llama"])).eval()
    assert not logits_at_mask(model)
    batch = collate(samples(TINY["llama"]["vocab_size"]), pad_id=0)
    with torch.no_grad():
        assert model_outputs(model, batch).logits.dim() == 3
    ce, grads = losses_and_grads(model, batch, forward_token_losses)
    ce_ref, grads_ref = losses_and_grads(model, batch, full_logits_losses)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close_to_scale(grad, grads_ref[name], name)
