"""The one renderer of records: training token ids + loss mask, and the saved chat template.

A record is rendered as ONE string with the character spans that are targets, tokenized once
(no special tokens added), and the mask comes from those spans mapped onto token offsets, never
from token ids (pad == EOS cannot hide EOS). The chat template saved with the tokenizer renders
the same string, so `apply_chat_template` reproduces the training ids exactly. Two layouts:

- `template: mftcoder` (`ChatFormat`, MFTCoder's own prompt layout and loss mask), with `role_markers`:

      {system marker}{system}\\n {user marker}{user}\\n {assistant marker}{assistant}\\n{EOS}\\n ...

  Targets: each assistant turn's content, the newline appended to it and its EOS; not the
  markers, the system and user turns, nor the newline after the EOS.

- `template: tokenizer` (`TokenizerChatFormat`): the tokenizer's own Jinja chat template, no
  `{% generation %}` markers needed. An assistant turn's target span starts where the rendering of
  the conversation before it with `add_generation_prompt` ends, and ends where the rendering up to
  and including it ends, less any whitespace written after the turn's last special token (ChatML's
  newline after `<|im_end|>`); the end-of-turn token itself is a target. Each of those renderings
  must be a prefix of the next, else the spans cannot be located and the record is refused.

Plain-text records (continued pre-training) render as `text + EOS` in either layout, every token a
target.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np

from mftcoder.config.schema import RoleMarkers, TrainConfig
from mftcoder.data.formats import BadRecord, Message
from mftcoder.data.records import Record
from mftcoder.errors import DataError


@dataclass(frozen=True)
class Rendered:
    text: str
    supervised: list[tuple[int, int]]  # half-open character spans
    # Where the rendering of the conversation up to each assistant turn ends: rounds may be dropped
    # by cutting `text` there (every layout renders a prefix of a conversation as a prefix of it).
    turn_ends: list[int]

    def rounds(self, count: int) -> Rendered:
        """The first `count` rounds (each ending with an assistant turn)."""
        end = self.turn_ends[count - 1]
        return Rendered(self.text[:end], self.supervised[:count], self.turn_ends[:count])


@dataclass(frozen=True)
class ChatFormat:
    markers: RoleMarkers
    eos_token: str

    def render(self, messages: Sequence[Message]) -> Rendered:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        ends: list[int] = []
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
                ends.append(length)
            else:
                emit(content + "\n")
        return Rendered("".join(parts), spans, ends)

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


@dataclass(frozen=True)
class TokenizerChatFormat:
    tokenizer: Any
    template: str
    eos_token: str
    end_tokens: tuple[str, ...]  # special tokens the template writes: candidates for the end of a turn

    @classmethod
    def of(cls, tokenizer) -> TokenizerChatFormat:
        try:
            template = tokenizer.get_chat_template()
        except ValueError:
            raise DataError(
                f"{tokenizer.name_or_path}: template: tokenizer, but the tokenizer has no chat template; "
                "use template: mftcoder, or a tokenizer that has one"
            ) from None
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials.update(tokenizer.all_special_tokens)
        ends = tuple(sorted(t for t in specials if t and t in template)) + (tokenizer.eos_token,)
        return cls(tokenizer, template, tokenizer.eos_token, ends)

    def _apply(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except jinja2.TemplateError as err:
            raise BadRecord("template", f"the tokenizer's chat template failed: {err}") from None

    def _turn_end(self, turn: str, start: int) -> int:
        tail = turn[start:]
        ends = [i + len(token) for token in self.end_tokens if (i := tail.rfind(token)) >= 0]
        if ends and not tail[max(ends) :].strip():
            return start + max(ends)
        return len(turn)

    def render(self, messages: Sequence[Message]) -> Rendered:
        full = self._apply(messages, False)
        spans: list[tuple[int, int]] = []
        ends: list[int] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(messages[:i], True)
            turn = full if i == len(messages) - 1 else self._apply(messages[: i + 1], False)
            if not (turn.startswith(prompt) and full.startswith(turn)):
                raise BadRecord(
                    "template",
                    f"the tokenizer's chat template renders the conversation before assistant turn {i} "
                    "differently once later turns follow, so the assistant text cannot be located; "
                    "use template: mftcoder",
                )
            spans.append((len(prompt), self._turn_end(turn, len(prompt))))
            ends.append(len(turn))
        return Rendered(full, spans, ends)

    def jinja(self) -> str:
        return self.template


Renderer = ChatFormat | TokenizerChatFormat


def chat_format(config: TrainConfig, tokenizer) -> Renderer:
    """The renderer a config asks for; its `jinja()` is the chat template to save."""
    if config.template == "tokenizer":
        return TokenizerChatFormat.of(tokenizer)
    return ChatFormat(config.role_markers, tokenizer.eos_token)


def render_record(chat: Renderer, record: Record) -> Rendered:
    """Raises BadRecord when the tokenizer's template cannot render the record."""
    if record.text is not None:
        text = record.text + chat.eos_token
        return Rendered(text, [(0, len(text))], [])
    return chat.render(record.messages)


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


def tokenize(tokenizer, rendered: Sequence[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and loss masks (int32, uint8), each string tokenized whole, no special tokens added."""
    if not rendered:
        return []
    encoded = tokenizer(
        [r.text for r in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    return [
        (np.asarray(ids, dtype=np.int32), supervised_mask(offsets, r.supervised))
        for r, ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]


def tokenize_conversations(tokenizer, chat: Renderer, conversations: Sequence[Sequence[Message]]):
    """Token ids and loss masks of conversations, as training sees them."""
    return tokenize(tokenizer, [chat.render(messages) for messages in conversations])


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{tokenizer.name_or_path}: a fast (Rust) tokenizer is needed for exact loss masks; "
            "convert it (tokenizer.json) or pick a model that ships one"
        )
    if tokenizer.eos_token is None:
        raise DataError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; set eos_token in its config")
