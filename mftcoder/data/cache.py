"""The encoded-data cache: tokenize once, memory-map afterwards.

An entry holds what encoding produced (`encoding.encode_tasks`): every task's train, valid and (with
a test fraction in data_split) test samples as Arrow tables (`Dataset.save_to_disk`, read back
memory-mapped) and the encoding part of the report. Its key is a SHA-256 over everything that
output depends on:

- each task's name, format and files (resolved path, size and content digest);
- the tokenizer (its serialized fast tokenizer, with added and special tokens), the template the
  records are rendered with (`chat.jinja()`, EOS, end-of-turn tokens);
- seq_length, overlength, on_bad_record, data_split, seed, whether padding_mode is concat
  (which has no length limit) and whether the records are preference pairs (training_stage);
- the source of the modules that encode (formats, records, tasks, template, encoding, dataset, and
  sample, whose report the entry stores), so that a new mftcoder never reads an entry an older one wrote.

Everything else (sampling weights, packing, the model, the loss) is applied after loading, so
changing it reuses the entry. Editing one byte of a data file, or changing seq_length, misses.

    <cache_dir>/<key>/meta.json            task reports of the encoding, table names
    <cache_dir>/<key>/<task>/<split>/      one saved Dataset (input_ids int32, loss_mask uint8)
    <cache_dir>/<key>/data_report.json     written by `mftcoder preprocess`

An entry is built in `<key>.tmp-<host>-<pid>` and renamed when complete, so a reader never sees
half an entry and two builders racing on a shared directory both end with the same one. Entries
are never removed automatically: delete the directory to reclaim the space.

In a launch, rank 0 builds (or loads) first, then the first process of every other node (which
finds rank 0's entry when the cache directory is shared, and builds its own otherwise), then all
the others load; they wait at a barrier bounded by the process group's timeout
(`init_timeout_seconds`). A process whose turn fails still takes part in the remaining barriers
and raises afterwards; the others then build and fail the same way, so every process reports the
same error instead of waiting for a process that is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mftcoder.data.tasks import task_files, task_name

if TYPE_CHECKING:
    from mftcoder.config.schema import TrainConfig

META = "meta.json"
REPORT = "data_report.json"
ENCODING_MODULES = ("formats.py", "records.py", "tasks.py", "template.py", "encoding.py", "dataset.py", "sample.py")
_CHUNK = 1 << 20


def record_features():
    from datasets import Features, List, Value

    return Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "source": Value("string"),
            "text": Value("string"),
            "rejected": List({"role": Value("string"), "content": Value("string")}),
        }
    )


def encoded_features():
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "loss_mask": List(Value("uint8")),
            "rejected_ids": List(Value("int32")),
            "rejected_mask": List(Value("uint8")),
            "outcome": Value("int8"),
            "note": Value("string"),
            "targets": Value("int64"),
        }
    )


def cache_root(config: TrainConfig) -> Path:
    """`cache_dir`, else $MFTCODER_CACHE, else ~/.cache/mftcoder."""
    chosen = config.cache_dir or os.environ.get("MFTCODER_CACHE") or "~/.cache/mftcoder"
    return Path(chosen).expanduser().resolve()


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=32)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source_files(entry) -> list[Path]:
    """The files a task reads; a saved `datasets` directory contributes every file in it."""
    files = []
    for path in task_files(entry):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def fingerprint(config: TrainConfig, tokenizer, chat) -> str:
    """The cache key of a config's encoded data (see the module docstring)."""
    here = Path(__file__).parent
    tasks = []
    for entry in config.data_paths:
        files = [(str(p.resolve()), p.stat().st_size, _file_digest(p)) for p in _source_files(entry)]
        fmt = "auto" if isinstance(entry, str) else entry.format
        tasks.append({"name": task_name(entry), "format": fmt, "files": files})
    parts: dict[str, Any] = {
        "tasks": tasks,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "special_tokens": [tokenizer.eos_token, tokenizer.pad_token, *tokenizer.all_special_tokens],
        "template": [type(chat).__name__, chat.jinja(), chat.eos_token, list(getattr(chat, "end_tokens", ()))],
        "options": {
            "seq_length": config.seq_length,
            "overlength": config.overlength,
            "on_bad_record": config.on_bad_record,
            "data_split": config.data_split,
            "seed": config.seed,
            "concat": config.padding_mode == "concat",
            "preference": config.training_stage != "sft",
        },
        "code": {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in ENCODING_MODULES},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    path: Path
    meta: dict  # what the builder returned, plus the table names
    tables: dict  # name -> datasets.Dataset, memory-mapped
    hit: bool  # loaded without encoding


def _load(path: Path, hit: bool) -> Entry:
    import datasets  # slow to import

    meta = json.loads((path / META).read_text())
    tables = {name: datasets.load_from_disk(str(path / name)) for name in meta["tables"]}
    return Entry(path, meta, tables, hit)


@contextlib.contextmanager
def _quiet():
    """No progress bars while copying into the cache (tokenizing shows one)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _build(path: Path, build: Callable[[Path], tuple[dict, dict]]) -> Entry:
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        meta, tables = build(tmp / "scratch")
        with _quiet():
            for name, table in tables.items():
                table.save_to_disk(str(tmp / name), num_shards=None if len(table) else 1)  # 0 shards cannot be read
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        (tmp / META).write_text(json.dumps({**meta, "tables": list(tables)}))
        try:
            tmp.rename(path)
        except OSError:
            if not (path / META).is_file():
                raise
            shutil.rmtree(tmp)  # another process completed the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(path, hit=False)


def load_or_build(config: TrainConfig, tokenizer, chat, build: Callable[[Path], tuple[dict, dict]]) -> Entry:
    """The cache entry of this config's data; `build(scratch)` makes (meta, {name: Dataset}) when it
    is missing. In a launch, processes take turns (module docstring)."""
    root = cache_root(config)

    def load_or_build_here() -> Entry:
        path = root / fingerprint(config, tokenizer, chat)
        if (path / META).is_file():
            return _load(path, hit=True)
        root.mkdir(parents=True, exist_ok=True)
        entry = _build(path, build)
        rank = _rank()
        print(f"data cache: encoded into {entry.path}" + (f" (process {rank})" if rank is not None else ""), flush=True)
        return entry

    entry = _in_turn(load_or_build_here)
    if entry.hit and _rank() in (None, 0):
        print(f"data cache: loaded {entry.path}", flush=True)
    return entry


def _rank() -> int | None:
    """This process's rank in a launch, None outside one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _in_turn(work: Callable[[], Entry]) -> Entry:
    """Rank 0, then every other node's first process, then the rest (module docstring)."""
    if _rank() is None:
        return work()
    from accelerate import PartialState

    state = PartialState()
    first = state.is_main_process
    second = state.is_local_main_process and not first
    result, error = None, None
    for turn in (first, second, not (first or second)):
        if turn:
            try:
                result = work()
            except Exception as err:  # noqa: BLE001 - re-raised once every process has had its turn
                error = err
        state.wait_for_everyone()
    if error is not None:
        raise error
    return result
