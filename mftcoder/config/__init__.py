"""Typed train config: schema, loading with overrides, MFTCoder translation, validation."""

from mftcoder.config.loading import dump_config, load_config, validate_mapping
from mftcoder.config.schema import RoleMarkers, TrainConfig

__all__ = ["RoleMarkers", "TrainConfig", "dump_config", "load_config", "validate_mapping"]
