"""Read one task's source into records, naming the file and line of anything bad.

Files: JSONL (one record per line; blank lines skipped); a `.json` file is one JSON array of
records when its first non-blank character is `[`, otherwise JSONL; either may be gzip-compressed
(`.gz`). A directory written by `Dataset.save_to_disk` is read row by row (`dir[row]`).

A bad record (invalid JSON or UTF-8, not an object, no known format, a missing, empty or mistyped
field, roles out of order, ...) raises `DataError("file:line: field: problem")` under
`on_bad_record: error`; under `skip` it is counted and the first few are kept for the report. An
empty file counts as one bad record; a task left without any usable record is always an error.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mftcoder.config.schema import DataSource
from mftcoder.data.formats import BadRecord, Message, parse_preference, parse_record
from mftcoder.data.tasks import is_saved_dataset, task_files
from mftcoder.errors import DataError

EXAMPLES = 3  # bad, dropped and truncated records quoted per task in the report
_BLANK = re.compile(r"[ \t\r\n]*")
JSON_HINT = "a .json file holds one JSON array of records, or one record per line"
REST_NOT_READ = "the rest of the array was not read"


@dataclass(frozen=True)
class Record:
    messages: list[Message]
    source: str  # "file:line", for messages about this record
    text: str | None = None  # a plain-text record: every token is a target
    format: str = "chat_rounds"
    # A preference record: `messages` is the chosen conversation, this the rejected one (same turns but the last).
    rejected: list[Message] | None = None


@dataclass
class BadRecords:
    """The bad records of one task: raised at once (`on_bad_record: error`) or counted (`skip`)."""

    policy: str = "error"
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        if self.policy == "error":
            raise error
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(str(error))


@dataclass(frozen=True)
class TaskRecords:
    records: list[Record]
    read: int  # records read, good and bad (an empty file counts as one bad record)
    formats: dict[str, int]  # usable records per format


def as_source(entry: str | Path | DataSource) -> DataSource:
    return entry if isinstance(entry, DataSource) else DataSource(path=str(entry))


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _starts_with_bracket(handle: BinaryIO) -> bool:
    while chunk := handle.read(4096):
        stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace and a UTF-8 byte-order mark
        if stripped:
            handle.seek(0)
            return stripped[:1] == b"["
    handle.seek(0)
    return False


def _line_items(path: Path, handle: BinaryIO, bad: BadRecords) -> Iterator[tuple[str, object]]:
    hint = f"; {JSON_HINT}" if path.name.endswith((".json", ".json.gz")) else ""
    for number, raw in enumerate(handle, start=1):
        source = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.add(DataError(f"{source}: not valid UTF-8 ({err.reason} at byte {err.start})"))
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            bad.add(DataError(f"{source}: invalid JSON ({err.msg} at column {err.colno}){hint}"))
            continue
        yield source, obj


def _array_items(path: Path, raw: bytes, bad: BadRecords) -> Iterator[tuple[str, object]]:
    """The elements of one JSON array, each named by the line it starts on."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        bad.add(DataError(f"{path}:{line}: not valid UTF-8 ({err.reason}); the JSON array was not read"))
        return
    decoder = json.JSONDecoder()
    pos = _BLANK.match(text, 0).end() + 1  # past the '['
    line, counted = 1, 0
    expect_value = False
    while True:
        pos = _BLANK.match(text, pos).end()
        if pos < len(text) and text[pos] == "]" and not expect_value:
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            problem = f"invalid JSON ({err.msg} at column {err.colno}); {REST_NOT_READ}"
            bad.add(DataError(f"{path}:{err.lineno}: {problem}"))
            return
        line += text.count("\n", counted, pos)
        counted = pos
        yield f"{path}:{line}", obj
        pos = _BLANK.match(text, end).end()
        if text[pos : pos + 1] == ",":
            pos, expect_value = pos + 1, True
        elif text[pos : pos + 1] == "]":
            return
        else:
            where = text.count("\n", 0, pos) + 1
            problem = f"invalid JSON (expected ',' or ']' after an array element); {REST_NOT_READ}"
            bad.add(DataError(f"{path}:{where}: {problem}"))
            return


def _dataset_items(path: Path) -> Iterator[tuple[str, object]]:
    import datasets  # slow to import; only saved datasets need it

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot load the saved dataset ({err})") from None
    for index, row in enumerate(dataset):
        # Arrow gives every row every column, null where a record lacked the key.
        yield f"{path}[{index}]", {key: value for key, value in row.items() if value is not None}


def _file_items(path: Path, bad: BadRecords) -> Iterator[tuple[str, object]]:
    try:
        with _open(path) as handle:
            if path.name.endswith((".json", ".json.gz")) and _starts_with_bracket(handle):
                yield from _array_items(path, handle.read(), bad)
            else:
                yield from _line_items(path, handle, bad)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None


def _parse(obj: object, fmt: str, answer_required: bool, preference: bool, where: str) -> Record:
    if preference:
        chosen, rejected = parse_preference(obj)
        return Record(chosen, where, format="preference", rejected=rejected)
    parsed = parse_record(obj, fmt, answer_required=answer_required)
    return Record(parsed.messages, where, parsed.text, parsed.format)


def read_task(
    entry: str | Path | DataSource,
    bad: BadRecords | None = None,
    *,
    answer_required: bool = True,
    preference: bool = False,
) -> TaskRecords:
    """Every usable record of one task, in file order; bad ones go to `bad` (strict when None).

    `answer_required=False` reads prompts for generation (see `parse_record`); `preference` reads
    preference records (`parse_preference`)."""
    source = as_source(entry)
    bad = bad if bad is not None else BadRecords()
    records: list[Record] = []
    formats: Counter[str] = Counter()
    bad_before = bad.count
    for path in task_files(source):
        items = _dataset_items(path) if path.is_dir() and is_saved_dataset(path) else _file_items(path, bad)
        seen = bad.count
        found = False
        for where, obj in items:
            found = True
            try:
                record = _parse(obj, source.format, answer_required, preference, where)
            except BadRecord as err:
                bad.add(DataError(f"{where}: {err}"))
                continue
            records.append(record)
            formats[record.format] += 1
        if not found and bad.count == seen:
            bad.add(DataError(f"{path}: empty (no records)"))
    if not records:
        raise DataError(
            f"{source.path}: no usable records ({bad.count - bad_before} bad; first: {bad.examples[0]})"
            if bad.examples
            else f"{source.path}: no records"
        )
    return TaskRecords(records, len(records) + bad.count - bad_before, dict(formats))


def read_records(entry: str | Path | DataSource) -> list[Record]:
    """The records of one task, stopping at the first bad one (for tools and tests)."""
    return read_task(entry).records
