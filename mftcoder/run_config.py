"""A train config as a run gets it: every problem found before any model or data loads, all at once.

The schema and the rules among the config's own fields are `mftcoder.config`'s; what the data and
model layers know about a config (task files and names, the cache, where the model is, what its
family supports, the packages it needs) each checks itself. This module sits above all three, so
that the config package imports neither of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mftcoder.config.checks import config_issues
from mftcoder.config.loading import Origin, absolute_paths, parse_config, read_config
from mftcoder.config.schema import TrainConfig
from mftcoder.data.checks import data_issues
from mftcoder.models.checks import model_issues


def validate_mapping(raw: dict[str, Any], origin: Origin | None = None) -> TrainConfig:
    """Validate a raw mapping into a TrainConfig with absolute paths, or raise every problem at once."""
    origin = origin or Origin()
    config = parse_config(raw, origin)
    if issues := data_issues(config) + model_issues(config) + config_issues(config):
        raise origin.error(issues)
    return absolute_paths(config)


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    mftcoder: bool | None = None,
    notice: Callable[[str], None] = print,
) -> TrainConfig:
    """Load, translate (MFTCoder configs, see `read_config`), override and validate a train config."""
    raw, origin = read_config(path, overrides, mftcoder=mftcoder, notice=notice)
    return validate_mapping(raw, origin)
