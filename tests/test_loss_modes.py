"""The loss-mode registry: what each `weighted_loss_mode` is, as config, checks, losses and trainer read it."""

from __future__ import annotations

import typing

import pytest

from mftcoder.config.loss_modes import LOSS_MODES, loss_mode
from mftcoder.config.schema import TrainConfig
from mftcoder.losses.weighting import BALANCINGS, build_balancing

pytestmark = pytest.mark.unit

NAMES = ["case1", "case2", "case3", "case4", "focal", "self_paced", "coba"]


def schema_config(**fields) -> TrainConfig:
    """Schema validation only: no data or model files are looked at."""
    return TrainConfig(pretrained_model_path="model", data_paths=["task"], output_dir="out", **fields)


def test_the_registered_modes_are_the_schemas():
    assert list(LOSS_MODES) == NAMES
    assert list(typing.get_args(TrainConfig.model_fields["weighted_loss_mode"].annotation)) == NAMES


def test_only_self_paced_and_coba_learn_from_validation():
    assert [name for name, mode in LOSS_MODES.items() if mode.needs_validation] == ["self_paced", "coba"]
    assert not loss_mode("focal", "sample").needs_validation


@pytest.mark.parametrize(
    ("name", "level", "metric", "static_weights"),
    [
        ("case1", "task", "loss", False),
        ("case2", "task", "loss", False),
        ("case3", "task", "task_mean", True),
        ("case4", "task", "task_mean", True),
        ("focal", "task", "task_mean", True),
        ("focal", "sample", "loss", False),
        ("self_paced", "task", "task_mean", False),
        ("coba", "task", "task_mean", False),
        ("case1", "sample", "loss", False),  # the level is focal's alone
        ("coba", "sample", "task_mean", False),
    ],
)
def test_default_metric_and_static_task_weights(name, level, metric, static_weights):
    mode = loss_mode(name, level)
    assert (mode.default_metric, mode.static_task_weights) == (metric, static_weights)
    assert schema_config(weighted_loss_mode=name, focal_level=level).metric_for_best == metric


def test_log_tags_are_mftcoders():
    tags = {name: mode.log_tag for name, mode in LOSS_MODES.items()}
    assert tags == {
        "case1": "case1_weight",
        "case2": "case2_weight",
        "case3": "case3_weight",
        "case4": "case4_weight",
        "focal": "focal_weight",
        "self_paced": "selfpaced_weight",
        "coba": "coba_weight",
    }
    assert loss_mode("focal", "sample").log_tag == "focal_weight"


def test_self_paced_is_also_spelled_selfpaced():
    for spelling in ("selfpaced", "self-paced", "self_paced"):
        assert schema_config(weighted_loss_mode=spelling).weighted_loss_mode == "self_paced"


def test_the_config_names_its_mode_at_its_focal_level():
    assert schema_config(weighted_loss_mode="focal", focal_level="sample").loss_mode.label == (
        "focal with focal_level: sample"
    )
    assert schema_config(weighted_loss_mode="coba").loss_mode is LOSS_MODES["coba"]


def test_every_registered_mode_builds_a_balancing_that_agrees_on_validation():
    assert list(BALANCINGS) == list(LOSS_MODES)
    for name, mode in LOSS_MODES.items():
        balancing = build_balancing(schema_config(weighted_loss_mode=name), num_tasks=2)
        assert balancing.needs_validation == mode.needs_validation, name
