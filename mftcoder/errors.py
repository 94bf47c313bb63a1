"""The error types mftcoder reports to users.

Only these are caught by the CLI and printed as one readable message; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class MFTCoderError(Exception):
    """Base class of the errors the CLI prints without a traceback."""


@dataclass(frozen=True)
class Issue:
    """One problem in a config: where it is and what to do about it."""

    field: str
    message: str
    location: str = ""  # "file:line" or "override key=value" when known

    def render(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{where}{self.field}: {self.message}"


class ConfigError(MFTCoderError):
    """The config is invalid; carries every problem found, not just the first."""

    def __init__(self, issues: list[Issue], source: str = ""):
        self.issues = issues
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        lines = [f"{head} ({len(issues)} problem{'s' if len(issues) != 1 else ''}):"]
        lines += [f"  - {issue.render()}" for issue in issues]
        super().__init__("\n".join(lines))


class DataError(MFTCoderError):
    """A data file is missing, unreadable or holds a bad record (message names file:line and field)."""


class LaunchError(MFTCoderError):
    """The launcher, the machine and the config disagree (world size, precision, devices...)."""


class MergeError(MFTCoderError):
    """An adapter cannot be merged into the given base."""


class TrainingError(MFTCoderError):
    """Training cannot go on (non-finite losses, a final save that failed); says where and why."""


class GenerateError(MFTCoderError):
    """A model cannot be loaded for generation, or the generation settings are invalid."""


class EvalError(MFTCoderError):
    """An evaluation cannot run: unknown benchmark, a run directory without what it needs, bad options."""
