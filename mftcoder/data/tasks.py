"""Tasks: one per `data_paths` entry, named after the directory or the file stem."""

from __future__ import annotations

from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json")


def task_name(entry: str | Path) -> str:
    """`data/code_completion/` -> code_completion; `data/text_to_code.jsonl` -> text_to_code."""
    path = Path(entry)
    return path.name if path.is_dir() else path.name.split(".")[0]


def task_files(entry: str | Path) -> list[Path]:
    """The data files of one task: the file itself, or every *.jsonl/*.json below a directory, sorted."""
    path = Path(entry)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
