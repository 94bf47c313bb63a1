"""The tokenizer a run trains with: its own chat template installed, new special tokens, a pad token."""

from __future__ import annotations

from transformers import AutoTokenizer

from mftcoder.config.schema import TrainConfig
from mftcoder.data.template import chat_format, check_tokenizer


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
