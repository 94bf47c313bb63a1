"""Read task files into canonical conversations, naming file:line and the field of any bad record.

Canonical form: a list of `{"role": "system" | "user" | "assistant", "content": str}` with an
optional leading system turn, then user/assistant alternating from the user, at least one
assistant turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mftcoder.data.tasks import task_files
from mftcoder.errors import DataError

ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
    "gpt": "assistant",
}

Message = dict[str, str]


@dataclass(frozen=True)
class Record:
    messages: list[Message]
    source: str  # "file:line", for messages about this record


def _bad(source: str, field: str, problem: str) -> DataError:
    return DataError(f"{source}: {field}: {problem}")


def parse_chat_rounds(obj: object, source: str) -> list[Message]:
    """Validate one MFTCoder `chat_rounds` record and return its canonical messages."""
    if not isinstance(obj, dict):
        raise _bad(source, "record", f"expected a JSON object, got {type(obj).__name__}")
    if "chat_rounds" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise _bad(source, "chat_rounds", f"missing (the record has keys: {keys})")
    rounds = obj["chat_rounds"]
    if not isinstance(rounds, list) or not rounds:
        raise _bad(source, "chat_rounds", "must be a non-empty list of {role, content} objects")
    messages: list[Message] = []
    for i, turn in enumerate(rounds):
        field = f"chat_rounds[{i}]"
        if not isinstance(turn, dict):
            raise _bad(source, field, "must be an object with role and content")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLE_ALIASES:
            raise _bad(
                source, f"{field}.role", f"unknown role {role!r} (expected system, human/user, bot/assistant/gpt)"
            )
        if not isinstance(content, str):
            raise _bad(source, f"{field}.content", f"must be a string, got {type(content).__name__}")
        role = ROLE_ALIASES[role]
        if role == "system":
            if i != 0:
                raise _bad(source, f"{field}.role", "a system turn may only come first")
            if content:
                messages.append({"role": role, "content": content})
            continue
        if not content:
            raise _bad(source, f"{field}.content", f"empty {role} turn")
        expected = "user" if not messages or messages[-1]["role"] != "user" else "assistant"
        if role != expected:
            raise _bad(
                source, f"{field}.role", f"expected the {expected} turn here, got {role} (turns alternate, user first)"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _bad(source, "chat_rounds", "no assistant turn, so nothing to learn from")
    return messages


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def read_records(entry: str | Path) -> list[Record]:
    """Every record of one task source (a JSONL file, or a directory of them)."""
    files = task_files(entry)
    if not files:
        raise DataError(f"{entry}: no *.jsonl or *.json files")
    records = []
    for path in files:
        for number, line in _lines(path):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{source}: invalid JSON ({err.msg} at column {err.colno})") from None
            records.append(Record(parse_chat_rounds(obj, source), source))
    if not records:
        raise DataError(f"{entry}: no records (the files are empty)")
    return records
