"""Typed train config: schema, loss modes, loading with overrides, MFTCoder translation, the config's
own cross-field checks. Loading with every check is `mftcoder.run_config`'s."""

from mftcoder.config.loading import dump_config
from mftcoder.config.schema import RoleMarkers, TrainConfig

__all__ = ["RoleMarkers", "TrainConfig", "dump_config"]
