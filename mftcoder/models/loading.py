"""Model loading: dtype, 4/8-bit bases, new tokens, LoRA wrapping (the attention is chosen in models/attention.py)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, set_seed

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import ConfigError, Issue, TrainingError
from mftcoder.models.families import config_issues, family, fused_experts, lora_targets

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantization_config(bits: int, dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's base: NF4 with double quantisation computing in `dtype`, or LLM.int8."""
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # 4-bit weights packed in a float dtype: FSDP and DeepSpeed ZeRO-3 shard floating-point parameters
        # only, so with the default uint8 packing every GPU would keep every 4-bit weight whole.
        bnb_4bit_quant_storage=dtype,
    )


def load_quantized(path, quantization: BitsAndBytesConfig, dtype: torch.dtype, **kwargs):
    """A model with bitsandbytes linears that stay trainable after an evaluation.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its inference kernel at the
    first forward in eval mode without grad, and keeps it so: that layout has no backward (later
    training steps silently lose the gradient through every base layer) and rounds the scales to bf16.
    Switching that repacking off per layer keeps the layout training and merging rely on.
    """
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization, **kwargs)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_model(config: TrainConfig, tokenizer, storage_dtype: torch.dtype, attention: str, source=None):
    """The base model in `storage_dtype` (its linears in 4/8 bits under QLoRA) with the `attention`
    implementation, embeddings resized to the tokenizer, cache off.

    Weights come from `source` (default: pretrained_model_path). Without a source, `model_init:
    from_config` builds seeded random weights, never quantised: bitsandbytes quantises while loading
    weights, so a QLoRA run saves the random ones and loads them back through `source`.
    """
    path = source or config.pretrained_model_path
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    issues = config_issues(model_config.model_type, config)  # the config checks could not read a remote model
    if issues:
        raise ConfigError(issues)
    common = {
        "attn_implementation": attention,
        "trust_remote_code": config.trust_remote_code,
    }
    if source is None and config.model_init == "from_config":
        set_seed(config.seed)  # the random initial weights are part of the run's reproducibility
        model = AutoModelForCausalLM.from_config(model_config, dtype=storage_dtype, **common)
    elif config.peft_type == "qlora":
        # The parts bitsandbytes does not quantise (embeddings, norms, head, fused MoE experts) stay in the
        # compute dtype like a LoRA base, not upcast to fp32 as peft's prepare_model_for_kbit_training
        # would: under autocast the matmuls run in the compute dtype anyway, and fp32 MoE experts would
        # double the largest part of the model. Freezing and checkpointing are done as for LoRA.
        quantization = quantization_config(config.quantization_bits or 4, storage_dtype)
        model = load_quantized(path, quantization, storage_dtype, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=storage_dtype, **common)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # A cache in training forwards is wasted memory, and with packing it would mix samples.
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextlib.contextmanager
def expert_rank_patterns():
    """Around PEFT's LoRA injection: PEFT 0.21.2 checks rank/alpha patterns against module targets only
    and warns that the fused experts' ones match nothing, although it applies them (the ranks are
    counted in tests/test_families.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match", RuntimeWarning)
        yield


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _check_named_targets(model, names: list[str]) -> None:
    """PEFT is silent about listed names that match nothing as long as one name matches."""
    modules = [name for name, _ in model.named_modules()]
    unmatched = [t for t in names if not any(m == t or m.endswith(f".{t}") for m in modules)]
    if unmatched:
        linear = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})
        raise ConfigError(
            [
                Issue(
                    "target_modules",
                    f"{', '.join(unmatched)} match no module of this {model.config.model_type} model; its linear "
                    f"modules are {', '.join(linear)} (fused MoE experts are reached by all-linear only)",
                )
            ]
        )


def _reachable_targets(model, exclude: list[str]) -> set[str]:
    """What all-linear must adapt: every nn.Linear but the output head, the family's frozen gates and the
    modules in `exclude` (trained in full), by module name (by parameter name for those adapted through
    their weight), and every fused expert parameter."""
    fam = family(model.config.model_type)
    skip = set(exclude) | set(fam.frozen if fam else ())
    head = model.get_output_embeddings()
    wanted = set(fused_experts(model))
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and module is not head and leaf not in skip:
            wanted.add(f"{name}.weight" if fam and leaf in fam.by_weight else name)
    return wanted


def cast_trainable(model, dtype: torch.dtype) -> None:
    """Every trainable parameter in `dtype`. PEFT makes adapters fp32 but copies `modules_to_save` in the
    frozen base's dtype: left so, those copies would keep bf16 optimizer states, and DeepSpeed ZeRO-3
    cannot partition trainable parameters of two dtypes at all."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def wrap_lora(config: TrainConfig, model):
    """LoRA on `target_modules` (all-linear: the family's targets, MoE experts included); embeddings and head
    are trained in full when tokens were added."""
    modules_to_save = list(config.lora_modules_to_save)
    if config.new_special_tokens:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            name = _module_name(model, module).split(".")[-1]
            if name not in modules_to_save:
                modules_to_save.append(name)
    # A head tied to the input embeddings stays tied when either is trained in full: one trained copy serves
    # both, as in full fine-tuning. Two copies would be two matrices that the tied model cannot hold, and the
    # frozen weight they share would sit in two FSDP2 groups, which fully_shard refuses.
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    keep_tied = (
        head is not None
        and head.weight is embeddings.weight
        and any(_module_name(model, m).split(".")[-1] in modules_to_save for m in (embeddings, head))
    )
    if config.target_modules == "all-linear":
        targets = lora_targets(model, config.lora_rank, config.lora_alpha)
        wanted = _reachable_targets(model, modules_to_save)
    else:
        _check_named_targets(model, config.target_modules)
        targets, wanted = {"target_modules": list(config.target_modules)}, set()
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=keep_tied,
        task_type="CAUSAL_LM",
        **targets,
    )
    with expert_rank_patterns():
        model = get_peft_model(model, lora)
    missed = wanted - set(model.base_model.targeted_module_names) - set(model.base_model.targeted_parameter_names)
    if missed:
        raise TrainingError(
            f"PEFT left {len(missed)} layers of this {model.config.model_type} model without LoRA "
            f"({', '.join(sorted(missed)[:4])}, ...), which target_modules: all-linear must reach; the peft or "
            "transformers version differs from the tested one (peft 0.21.2, transformers 5.23)"
        )
    return model
