"""Tokenizer and model loading: dtype, attention implementation, new tokens, LoRA wrapping."""

from __future__ import annotations

import importlib.util

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from mftcoder.config.schema import TrainConfig
from mftcoder.data.template import ChatFormat, check_tokenizer

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(config: TrainConfig):
    """The tokenizer with our chat template installed, new special tokens added and a pad token."""
    source = config.tokenizer_path or config.pretrained_model_path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    check_tokenizer(tokenizer)
    if config.new_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(config.new_special_tokens)})
    if tokenizer.pad_token is None:
        # Safe: the loss mask is built from text spans, never from the pad id.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_format(config, tokenizer).jinja()
    return tokenizer


def chat_format(config: TrainConfig, tokenizer) -> ChatFormat:
    return ChatFormat(config.role_markers, tokenizer.eos_token)


def attention_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(config: TrainConfig, tokenizer, storage_dtype: torch.dtype):
    """The base model in `storage_dtype`, embeddings resized to the tokenizer, cache off."""
    attn = attention_implementation(config.attn_implementation)
    common = {"dtype": storage_dtype, "attn_implementation": attn, "trust_remote_code": config.trust_remote_code}
    if config.model_init == "from_config":
        model_config = AutoConfig.from_pretrained(
            config.pretrained_model_path, trust_remote_code=config.trust_remote_code
        )
        set_seed(config.seed)  # the random initial weights are part of the run's reproducibility
        model = AutoModelForCausalLM.from_config(model_config, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.pretrained_model_path, **common)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # A cache in training forwards is wasted memory, and with packing it would mix samples.
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def wrap_lora(config: TrainConfig, model):
    """LoRA on `target_modules`; embeddings and head are trained in full when tokens were added."""
    modules_to_save = list(config.lora_modules_to_save)
    if config.new_special_tokens:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            name = _module_name(model, module).split(".")[-1]
            if name not in modules_to_save:
                modules_to_save.append(name)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
