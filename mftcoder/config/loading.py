"""Read a config file (YAML or JSON), apply `key=value` overrides, validate it against the schema.

Problems are located: `file:line` for keys in the file, `override key=value` for overrides. The
checks that need the data or the model layer run in `mftcoder.run_config`, which loads configs for
the rest of the package.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mftcoder.config.mftcoder_compat import looks_like_mftcoder, translate_mftcoder
from mftcoder.config.schema import DataSource, TrainConfig
from mftcoder.errors import ConfigError, Issue


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.2); PyYAML 1.1 wants `1.0e-4`."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """Parse an override value the way a YAML file would: `[a,b]` is a list, `1e-4` a float."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def _top_level_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key; JSON is YAML, so one composer serves both."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The raw mapping in a config file and the line of each top-level key."""
    if not path.is_file():
        raise ConfigError([Issue("config", f"no such file: {path}")])
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as err:
        raise ConfigError([Issue("config", f"invalid JSON: {err.msg}", f"{path}:{err.lineno}")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([Issue("config", f"invalid YAML: {getattr(err, 'problem', err)}", where)]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Issue("config", "the file must hold a mapping of keys to values", str(path))])
    return raw, _top_level_lines(text)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply `key=value` (dotted keys reach into nested mappings); returns where each key came from."""
    raw = json.loads(json.dumps(raw))  # a deep copy that leaves the caller's mapping alone
    origins: dict[str, str] = {}
    problems: list[Issue] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Issue(item, "overrides are written key=value (e.g. learning_rate=1e-4)", "override"))
            continue
        *parents, leaf = key.split(".")
        target = raw
        for part in parents:
            child = target.get(part)
            if not isinstance(child, dict):
                child = target[part] = {}
            target = child
        target[leaf] = parse_value(value)
        origins[parents[0] if parents else leaf] = f"override {item}"
    if problems:
        raise ConfigError(problems)
    return raw, origins


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not isinstance(part, str) or not part.startswith("function-"))


def _issues_from_validation(err: ValidationError, raw: dict[str, Any]) -> list[Issue]:
    issues = []
    known = list(TrainConfig.model_fields)
    for e in err.errors():
        # Drop pydantic's union-branch labels ("list[str]", "literal['all-linear']") from the path.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function"))))
        path = _field_path(loc) or "config"
        if e["type"] == "extra_forbidden":
            message = "unknown key"
            if len(loc) == 1:
                close = difflib.get_close_matches(str(loc[0]), known, n=1, cutoff=0.6)
                if close:
                    message += f"; did you mean '{close[0]}'?"
        elif e["type"] == "missing":
            message = "required key is missing"
        elif e["type"] == "value_error":
            message = str(e["ctx"]["error"])
        else:
            message = e["msg"]
            if "input" in e and e["type"] != "value_error" and loc and loc[0] in raw:
                message += f" (got {e['input']!r})"
        issues.append(Issue(path, message))
    # Unions report one error per branch; one per field and message is enough.
    unique: dict[tuple[str, str], Issue] = {}
    for issue in issues:
        unique.setdefault((issue.field, issue.message), issue)
    return list(unique.values())


@dataclass(frozen=True)
class Origin:
    """Where the top-level keys of a raw config were set: a line of `path`, or an override."""

    path: Path | None = None
    lines: Mapping[str, int] = field(default_factory=dict)
    overrides: Mapping[str, str] = field(default_factory=dict)  # key -> "override key=value"

    def error(self, issues: list[Issue]) -> ConfigError:
        """The ConfigError of `issues`, each located where its top-level key was set."""
        located = []
        for issue in issues:
            top = issue.field.split(".")[0]
            if top in self.overrides:
                where = self.overrides[top]
            elif self.path is not None and top in self.lines:
                where = f"{self.path}:{self.lines[top]}"
            else:
                where = str(self.path) if self.path else ""
            located.append(Issue(issue.field, issue.message, where))
        return ConfigError(located, source=str(self.path) if self.path else "")


def read_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    mftcoder: bool | None = None,
    notice: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Origin]:
    """The raw mapping of a config file, translated (MFTCoder configs) and overridden, and its origin.

    `mftcoder=None` detects an MFTCoder train config by its fields; True forces the translation.
    `notice` receives what the translation changed and why.
    """
    path = Path(path)
    raw, lines = read_config_file(path)
    if mftcoder if mftcoder is not None else looks_like_mftcoder(raw):
        try:
            raw, notes = translate_mftcoder(raw)
        except ConfigError as err:
            raise Origin(path, lines).error(err.issues) from None
        notice(f"{path} is an MFTCoder train config; translated:")
        for note in notes:
            notice(f"  - {note}")
    raw, origins = apply_overrides(raw, overrides)
    return raw, Origin(path, lines, origins)


def parse_config(raw: dict[str, Any], origin: Origin) -> TrainConfig:
    """The TrainConfig of a raw mapping, or a ConfigError with every problem the schema finds."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise origin.error(_issues_from_validation(err, raw)) from None


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute, so the saved copy runs from any directory."""

    def local(p: str) -> str:
        path = Path(p).expanduser()
        return str(path.resolve()) if path.exists() else p

    def local_source(entry: str | DataSource) -> str | DataSource:
        if isinstance(entry, DataSource):
            return entry.model_copy(update={"path": local(entry.path)})
        return local(entry)

    return config.model_copy(
        update={
            "data_paths": [local_source(entry) for entry in config.data_paths],
            "output_dir": str(Path(config.output_dir).expanduser().resolve()),
            "pretrained_model_path": local(config.pretrained_model_path),
            "tokenizer_path": local(config.tokenizer_path) if config.tokenizer_path else None,
        }
    )


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML that `mftcoder.run_config.load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
