"""Random bad configs always give a validation error naming every offending field."""

from __future__ import annotations

import random

import pytest
from conftest import DEMO_MODEL

from mftcoder.errors import ConfigError
from mftcoder.run_config import validate_mapping

pytestmark = pytest.mark.unit

# field -> bad values: wrong types, out-of-range numbers, missing paths, impossible choices
BAD = {
    "lora_rank": ["many", 0, -3, 2.5, [8]],
    "lora_alpha": ["big", 0],
    "lora_dropout": [1.5, -0.1, "some"],
    "learning_rate": ["fast", -1e-4, [1e-4]],
    "min_lr": [-1.0, "low"],
    "weight_decay": [-0.1],
    "adam_beta1": [1.0, -0.5],
    "adam_epsilon": [0, "tiny"],
    "max_grad_norm": [-1.0, "clip"],
    "seq_length": [1, 0, "long", [512]],
    "per_device_train_batch_size": [0, -1, "eight"],
    "per_device_eval_batch_size": [0],
    "gradient_accumulation_steps": [0, 1.5],
    "num_warmup_steps": [2.5, -1, "some"],
    "num_train_epochs": [0, "two"],
    "max_train_steps": [0, -5],
    "log_interval": [0],
    "evaluation_steps": [0, "often"],
    "checkpointing_steps": [-1],
    "saving_limit": [0],
    "early_stopping_stall_num": [0],
    "max_consecutive_nan": [0],
    "init_timeout_seconds": [0],
    "seed": ["random", 1.5],
    "peft_type": ["adapter", 1],
    "weighted_loss_mode": ["case9", "balanced"],
    "lr_scheduler_type": ["step"],
    "padding_mode": ["zip"],
    "dtype": ["fp8", "int4"],
    "attn_implementation": ["flash3"],
    "on_nan": ["ignore"],
    "model_init": ["random"],
    "data_split": ["half", [0.5, 0.2], [0.9, 0.1, 0.1, 0.0], [-0.1, 1.1], [98, 2]],
    "target_modules": [[], 7],
    "early_stopping": ["maybe"],
    "role_markers": ["<s>", {"user": 1}, {"speaker": "x"}],
    "pretrained_model_path": ["./no/such/model", "/no/such/dir"],
    "tokenizer_path": ["./no/such/tokenizer"],
    "data_paths": [[], "./missing", ["./missing/task"]],
    "metric_for_best": ["accuracy"],
    "task_weights": [[1.0], [-1, 1, 1], [0, 0, 0], "heavy"],
}


@pytest.fixture
def base(small_data, tmp_path):
    return {
        "pretrained_model_path": str(DEMO_MODEL),
        "model_init": "from_config",
        "data_paths": small_data,
        "output_dir": str(tmp_path / "out"),
    }


def test_base_is_valid(base):
    validate_mapping(base)


@pytest.mark.parametrize("seed", range(60))
def test_random_bad_configs_name_every_offending_field(base, seed):
    rng = random.Random(seed)
    fields = rng.sample(sorted(BAD), k=rng.randint(1, 3))
    raw = dict(base)
    for field in fields:
        raw[field] = rng.choice(BAD[field])
    with pytest.raises(ConfigError) as excinfo:
        validate_mapping(raw)
    named = {issue.field.split(".")[0] for issue in excinfo.value.issues}
    assert "config" not in named, excinfo.value
    # Cross-field and path checks run once the fields themselves are valid, so at least one of the
    # mutated fields is named, and nothing that was not mutated (except a field a mutation makes
    # wrong, like min_lr under a lowered learning_rate) is blamed.
    assert named & set(fields), (fields, str(excinfo.value))
    assert named <= set(fields) | {"min_lr", "early_stopping", "evaluation_steps"}, (fields, str(excinfo.value))


@pytest.mark.parametrize("field", sorted(BAD))
def test_every_bad_value_is_caught_alone_and_named(base, field):
    for value in BAD[field]:
        with pytest.raises(ConfigError) as excinfo:
            validate_mapping({**base, field: value})
        named = {issue.field.split(".")[0] for issue in excinfo.value.issues}
        assert field in named, (field, value, str(excinfo.value))
