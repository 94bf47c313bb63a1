"""What each `weighted_loss_mode` optimises, as the schema, the checks and the trainer need to know it.

The formulas are in `mftcoder.losses`; the `Balancing` of each mode is built by
`mftcoder.losses.weighting`, keyed by the same names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType


@dataclass(frozen=True)
class LossMode:
    name: str
    # Each task counts equally in the objective; otherwise each token or sample does, so the largest
    # task dominates it.
    balances_tasks: bool
    # The task weights are learned from losses on validation samples drawn during training, so the
    # run needs a validation split, and the size of those draws shapes the weights.
    needs_validation: bool = False
    aliases: tuple[str, ...] = ()
    label: str = ""  # how messages name the mode where its name alone does not say what it balances

    @property
    def static_task_weights(self) -> bool:
        """`task_weights` scale the tasks of the objective."""
        return self.balances_tasks and not self.needs_validation

    @property
    def default_metric(self) -> str:
        """What `metric_for_best` follows unless set: what the mode optimises. With tasks weighted
        equally, a validation loss over all tokens would mostly follow the largest task."""
        return "task_mean" if self.balances_tasks else "loss"

    @property
    def log_tag(self) -> str:
        """The TensorBoard tag of the task weights, MFTCoder's: {task}_coba_weight, {task}_selfpaced_weight."""
        return f"{self.name.replace('_', '')}_weight"


LOSS_MODES: Mapping[str, LossMode] = MappingProxyType(
    {
        mode.name: mode
        for mode in (
            LossMode("case1", balances_tasks=False),
            LossMode("case2", balances_tasks=False),
            LossMode("case3", balances_tasks=True),
            LossMode("case4", balances_tasks=True),
            LossMode("focal", balances_tasks=True),  # at focal_level: task; `loss_mode` resolves the level
            # MFTCoder v0.3/v0.4 spelled it `selfpaced`.
            LossMode("self_paced", balances_tasks=True, needs_validation=True, aliases=("selfpaced", "self-paced")),
            LossMode("coba", balances_tasks=True, needs_validation=True),
        )
    }
)

ALIASES: Mapping[str, str] = MappingProxyType(
    {alias: mode.name for mode in LOSS_MODES.values() for alias in mode.aliases}
)

# focal_level: sample modulates case2 rather than case3: the same mode, balancing samples.
_FOCAL_SAMPLE = replace(LOSS_MODES["focal"], balances_tasks=False, label="focal with focal_level: sample")


def loss_mode(name: str, focal_level: str | None = "task") -> LossMode:
    """The registered mode `name` at `focal_level` (which only focal reads)."""
    return _FOCAL_SAMPLE if name == "focal" and focal_level == "sample" else LOSS_MODES[name]
