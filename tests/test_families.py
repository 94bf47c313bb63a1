"""Model families: for every registered family a tiny random model is wrapped with `all-linear`, and
the adapted layers, the number of LoRA parameters, one optimizer step and the merge are checked against
the registry (mftcoder/models/families.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mftcoder.config import TrainConfig
from mftcoder.errors import ConfigError, TrainingError
from mftcoder.models import families
from mftcoder.models.attention import attention_implementation
from mftcoder.models.families import FAMILIES
from mftcoder.models.loading import expert_rank_patterns, wrap_lora
from mftcoder.run_config import validate_mapping

RANK, ALPHA, VOCAB = 4, 8, 128
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}  # fmt: skip
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
# DeepSeek MLA with its first layer dense (first_k_dense_replace) and one shared expert.
_DEEPSEEK = {**_MOE, "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
             "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_group": 1, "topk_group": 1}  # fmt: skip
TINY = {
    "llama": SMALL,
    "mistral": SMALL,
    "mixtral": {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": SMALL,
    "qwen3": SMALL,
    "qwen2_moe": {**SMALL, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**SMALL, **_MOE, "num_experts": 4},
    "starcoder2": SMALL,
    "gpt_bigcode": {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64, "n_positions": 64},
    "gpt_neox": {**SMALL, "rotary_pct": 0.25},
    "phi3": {**SMALL, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gemma2": SMALL,
    "gemma3_text": SMALL,
    "deepseek_v2": {**SMALL, **_DEEPSEEK, "q_lora_rank": None},  # DeepSeek-Coder-V2-Lite: plain q_proj
    "deepseek_v3": {**SMALL, **_DEEPSEEK, "q_lora_rank": 16},  # q_a_proj / q_b_proj
}


def tiny_model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY[model_type])
    attn = attention_implementation(model_type, torch.device("cpu"))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def lora_config(**overrides) -> TrainConfig:
    raw = {"pretrained_model_path": "unused", "data_paths": ["unused"], "output_dir": "unused",
           "lora_rank": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, **overrides}  # fmt: skip
    return TrainConfig(**raw)


def expected_targets(model, fam) -> tuple[set[str], int]:
    """From the registry alone: the module/parameter names LoRA must adapt, and its parameter count."""
    names, count = set(), 0
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        assert leaf in fam.linear + fam.by_weight + fam.frozen, f"{name}: a linear layer the registry does not know"
        if leaf in fam.frozen:
            continue
        names.add(f"{name}.weight" if leaf in fam.by_weight else name)
        count += RANK * (module.in_features + module.out_features)
    for name, param in model.named_parameters():
        fused = next((k for key, k in (fam.experts or {}).items() if name.endswith(f".{key}")), None)
        if fused:
            experts, out_features, in_features = param.shape  # transformers 5: [experts, out, in]
            names.add(name)
            count += experts * RANK * fused * (in_features + out_features)
    return names, count


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_all_linear_adapts_the_registry_targets_trains_and_merges(model_type):
    assert set(TINY) == set(FAMILIES), "every registered family needs a tiny config here"
    fam = FAMILIES[model_type]
    model = tiny_model(model_type)
    base_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    wanted, lora_params = expected_targets(model, fam)

    peft_model = wrap_lora(lora_config(), model)
    tuner = peft_model.base_model
    assert set(tuner.targeted_module_names) | set(tuner.targeted_parameter_names) == wanted
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == lora_params
    if fam.experts:
        assert any(".experts." in name for name in trainable), "the MoE experts were not adapted"
    assert not any(".gate." in name or "shared_expert_gate" in name for name in trainable), "a router was adapted"

    # B starts at 0, which would leave A without gradient in the first step: start it off zero.
    with torch.no_grad():
        for name, p in trainable.items():
            if "lora_B" in name:
                p.normal_(std=0.05)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    peft_model.train()
    lm_loss(peft_model, ids).backward()
    optimizer.step()
    unchanged = [name for name, p in trainable.items() if torch.equal(p, before[name])]
    assert not unchanged, unchanged

    peft_model.eval()
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        folded = merged(input_ids=ids).logits
    assert (folded - with_adapter).abs().max().item() < 1e-4
    # The frozen base (routers included) did not move; merging changed the adapted weights only.
    merged_params = dict(merged.named_parameters())
    for name, param in base_params.items():
        adapted = any(name == w or name == f"{w}.weight" for w in wanted)
        assert torch.equal(merged_params[name], param) != adapted, name


@pytest.mark.unit
def test_gemma2_auto_attention_is_eager_and_sdpa_is_refused(tmp_path, small_data):
    cpu = torch.device("cpu")
    assert attention_implementation("gemma2", cpu) == "eager"  # flash-attn needs CUDA
    assert attention_implementation("llama", cpu) == "sdpa"
    config = model_dir(tmp_path, "gemma2")
    with pytest.raises(ConfigError) as raised:
        validate(config, small_data, tmp_path, attn_implementation="sdpa")
    [issue] = raised.value.issues
    assert issue.field == "attn_implementation" and "soft-caps" in issue.message and "eager" in issue.message


def model_dir(tmp_path, model_type: str):
    path = tmp_path / model_type
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def validate(model, data, tmp_path, **overrides):
    return validate_mapping(
        {
            "pretrained_model_path": str(model),
            "model_init": "from_config",
            "data_paths": data,
            "output_dir": str(tmp_path / "out"),
            **overrides,
        }  # fmt: skip
    )


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_moe_families_need_lora_dropout_zero(tmp_path, small_data, model_type):
    model = model_dir(tmp_path, model_type)
    with pytest.raises(ConfigError) as raised:
        validate(model, small_data, tmp_path)  # lora_dropout defaults to 0.05
    [issue] = raised.value.issues
    assert issue.field == "lora_dropout" and "lora_dropout: 0" in issue.message
    assert validate(model, small_data, tmp_path, lora_dropout=0).lora_dropout == 0
    # An explicit module list adapts no parameters, so dropout is fine there.
    assert validate(model, small_data, tmp_path, target_modules=["q_proj"]).lora_dropout == 0.05


@pytest.mark.unit
def test_deepseek_refuses_qlora(tmp_path, small_data):
    with pytest.raises(ConfigError) as raised:
        validate(model_dir(tmp_path, "deepseek_v2"), small_data, tmp_path, peft_type="qlora", lora_dropout=0)
    [issue] = raised.value.issues
    assert issue.field == "peft_type" and "#3711" in issue.message


@pytest.mark.unit
def test_named_targets_that_match_nothing_are_refused():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError) as raised:
        wrap_lora(lora_config(target_modules=["q_proj", "gate_proj", "w1"]), model)
    message = str(raised.value)
    assert "gate_proj, w1 match no module of this mixtral model" in message
    assert "q_proj" in message.split("its linear modules are")[1] and "all-linear" in message


@pytest.mark.unit
def test_unregistered_model_with_fused_experts_is_refused():
    config = AutoConfig.for_model("olmoe", **SMALL, num_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match="olmoe is not in mftcoder's model families and has fused MoE expert"):
        wrap_lora(lora_config(), model)


@pytest.mark.unit
def test_unregistered_dense_model_gets_peft_all_linear():
    config = AutoConfig.for_model("olmo2", **SMALL)
    model = AutoModelForCausalLM.from_config(config)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    peft_model = wrap_lora(lora_config(), model)
    assert set(peft_model.base_model.targeted_module_names) == linear


@pytest.mark.unit
def test_a_layer_peft_leaves_out_stops_the_run(monkeypatch):
    # What the registry works around: PEFT 0.21.2 rewrites DeepSeek module targets named gate/up/down_proj
    # into the fused experts (huggingface/peft#3711). Naming them as modules must not pass silently.
    fam = FAMILIES["deepseek_v2"]
    naive = dataclasses.replace(fam, linear=fam.linear + fam.by_weight, by_weight=())
    monkeypatch.setitem(families.FAMILIES, "deepseek_v2", naive)
    with pytest.raises(TrainingError, match=r"PEFT left \d+ layers .*model\.layers\.0\.mlp\.down_proj"):
        wrap_lora(lora_config(), tiny_model("deepseek_v2"))


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_moe_adapter_merges_through_mftcoder_merge(model_type, tmp_path, demo_tokenizer):
    from peft import PeftModel

    from mftcoder.merge import merge_adapter

    base_dir, adapter = tmp_path / "base", tmp_path / "adapter"
    config = AutoConfig.for_model(model_type, **{**TINY[model_type], "vocab_size": len(demo_tokenizer)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    demo_tokenizer.save_pretrained(base_dir)
    model = wrap_lora(lora_config(), AutoModelForCausalLM.from_pretrained(base_dir))
    with torch.no_grad():  # a trained-looking adapter: B away from 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(adapter)
    merged = merge_adapter(adapter, tmp_path / "merged")

    ids = torch.randint(0, len(demo_tokenizer), (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), expert_rank_patterns():
        expected = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
            .eval()(input_ids=ids)
            .logits
        )
        folded = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=ids).logits
    assert (folded - expected).abs().max().item() < 1e-4
    assert (folded - plain).abs().max().item() > 1e-3
