"""The one renderer of conversations: training token ids + loss mask, and the saved chat template.

MFTCoder's layout (spec §3.2–3.3), rendered as ONE string and tokenized once, so that the Jinja
chat template saved with the tokenizer reproduces the training ids exactly:

    {system marker}{system}\n {user marker}{user}\n {assistant marker}{assistant}\n{EOS}\n ...

Supervised: each assistant turn's content, the newline appended to it and its EOS. Not
supervised: markers, system and user turns, the newline after the EOS. The mask comes from
character spans mapped onto token offsets, never from token ids, so pad == EOS cannot hide EOS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mftcoder.config.schema import RoleMarkers
from mftcoder.data.records import Message
from mftcoder.errors import DataError


@dataclass(frozen=True)
class Rendered:
    text: str
    supervised: list[tuple[int, int]]  # half-open character spans


@dataclass(frozen=True)
class ChatFormat:
    markers: RoleMarkers
    eos_token: str

    def render(self, messages: Sequence[Message]) -> Rendered:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0

        def emit(piece: str) -> None:
            nonlocal length
            parts.append(piece)
            length += len(piece)

        for message in messages:
            role, content = message["role"], message["content"]
            emit(getattr(self.markers, role))
            if role == "assistant":
                start = length
                emit(content + "\n" + self.eos_token)
                spans.append((start, length))
                emit("\n")
            else:
                emit(content + "\n")
        return Rendered("".join(parts), spans)

    def jinja(self) -> str:
        """A chat template rendering exactly what `render` does (plus the generation prompt)."""
        lit = {name: json.dumps(getattr(self.markers, name)) for name in ("system", "user", "assistant")}
        eos = json.dumps(self.eos_token)
        return (
            "{% for message in messages %}"
            f"{{% if message['role'] == 'system' %}}{{{{ {lit['system']} + message['content'] + '\\n' }}}}"
            f"{{% elif message['role'] == 'user' %}}{{{{ {lit['user']} + message['content'] + '\\n' }}}}"
            f"{{% elif message['role'] == 'assistant' %}}"
            f"{{{{ {lit['assistant']} + message['content'] + '\\n' + {eos} + '\\n' }}}}"
            "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
            "{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {lit['assistant']} }}}}{{% endif %}}"
        )


def supervised_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for tokens that start inside a supervised span.

    A token straddling a boundary belongs to the side it starts on: the model never learns to
    produce marker text, and gets credit for a target token once.
    """
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for lo, hi in spans:
        mask |= ((starts >= lo) & (starts < hi)).astype(np.uint8)
    return mask


def tokenize_conversations(tokenizer, chat: ChatFormat, conversations: Sequence[Sequence[Message]]):
    """Token ids and loss masks (int32, uint8) of each conversation, tokenized as whole strings."""
    rendered = [chat.render(messages) for messages in conversations]
    encoded = tokenizer(
        [r.text for r in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    out = []
    for r, ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        out.append((np.asarray(ids, dtype=np.int32), supervised_mask(offsets, r.supervised)))
    return out


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{tokenizer.name_or_path}: a fast (Rust) tokenizer is needed for exact loss masks; "
            "convert it (tokenizer.json) or pick a model that ships one"
        )
    if tokenizer.eos_token is None:
        raise DataError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; set eos_token in its config")
