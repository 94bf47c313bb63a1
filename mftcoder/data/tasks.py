"""Tasks: one per `data_paths` entry, a path or a mapping {path, name, format, weight}.

A task's source is a single file, a directory (every *.jsonl / *.json, optionally .gz, below it,
sorted, hidden files and directories skipped), or a directory written by `datasets`'
`Dataset.save_to_disk`. It is named `name`, else after the directory or the file stem.
"""

from __future__ import annotations

from pathlib import Path

from mftcoder.config.schema import DataSource
from mftcoder.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def source_path(entry: str | Path | DataSource) -> Path:
    return Path(entry if isinstance(entry, str | Path) else entry.path).expanduser()


def task_name(entry: str | Path | DataSource) -> str:
    """`data/code_completion/` -> code_completion; `data/text_to_code.jsonl.gz` -> text_to_code."""
    if not isinstance(entry, str | Path) and entry.name:
        return entry.name
    path = source_path(entry)
    return path.name if path.is_dir() else path.name.split(".")[0]


def is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def task_files(entry: str | Path | DataSource) -> list[Path]:
    """What to read for one task: the file itself, a saved dataset's directory, or the data files
    below a directory. A missing path, a saved DatasetDict or a directory without data is an error."""
    path = source_path(entry)
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if (path / "dataset_dict.json").is_file():
        splits = ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir()))
        raise DataError(
            f"{path}: a saved DatasetDict (splits: {splits}); point the entry at one split's directory, "
            f"e.g. {path / 'train'}"
        )
    if is_saved_dataset(path):
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.endswith(DATA_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: holds no *.jsonl or *.json file (nor .gz) and is not a saved `datasets` dataset")
    return files
