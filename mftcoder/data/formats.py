"""Record formats: one JSON object -> canonical messages, or plain text.

Canonical messages: `[{"role": "system" | "user" | "assistant", "content": str}]` with an optional
leading system turn, then user and assistant alternating from the user, and at least one assistant
turn (a trailing user turn is kept and never supervised).

Formats, and the order in which `auto` tries them (the first whose keys are present wins):

    chat_rounds    {"chat_rounds": [{"role", "content"}], "system"?}   MFTCoder
    messages       {"messages": [{"role", "content"}], "system"?}      OpenAI style
    sharegpt       {"conversations": [{"from", "value"}], "system"?}   ShareGPT
    alpaca         {"instruction", "input"?, "output", "system"?}      user turn = instruction + "\\n" + input
    prompt_answer  MFTCoder's pairs, in its order: prompt+answer, prompt+response, input+output,
                   instruction+output, instruction+response, question+response, question+answer,
                   query+answer; optional "system"
    text           {"text"}                                            continued pre-training

Alpaca is tried before the pairs: MFTCoder would read {instruction, input, output} as the pair
input+output and lose the instruction. Preference records (chosen/rejected) are refused by name: they
are read by `parse_preference`, under training_stage dpo or orpo. Other keys (id, data_name, ...) are ignored.

Preference records (`parse_preference`), both read as two conversations that share every turn but the
last, the response (chosen or rejected):

    {"prompt", "chosen", "rejected", "system"?}   prompt: a string (the user turn) or messages ending with
                                                  a user turn; chosen, rejected: a string or [one assistant turn]
    {"chosen", "rejected", "system"?}             MFTCoder's xxpo: two whole conversations (chat_rounds
                                                  turns) that must be equal up to their last assistant turn

Prompts for generation (`answer_required=False`): the same formats, detected the same way when the
answer is there; a record without one is a conversation ending with a user turn, an Alpaca
instruction (and input) without output, or a pair's prompt key alone (prompt, input, question,
query) — it must still hold a user turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ROLE_ALIASES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system turn
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
    "gpt": "assistant",
}
ROLES_HINT = "expected system, human/user, bot/assistant/gpt"

PAIR_KEYS = (
    ("prompt", "answer"),
    ("prompt", "response"),
    ("input", "output"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
)
CHAT_KEYS = {"chat_rounds": ("role", "content"), "messages": ("role", "content"), "sharegpt": ("from", "value")}
LIST_KEY = {"chat_rounds": "chat_rounds", "messages": "messages", "sharegpt": "conversations"}
FORMATS = ("chat_rounds", "messages", "sharegpt", "alpaca", "prompt_answer", "text")
PROMPT_KEYS = tuple(dict.fromkeys(p for p, _ in PAIR_KEYS if p != "instruction"))  # alone, without an answer

Message = dict[str, str]


class BadRecord(ValueError):
    """A record that cannot be used; `field` says where in it (the reader adds the file and line)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Parsed:
    format: str
    messages: list[Message]
    text: str | None = None  # set for `text` records, whose every token is a target


def _string(obj: Mapping, key: str, field: str | None = None, *, allow_empty: bool = False) -> str:
    field = field or key
    if key not in obj:
        raise BadRecord(field, "missing")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(field, f"must be a string, got {_type(value)}")
    if not value and not allow_empty:
        raise BadRecord(field, "empty")
    return value


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _optional_system(obj: Mapping) -> list[Message]:
    if obj.get("system") is None:
        return []
    system = _string(obj, "system", allow_empty=True)
    return [{"role": "system", "content": system}] if system else []


