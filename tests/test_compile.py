"""`torch_compile`: the model is compiled in place (nn.Module.compile), so saving, unwrapping and
state-dict keys are unchanged. Compiling even the tiny demo model takes ~30 s per batch shape on
2 CPU cores, so the fast test checks the plumbing and the training run is marked slow."""

from __future__ import annotations

import math

import pytest
from conftest import read_metrics
from safetensors import safe_open

from mftcoder.training.setup import build_model
from mftcoder.training.trainer import Trainer, train


@pytest.mark.e2e
@pytest.mark.parametrize("compile_model", [False, True])
def test_torch_compile_compiles_the_model_in_place(tiny_config, demo_tokenizer, compile_model):
    trainer = Trainer(tiny_config(torch_compile=compile_model))
    model = build_model(trainer.config, trainer.accelerator, trainer.checkpointer, demo_tokenizer, "sdpa")
    assert (model._compiled_call_impl is not None) == compile_model
    assert not any("_orig_mod" in name for name, _ in model.named_parameters())


@pytest.mark.slow
@pytest.mark.e2e
def test_compiled_model_trains_and_saves_a_plain_adapter(tiny_config):
    out = train(tiny_config(torch_compile=True, max_train_steps=2, per_device_train_batch_size=2)).output_dir
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if r["split"] == "train")
    with safe_open(str(out / "final" / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("base_model.model.model.layers.") and "_orig_mod" not in k for k in keys)
