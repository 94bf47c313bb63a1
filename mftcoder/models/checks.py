"""What the model layer knows about a config before anything loads: where the model and tokenizer
are, what the model's family supports, and the packages the config asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mftcoder.config.schema import TrainConfig
from mftcoder.data.packing import packing_issues
from mftcoder.errors import Issue
from mftcoder.models.families import config_issues
from mftcoder.models.resolve import locate_model


def _family_issues(config: TrainConfig, model_config: Path) -> list[Issue]:
    try:
        model_type = json.loads(model_config.read_text(encoding="utf-8")).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        return [Issue("pretrained_model_path", f"{model_config} is not a JSON object: {err}")]
    return config_issues(model_type, config) + packing_issues(model_type, config)


def model_issues(config: TrainConfig) -> list[Issue]:
    issues = []
    model_dir, problem = locate_model(config.pretrained_model_path)
    if problem:
        issues.append(Issue("pretrained_model_path", problem))
    elif model_dir is not None and not (model_dir / "config.json").is_file():
        issues.append(Issue("pretrained_model_path", f"{model_dir} has no config.json"))
    elif model_dir is not None:
        issues += _family_issues(config, model_dir / "config.json")
    for field, value in (("peft_type", "qlora"), ("optimizer", "adamw_8bit"), ("optimizer", "paged_adamw_8bit")):
        if getattr(config, field) == value and importlib.util.find_spec("bitsandbytes") is None:
            issues.append(Issue(field, f"{value} needs bitsandbytes (>= 0.50 on CPU): pip install bitsandbytes"))
    if config.tokenizer_path is not None:
        _, problem = locate_model(config.tokenizer_path)
        if problem:
            issues.append(Issue("tokenizer_path", problem))
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        issues.append(
            Issue(
                "attn_implementation",
                "flash_attention_2 needs the flash-attn package (CUDA only); install it or use auto/sdpa",
            )
        )
    return issues