def _conversation(
    turns: object, list_field: str, role_key: str, content_key: str, system: list[Message], answer_required: bool
) -> list[Message]:
    """Validate a list of turns and return the canonical messages (system turns given first)."""
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else _type(turns)
        raise BadRecord(list_field, f"must be a non-empty list of {{{role_key}, {content_key}}} objects, got {got}")
    messages = list(system)
    for i, turn in enumerate(turns):
        field = f"{list_field}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(field, f"must be an object with {role_key} and {content_key}, got {_type(turn)}")
        if role_key not in turn:
            raise BadRecord(f"{field}.{role_key}", "missing")
        role = turn[role_key]
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise BadRecord(f"{field}.{role_key}", f"unknown role {role!r} ({ROLES_HINT})")
        role = ROLE_ALIASES[role]
        content = _string(turn, content_key, f"{field}.{content_key}", allow_empty=True)
        if not content and role != "system":
            raise BadRecord(f"{field}.{content_key}", f"empty {role} turn")
        if role == "system":
            if i != 0:
                raise BadRecord(f"{field}.{role_key}", "a system turn may only come first")
            if system:
                raise BadRecord(f"{field}.{role_key}", "the record also has a top-level system; give one of them")
            if content:
                messages.append({"role": role, "content": content})
            continue
        expected = "assistant" if messages and messages[-1]["role"] == "user" else "user"
        if role != expected:
            raise BadRecord(
                f"{field}.{role_key}", f"expected the {expected} turn here, got {role} (turns alternate, user first)"
            )
        messages.append({"role": role, "content": content})
    if not answer_required:
        if not any(m["role"] == "user" for m in messages):
            raise BadRecord(list_field, "no user turn, so no prompt")
    elif not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(list_field, "no assistant turn, so nothing to learn from")
    return messages


def _answer(obj: Mapping, key: str | None) -> list[Message]:
    return [{"role": "assistant", "content": _string(obj, key)}] if key is not None else []


def _pair(obj: Mapping, prompt_key: str, answer_key: str | None) -> list[Message]:
    return [*_optional_system(obj), {"role": "user", "content": _string(obj, prompt_key)}, *_answer(obj, answer_key)]


def _alpaca(obj: Mapping, answer_required: bool) -> list[Message]:
    instruction = _string(obj, "instruction")
    extra = _string(obj, "input", allow_empty=True) if obj.get("input") is not None else ""
    prompt = f"{instruction}\n{extra}" if extra else instruction
    answer = "output" if answer_required or "output" in obj else None
    return [*_optional_system(obj), {"role": "user", "content": prompt}, *_answer(obj, answer)]


def _matches(obj: Mapping, fmt: str, answer_required: bool = True) -> bool:
    if fmt in LIST_KEY:
        return LIST_KEY[fmt] in obj
    if fmt == "alpaca":
        return "instruction" in obj and ("output" in obj or not answer_required)
    if fmt == "prompt_answer":
        if not answer_required and any(p in obj for p in PROMPT_KEYS):
            return True
        return any(p in obj and a in obj for p, a in PAIR_KEYS)
    return fmt in obj  # text


def detect(obj: Mapping, answer_required: bool = True) -> str:
    """The format of a record; without `answer_required`, a prompt alone is tried once no full record matched."""
    for fmt in FORMATS:
        if _matches(obj, fmt):
            return fmt
    keys = ", ".join(sorted(obj)) or "none"
    if not answer_required:
        for fmt in FORMATS:
            if _matches(obj, fmt, answer_required=False):
                return fmt
        raise BadRecord(
            "record",
            f"no user prompt (keys: {keys}); expected chat_rounds, messages or conversations with a user turn, "
            f"instruction (Alpaca), or a prompt key: {', '.join(PROMPT_KEYS)}",
        )
    raise BadRecord(
        "record",
        f"no known format (keys: {keys}); expected chat_rounds, messages, conversations (ShareGPT), "
        "instruction/output (Alpaca), a prompt/answer pair such as prompt+response, or text",
    )


def _required_keys(fmt: str, answer_required: bool = True) -> str:
    if fmt in LIST_KEY:
        return LIST_KEY[fmt]
    if fmt == "alpaca":
        return "instruction and output" if answer_required else "instruction"
    if fmt == "prompt_answer":
        return " or ".join(f"{p}+{a}" for p, a in PAIR_KEYS) if answer_required else " or ".join(PROMPT_KEYS)
    return "text"


