"""The output directory: refusing to clobber an earlier run, and atomic, self-describing saves.

<output_dir>/config.yaml  run.json  base_model/  checkpoints/step-<N>/  checkpoints/latest
             final/  logs/  (merged/, when `mftcoder merge` is pointed there)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mftcoder.errors import ConfigError, Issue

RUN_ARTEFACTS = ("config.yaml", "run.json", "base_model", "checkpoints", "final", "best", "merged", "logs")


def earlier_run_artefacts(output_dir: Path) -> list[str]:
    return [name for name in RUN_ARTEFACTS if (output_dir / name).exists()]


def check_output_dir(output_dir: Path, overwrite: bool) -> list[str]:
    """The artefacts an overwrite will remove; refuses (changing nothing) when not allowed to."""
    found = earlier_run_artefacts(output_dir)
    if found and not overwrite:
        raise ConfigError(
            [
                Issue(
                    "output_dir",
                    f"{output_dir} holds an earlier training run ({', '.join(found)}); nothing was changed. "
                    "Choose another output_dir, or pass overwrite_output_dir=true to replace it",
                )
            ]
        )
    return found


def clear_artefacts(output_dir: Path, names: list[str]) -> None:
    """Remove only what mftcoder wrote; anything else the user keeps there stays."""
    for name in names:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_pretrained(directory: Path, model, tokenizer, state_dict) -> None:
    """HF-loadable model or adapter, plus the tokenizer with its chat template."""
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def publish(tmp: Path, final: Path) -> None:
    """Make a directory written under a temporary name visible under its final name, replacing it."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
