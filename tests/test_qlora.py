"""QLoRA: a 4/8-bit bitsandbytes base on CPU, training the demo model initialised from its config,
and merging the adapter into the full-precision base (default) or into dequant(quant(base))."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import read_metrics
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from mftcoder.cli import main
from mftcoder.errors import MergeError
from mftcoder.merge import merge_adapter
from mftcoder.models.loading import load_quantized, quantization_config, wrap_lora
from mftcoder.models.provenance import BASE_INFO
from mftcoder.training.trainer import train

# dequant(quant(W)) + BA against the QLoRA model, fp32: only float reassociation is left.
DEQUANTIZED_TOLERANCE = 1e-4


@pytest.mark.unit
def test_quantization_config():
    four = quantization_config(4, torch.bfloat16)
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16 and four.bnb_4bit_quant_storage == torch.bfloat16
    eight = quantization_config(8, torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit


@pytest.fixture(scope="module")
def qlora_run(small_data, tmp_path_factory):
    """4 QLoRA steps of the demo model (random weights from its config), evaluating after step 2."""
    from mftcoder.run_config import validate_mapping

    config = validate_mapping(
        {
            "pretrained_model_path": str(Path(__file__).parents[1] / "assets" / "demo" / "model"),
            "model_init": "from_config",
            "data_paths": small_data,
            "data_split": [0.9, 0.1],
            "seq_length": 512,
            "output_dir": str(tmp_path_factory.mktemp("qlora") / "out"),
            "peft_type": "qlora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "per_device_train_batch_size": 4,
            "learning_rate": 2e-2,  # high, so that 4 steps move the adapter well away from B = 0
            "num_warmup_steps": 0,
            "max_train_steps": 4,
            "log_interval": 1,
            "evaluation_steps": 2,
            "checkpointing_steps": None,
            "early_stopping": False,
            "seed": 7,
        }
    )
    return train(config).output_dir


def _quantization(adapter: Path) -> dict:
    return json.loads((adapter / BASE_INFO).read_text())["quantization"]


def _qlora_model(run: Path, quantization: BitsAndBytesConfig | None = None):
    """The trained QLoRA model: the saved base quantised as training recorded (or as given), plus the adapter."""
    if quantization is None:
        recorded = _quantization(run / "final")
        quantization = BitsAndBytesConfig.from_dict(recorded["bitsandbytes"])
        assert recorded["load_dtype"] == "float32"
    base = load_quantized(run / "base_model", quantization, torch.float32)
    return PeftModel.from_pretrained(base, run / "final")


def _sequences(run: Path) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    texts = ["def add(a, b):\n    return a + b\n", "<s>human\nWrite a unit test for reverse().\n<s>bot\n"]
    ids = [torch.tensor([tokenizer(text).input_ids]) for text in texts]
    return ids + [torch.randint(0, len(tokenizer), (1, 48), generator=torch.Generator().manual_seed(0))]


@torch.no_grad()
def _logits(model, sequences, *, train_mode: bool = False) -> list[torch.Tensor]:
    model.train(train_mode)  # dropout is 0: train mode only picks bitsandbytes' training kernels
    return [model(input_ids=ids).logits.float() for ids in sequences]


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.e2e
def test_qlora_trains_the_demo_model_from_its_config(qlora_run):
    base = qlora_run / "base_model"
    # The random initial weights were saved unquantised (the adapter's base); training quantised them.
    assert "quantization_config" not in json.loads((base / "config.json").read_text())
    assert {w.dtype for w in load_file(base / "model.safetensors").values()} == {torch.float32}
    recorded = _quantization(qlora_run / "final")
    assert recorded["load_dtype"] == "float32"
    assert recorded["bitsandbytes"]["load_in_4bit"] and recorded["bitsandbytes"]["bnb_4bit_quant_type"] == "nf4"
    assert recorded["bitsandbytes"]["bnb_4bit_use_double_quant"]

    records = read_metrics(qlora_run)
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    valid_losses = [r["loss"] for r in records if r["split"] == "valid"]
    assert len(train_losses) == 4 and all(math.isfinite(x) for x in train_losses)
    assert train_losses[-1] < train_losses[0] - 0.2 and valid_losses[-1] < valid_losses[0]
    adapter = load_file(qlora_run / "final" / "adapter_model.safetensors")
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 1e-3


@pytest.mark.e2e
def test_qlora_model_stays_trainable_after_an_evaluation(qlora_run):
    # bitsandbytes repacks 4-bit weights for a CPU inference kernel (no backward) at the first eval
    # forward without grad on CPUs with AVX512-BF16; load_quantized keeps the training layout.
    ids = _sequences(qlora_run)[-1]

    def lora_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = _qlora_model(qlora_run, quantization_config(4, torch.float32))
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        if evaluate_first:
            _logits(model, [ids])
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    fresh, evaluated = lora_grads(False), lora_grads(True)
    assert max((fresh[k] - evaluated[k]).abs().max().item() for k in fresh) < 1e-6
    assert all(g.abs().sum() > 0 for k, g in evaluated.items() if "layers.0." in k and "lora_A" in k)


@pytest.fixture(scope="module")
def merges(qlora_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora_merges")
    return {
        "default": merge_adapter(qlora_run / "final", root / "default"),
        "dequantized": merge_adapter(qlora_run / "final", root / "dequantized", qlora_dequantized=True),
    }


def _fp32(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.e2e
def test_dequantized_merge_reproduces_the_qlora_model(qlora_run, merges):
    sequences = _sequences(qlora_run)
    qlora = _logits(_qlora_model(qlora_run), sequences)
    merged = _fp32(merges["dequantized"])
    assert "quantization_config" not in json.loads((merges["dequantized"] / "config.json").read_text())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert _max_diff(_logits(merged, sequences), qlora) < DEQUANTIZED_TOLERANCE


@pytest.mark.e2e
def test_default_merge_drifts_from_the_qlora_model_by_the_quantisation_error(qlora_run, merges):
    sequences = _sequences(qlora_run)
    qlora = _logits(_qlora_model(qlora_run), sequences)
    default = _fp32(merges["default"])
    # The adapter, folded into the full-precision base: what a LoRA merge gives.
    on_full_base = _logits(PeftModel.from_pretrained(_fp32(qlora_run / "base_model"), qlora_run / "final"), sequences)
    assert _max_diff(_logits(default, sequences), on_full_base) < DEQUANTIZED_TOLERANCE
    # ... which is not the model that was trained: measured 0.14 on logits of magnitude ~1.3.
    drift = _max_diff(_logits(default, sequences), qlora)
    assert 1e-2 < drift < 1.0, drift

    # Weight by weight the two merges add the same LoRA delta; they differ exactly by the base's
    # quantisation error W - dequant(quant(W)), nonzero in every quantised (linear) layer only.
    base = load_file(qlora_run / "base_model" / "model.safetensors")
    dequantized = dict(_fp32(merges["dequantized"]).named_parameters())
    for name, weight in default.named_parameters():
        error = (weight - dequantized[name]).detach()
        if name.endswith("_proj.weight"):
            assert error.abs().max() > 0, name
            block_max = base[name].abs().max().item()
            assert error.abs().max().item() <= block_max * 0.17, name  # NF4 levels are at most 0.31·absmax apart
        else:
            assert torch.equal(weight, dequantized[name]), name


@pytest.mark.e2e
def test_8bit_qlora_merges_into_its_dequantized_base(small_data, tmp_path, tiny_config):
    config = tiny_config(
        peft_type="qlora", quantization_bits=8, optimizer="adamw_8bit", gradient_checkpointing=True,
        max_train_steps=2, learning_rate=2e-2,
    )  # fmt: skip
    run = train(config).output_dir
    recorded = _quantization(run / "final")
    assert recorded["bitsandbytes"]["load_in_8bit"] and not recorded["bitsandbytes"]["load_in_4bit"]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run) if r["split"] == "train")
    merged = merge_adapter(run / "final", tmp_path / "merged", qlora_dequantized=True)

    sequences = _sequences(run)
    model = _qlora_model(run)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    # In train mode bitsandbytes multiplies by the dequantised int8 weight (eval mode would quantise the
    # activations too, LLM.int8's inference kernel).
    assert (
        _max_diff(_logits(_fp32(merged), sequences), _logits(model, sequences, train_mode=True)) < DEQUANTIZED_TOLERANCE
    )


@pytest.mark.e2e
def test_dequantized_merge_through_the_cli_and_its_refusal_for_a_lora_adapter(qlora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(qlora_run / "final"), "--output", str(out), "--qlora-dequantized"]) == 0
    assert "dequant(quant(base))" in capsys.readouterr().out

    adapter = tmp_path / "lora_adapter"
    shutil.copytree(qlora_run / "final", adapter)
    info = json.loads((adapter / BASE_INFO).read_text())
    del info["quantization"]  # what a LoRA run records
    (adapter / BASE_INFO).write_text(json.dumps(info))
    with pytest.raises(MergeError, match="records no quantisation"):
        merge_adapter(adapter, tmp_path / "refused", qlora_dequantized=True)
    assert not (tmp_path / "refused").exists()


@pytest.mark.e2e
def test_qlora_on_a_moe_model_quantises_the_linears_and_adapts_the_experts(tmp_path):
    from test_families import TINY, lm_loss, lora_config

    config = AutoConfig.for_model("mixtral", **TINY["mixtral"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mixtral")
    base = load_quantized(tmp_path / "mixtral", quantization_config(4, torch.float32), torch.float32)
    model = wrap_lora(lora_config(), base)
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    experts = {n: p for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    assert experts  # bitsandbytes leaves the fused experts unquantised; LoRA adapts them as parameters
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    lm_loss(model, ids).backward()
    assert all(p.grad is not None for p in experts.values())
