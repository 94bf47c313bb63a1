"""Model families: what LoRA adapts in each architecture, and what each one needs when it loads.

With `target_modules: all-linear` (the default) a registered family gets exactly the targets listed
here; tests/test_families.py builds a tiny random model of every family and checks the list against
it. An unregistered `model_type` gets PEFT's own `all-linear` (every nn.Linear but the output head),
unless it has fused MoE experts, which PEFT would miss: that is refused.

MoE experts. transformers 5 stores a layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj`
of shape [experts, 2·intermediate, hidden], `mlp.experts.down_proj`), not as nn.Linear modules, so no
module name reaches them. They are adapted through PEFT's `target_parameters` (one LoRA per expert);
the fused gate/up projection gets rank 2r and alpha 2α, i.e. rank r per projection as on a dense
model (PEFT's own conversion of transformers-4 targets does the same). PEFT cannot apply dropout to a
parameter target, so these families need `lora_dropout: 0`.

Routers are not adapted (nor Qwen2-MoE's shared-expert gate): the load-balancing loss the trainer
adds is a weak regulariser next to the task losses, so a trainable router fine-tuned on a few tasks
could still drift towards a few experts. Frozen, they keep the pre-trained expert load; the experts and the attention adapt instead. (PEFT 0.21's `all-linear` would adapt the
router of Mixtral, Qwen3-MoE and DeepSeek; the explicit targets here avoid that.)

DeepSeek-V2/V3 dense and shared-expert MLPs. PEFT 0.21.2 rewrites any module target named
`gate_proj`, `up_proj` or `down_proj` of these models into the fused experts (huggingface/peft#3711),
which would silently leave the first dense layers and the shared experts frozen. They are therefore
targeted through their `weight` parameters, the one way that PEFT leaves alone; a parameter target
cannot wrap a 4-bit layer, so these families refuse QLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import ConfigError, Issue

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Fused expert parameters -> how many projections each one fuses.
_EXPERTS = {"mlp.experts.gate_up_proj": 2, "mlp.experts.down_proj": 1}


@dataclass(frozen=True)
class Family:
    linear: tuple[str, ...]  # nn.Linear modules adapted as modules (leaf names; absent ones are skipped)
    experts: dict[str, int] | None = None  # fused expert parameters -> projections fused in each
    by_weight: tuple[str, ...] = ()  # nn.Linear modules adapted through their `weight` (see module doc)
    frozen: tuple[str, ...] = ()  # nn.Linear modules left out on purpose (gates)
    no_sdpa: str = ""  # why sdpa cannot run this family; `auto` attention then means eager
    no_qlora: str = ""  # why QLoRA cannot run this family


_DEEPSEEK_MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_DEEPSEEK_NO_QLORA = (
    "its dense and shared-expert MLPs are adapted through their weights (PEFT 0.21, huggingface/peft#3711), which "
    "cannot wrap 4-bit layers; use peft_type: lora"
)

FAMILIES: dict[str, Family] = {
    "llama": Family(_ATTENTION + _MLP),  # CodeLlama, DeepSeek-Coder (v1), Llama 2/3
    "mistral": Family(_ATTENTION + _MLP),  # Mistral, Codestral
    "mixtral": Family(_ATTENTION, experts=_EXPERTS),
    "qwen2": Family(_ATTENTION + _MLP),  # Qwen2, Qwen2.5-Coder
    "qwen3": Family(_ATTENTION + _MLP),
    "qwen2_moe": Family(_ATTENTION + _MLP, experts=_EXPERTS, frozen=("shared_expert_gate",)),  # + shared expert
    "qwen3_moe": Family(_ATTENTION, experts=_EXPERTS),  # Qwen3-MoE, Qwen3-Coder-30B-A3B
    "starcoder2": Family(_ATTENTION + ("c_fc", "c_proj")),
    "gpt_bigcode": Family(("c_attn", "c_proj", "c_fc")),  # StarCoder, StarCoderBase
    "gpt_neox": Family(("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),  # GPT-NeoX, Pythia
    "phi3": Family(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),  # Phi-3, Phi-3.5
    "gemma2": Family(
        _ATTENTION + _MLP,
        no_sdpa="Gemma 2 soft-caps its attention logits, which sdpa cannot compute (transformers 5.23 "
        "marks Gemma2 `_supports_sdpa = False`); use eager, or flash_attention_2 on CUDA",
    ),
    "gemma3_text": Family(_ATTENTION + _MLP),
    # DeepSeek-V2 / DeepSeek-Coder-V2(-Lite) (q_proj), DeepSeek-V3 (q_a_proj, q_b_proj)
    "deepseek_v2": Family(_DEEPSEEK_MLA, experts=_EXPERTS, by_weight=_MLP, no_qlora=_DEEPSEEK_NO_QLORA),
    "deepseek_v3": Family(_DEEPSEEK_MLA, experts=_EXPERTS, by_weight=_MLP, no_qlora=_DEEPSEEK_NO_QLORA),
}


def family(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def config_issues(model_type: str, config: TrainConfig) -> list[Issue]:
    """What a config asks of this model type that cannot work; checked before anything loads."""
    fam = family(model_type)
    if fam is None:
        return []
    issues = []
    if config.attn_implementation == "sdpa" and fam.no_sdpa:
        issues.append(Issue("attn_implementation", f"{model_type}: {fam.no_sdpa} (auto picks one)"))
    if config.peft_type == "qlora" and fam.no_qlora:
        issues.append(Issue("peft_type", f"QLoRA is not available for {model_type}: {fam.no_qlora}"))
    lora_on_parameters = config.target_modules == "all-linear" and (fam.experts or fam.by_weight)
    if config.peft_type and lora_on_parameters and config.lora_dropout > 0:
        issues.append(
            Issue(
                "lora_dropout",
                f"{model_type}: all-linear adapts the fused MoE experts as parameters, where PEFT cannot apply "
                "dropout; set lora_dropout: 0 (or list target_modules, which leaves the experts out)",
            )
        )
    return issues


def fused_experts(model) -> list[str]:
    # Under ZeRO-3 a parameter is a flat shard whose real shape is its ds_shape.
    return [
        name
        for name, param in model.named_parameters()
        if len(getattr(param, "ds_shape", param.shape)) == 3 and ".experts." in name
    ]


def lora_targets(model, rank: int, alpha: float) -> dict:
    """LoraConfig arguments for `target_modules: all-linear` on this model."""
    model_type = model.config.model_type
    fam = family(model_type)
    if fam is None:
        fused = fused_experts(model)
        if fused:
            raise ConfigError(
                [
                    Issue(
                        "target_modules",
                        f"{model_type} is not in mftcoder's model families and has fused MoE expert parameters "
                        f"({fused[0]}, ...) that all-linear would not adapt; list target_modules explicitly, or "
                        "add the family to mftcoder/models/families.py",
                    )
                ]
            )
        return {"target_modules": "all-linear"}
    experts = fam.experts or {}
    return {
        "target_modules": list(fam.linear),
        "target_parameters": list(experts) + [f"{name}.weight" for name in fam.by_weight] or None,
        "rank_pattern": {name: rank * k for name, k in experts.items() if k > 1},
        "alpha_pattern": {name: alpha * k for name, k in experts.items() if k > 1},
    }