def parse_record(obj: object, fmt: str = "auto", *, answer_required: bool = True) -> Parsed:
    """The canonical content of one record; `fmt` forces a format (`auto`: detect it).

    `answer_required=False` reads prompts for generation: the answer (the last assistant turn) may be
    missing, a user turn may not; records that hold an answer read exactly as with the default."""
    if not isinstance(obj, dict):
        raise BadRecord("record", f"expected a JSON object, got {_type(obj)}")
    if "chosen" in obj and "rejected" in obj:
        raise BadRecord(
            "record",
            "this is preference data (chosen/rejected): set training_stage: dpo or orpo to train on it; "
            "supervised fine-tuning reads chat_rounds, messages, conversations, instruction/output, "
            "prompt/answer pairs or text",
        )
    if fmt == "auto":
        fmt = detect(obj, answer_required)
    elif not _matches(obj, fmt, answer_required):
        keys = ", ".join(sorted(obj)) or "none"
        needs = _required_keys(fmt, answer_required)
        raise BadRecord("record", f"format {fmt} needs {needs} (the record has keys: {keys})")
    if fmt in CHAT_KEYS:
        role_key, content_key = CHAT_KEYS[fmt]
        system = _optional_system(obj)
        turns = obj[LIST_KEY[fmt]]
        return Parsed(fmt, _conversation(turns, LIST_KEY[fmt], role_key, content_key, system, answer_required))
    if fmt == "alpaca":
        return Parsed(fmt, _alpaca(obj, answer_required))
    if fmt == "prompt_answer":
        pair = next(((p, a) for p, a in PAIR_KEYS if p in obj and a in obj), None)
        if pair is None:  # a prompt alone (answer_required is False)
            pair = (next(p for p in PROMPT_KEYS if p in obj), None)
        return Parsed(fmt, _pair(obj, *pair))
    return Parsed(fmt, [], _string(obj, "text"))


def _response(obj: Mapping, key: str) -> Message:
    """The chosen or rejected response: a string, or a list of one assistant turn (TRL's conversational form)."""
    value = obj[key]
    if isinstance(value, str):
        return {"role": "assistant", "content": _string(obj, key)}
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        turn = value[0]
        if ROLE_ALIASES.get(turn.get("role")) != "assistant":
            raise BadRecord(f"{key}[0].role", f"the response must be an assistant turn, got {turn.get('role')!r}")
        return {"role": "assistant", "content": _string(turn, "content", f"{key}[0].content")}
    raise BadRecord(key, f"must be a string or a list of one assistant turn, got {_type(value)}")


def parse_preference(obj: object) -> tuple[list[Message], list[Message]]:
    """The chosen and the rejected conversation of a preference record: the same turns, then each its own
    last assistant turn (the response, the only one scored)."""
    if not isinstance(obj, dict):
        raise BadRecord("record", f"expected a JSON object, got {_type(obj)}")
    missing = [key for key in ("chosen", "rejected") if key not in obj]
    if missing:
        keys = ", ".join(sorted(obj)) or "none"
        raise BadRecord(
            missing[0],
            f"missing: a preference record has chosen and rejected, and a prompt unless they are whole "
            f"conversations (the record has keys: {keys})",
        )
    system = _optional_system(obj)
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            context = [*system, {"role": "user", "content": _string(obj, "prompt")}]
        else:
            context = _conversation(prompt, "prompt", "role", "content", system, answer_required=False)
            if context[-1]["role"] != "user":
                raise BadRecord("prompt", "must end with a user turn (the responses answer it)")
        return [*context, _response(obj, "chosen")], [*context, _response(obj, "rejected")]
    chosen = _conversation(obj["chosen"], "chosen", "role", "content", system, answer_required=True)
    rejected = _conversation(obj["rejected"], "rejected", "role", "content", system, answer_required=True)
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise BadRecord(key, "must end with an assistant turn, the response")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("rejected", "must hold the same turns as chosen before its last assistant turn (the prompt)")
    return chosen, rejected
