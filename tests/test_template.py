import numpy as np
import pytest

from mftcoder.config.schema import RoleMarkers
from mftcoder.data.formats import BadRecord
from mftcoder.data.records import Record, read_records
from mftcoder.data.template import (
    ChatFormat,
    TokenizerChatFormat,
    chat_format,
    render_record,
    supervised_mask,
    tokenize,
    tokenize_conversations,
)
from mftcoder.errors import DataError

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "add"},
    {"role": "assistant", "content": "x = 1"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "return x"},
]


@pytest.fixture
def chat(demo_tokenizer):
    return ChatFormat(RoleMarkers(), demo_tokenizer.eos_token)


def test_render_is_mftcoder_layout(chat):
    rendered = chat.render(CONVERSATION)
    assert rendered.text == (
        "<s>system\nBe brief.\n<s>human\nadd\n<s>bot\nx = 1\n</s>\n<s>human\nmore\n<s>bot\nreturn x\n</s>\n"
    )
    supervised = [rendered.text[a:b] for a, b in rendered.supervised]
    assert supervised == ["x = 1\n</s>", "return x\n</s>"]


def test_multi_round_mask_token_by_token(demo_tokenizer, chat):
    """Each assistant turn's content, its newline and its EOS are targets; nothing else is."""
    ((ids, mask),) = tokenize_conversations(demo_tokenizer, chat, [CONVERSATION])
    tokens = demo_tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    expected = [
        # system turn: marker and content, never a target
        ("<s>", 0),
        ("system", 0),
        ("Ċ", 0),
        ("B", 0),
        ("e", 0),
        ("Ġb", 0),
        ("r", 0),
        ("i", 0),
        ("e", 0),
        ("f", 0),
        (".", 0),
        ("Ċ", 0),
        # first user turn and the assistant marker
        ("<s>", 0),
        ("human", 0),
        ("Ċ", 0),
        ("add", 0),
        ("Ċ", 0),
        ("<s>", 0),
        ("bot", 0),
        ("Ċ", 0),
        # first answer: content, appended newline and EOS are targets; the newline after EOS is not
        ("x", 1),
        ("Ġ=", 1),
        ("Ġ1", 1),
        ("Ċ", 1),
        ("</s>", 1),
        ("Ċ", 0),
        # second round, conditioned on the whole history
        ("<s>", 0),
        ("human", 0),
        ("Ċ", 0),
        ("m", 0),
        ("ore", 0),
        ("Ċ", 0),
        ("<s>", 0),
        ("bot", 0),
        ("Ċ", 0),
        ("r", 1),
        ("eturn", 1),
        ("Ġx", 1),
        ("Ċ", 1),
        ("</s>", 1),
        ("Ċ", 0),
    ]
    assert list(zip(tokens, mask.tolist(), strict=True)) == expected
    assert ids.dtype == np.int32 and mask.dtype == np.uint8


def test_eos_stays_a_target_when_pad_is_eos(demo_tokenizer, chat):
    """The mask comes from text spans, so pad := EOS cannot hide the EOS targets."""
    demo_tokenizer.pad_token = demo_tokenizer.eos_token  # what training does for a tokenizer without pad
    ((ids, mask),) = tokenize_conversations(demo_tokenizer, chat, [CONVERSATION])
    eos_positions = np.flatnonzero(ids == demo_tokenizer.eos_token_id)
    assert len(eos_positions) == 2 and mask[eos_positions].tolist() == [1, 1]


@pytest.mark.parametrize(
    "markers",
    [RoleMarkers(), RoleMarkers(system="### System:\n", user="### Question:\n", assistant="### Answer:\n")],
)
def test_saved_chat_template_reproduces_training_ids(demo_tokenizer, markers):
    chat = ChatFormat(markers, demo_tokenizer.eos_token)
    demo_tokenizer.chat_template = chat.jinja()
    ((ids, _),) = tokenize_conversations(demo_tokenizer, chat, [CONVERSATION])
    rendered = demo_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert list(rendered) == ids.tolist()
    prompt = demo_tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == chat.render(CONVERSATION[:4]).text + markers.assistant


def test_straddling_token_belongs_to_the_side_it_starts_on():
    # tokens: [0,3) [3,6) [6,9); supervised span [4, 9): the token starting at 3 is not a target
    assert supervised_mask([(0, 3), (3, 6), (6, 9)], [(4, 9)]).tolist() == [0, 0, 1]
    assert supervised_mask([(0, 3), (3, 6), (6, 9)], [(3, 6)]).tolist() == [0, 1, 0]


# --- template: tokenizer ----------------------------------------------------------------------
# Two chat templates without {% generation %} markers, as models ship them.

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"]),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}


def tokenizer_with(template: str, tokens: list[str]):
    """A fresh demo tokenizer (the session one stays untouched) with the template's special tokens."""
    from conftest import DEMO_MODEL
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = template
    return tokenizer


def test_chatml_mask_token_by_token():
    tokenizer = tokenizer_with(*TEMPLATES["chatml"])
    chat = TokenizerChatFormat.of(tokenizer)
    ((ids, mask),) = tokenize_conversations(tokenizer, chat, [CONVERSATION])
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    expected = [
        ("<|im_start|>", 0),
        ("system", 0),
        ("Ċ", 0),
        ("B", 0),
        ("e", 0),
        ("Ġb", 0),
        ("r", 0),
        ("i", 0),
        ("e", 0),
        ("f", 0),
        (".", 0),
        ("<|im_end|>", 0),
        ("Ċ", 0),
        ("<|im_start|>", 0),
        ("user", 0),
        ("Ċ", 0),
        ("add", 0),
        ("<|im_end|>", 0),
        ("Ċ", 0),
        # the generation prompt is not a target; the content and <|im_end|> are, the newline after it is not
        ("<|im_start|>", 0),
        ("assistant", 0),
        ("Ċ", 0),
        ("x", 1),
        ("Ġ=", 1),
        ("Ġ1", 1),
        ("<|im_end|>", 1),
        ("Ċ", 0),
        ("<|im_start|>", 0),
        ("user", 0),
        ("Ċ", 0),
        ("m", 0),
        ("ore", 0),
        ("<|im_end|>", 0),
        ("Ċ", 0),
        ("<|im_start|>", 0),
        ("assistant", 0),
        ("Ċ", 0),
        ("r", 1),
        ("eturn", 1),
        ("Ġx", 1),
        ("<|im_end|>", 1),
        ("Ċ", 0),
    ]
    assert list(zip(tokens, mask.tolist(), strict=True)) == expected


def test_llama3_mask_covers_content_and_end_of_turn():
    tokenizer = tokenizer_with(*TEMPLATES["llama3"])
    chat = TokenizerChatFormat.of(tokenizer)
    rendered = chat.render(CONVERSATION)
    assert [rendered.text[a:b] for a, b in rendered.supervised] == ["x = 1<|eot_id|>", "return x<|eot_id|>"]
    ((ids, mask),) = tokenize_conversations(tokenizer, chat, [CONVERSATION])
    targets = tokenizer.convert_ids_to_tokens(int(i) for i in ids[mask == 1])
    assert targets == ["x", "Ġ=", "Ġ1", "<|eot_id|>", "r", "eturn", "Ġx", "<|eot_id|>"]
    assert ids[0] == tokenizer.bos_token_id and mask[0] == 0  # the template's BOS, not one added by tokenizing


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tokenizer_template_reproduces_training_ids(name):
    tokenizer = tokenizer_with(*TEMPLATES[name])
    chat = TokenizerChatFormat.of(tokenizer)
    assert chat.jinja() == TEMPLATES[name][0]  # the tokenizer's own template is what gets saved
    messages = CONVERSATION + [{"role": "user", "content": "thanks"}]
    ((ids, _),) = tokenize_conversations(tokenizer, chat, [messages])
    assert list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)) == ids.tolist()
    # each target span starts exactly where the generation prompt for that turn ends
    rendered = chat.render(messages)
    for (start, _), turn in zip(rendered.supervised, (2, 4), strict=True):
        prompt = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        assert rendered.text[:start] == prompt


def test_tokenizer_template_that_rewrites_history_is_refused():
    # Like templates that drop reasoning from earlier turns: the last assistant turn renders differently.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '[A] ' + m['content'][:1] + '\\n' }}"
        "{% else %}{{ '[' + m['role'] + '] ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    chat = TokenizerChatFormat.of(tokenizer_with(template, []))
    assert chat.render(CONVERSATION[1:3]).supervised == [
        (len("[user] add\n[assistant] "), len("[user] add\n[assistant] x = 1\n"))
    ]
    with pytest.raises(BadRecord, match="renders the conversation before assistant turn 1 differently"):
        chat.render(CONVERSATION[1:])


def test_tokenizer_template_errors_are_bad_records_and_a_missing_template_is_named():
    failing = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    chat = TokenizerChatFormat.of(tokenizer_with(failing, []))
    with pytest.raises(BadRecord, match="the tokenizer's chat template failed: no system role"):
        chat.render(CONVERSATION)
    with pytest.raises(DataError, match="template: tokenizer, but the tokenizer has no chat template"):
        TokenizerChatFormat.of(tokenizer_with(None, []))


@pytest.mark.parametrize("mode", ["mftcoder", "tokenizer"])
def test_text_records_are_text_and_eos_all_targets(mode, tiny_config):
    tokenizer = tokenizer_with(*TEMPLATES["chatml"])
    chat = chat_format(tiny_config(template=mode), tokenizer)
    assert isinstance(chat, TokenizerChatFormat if mode == "tokenizer" else ChatFormat)
    rendered = render_record(chat, Record([], "f:1", text="print(1)\n"))
    assert rendered.text == "print(1)\n</s>" and rendered.supervised == [(0, len(rendered.text))]
    ((ids, mask),) = tokenize(tokenizer, [rendered])
    assert tokenizer.convert_ids_to_tokens([int(i) for i in ids])[-1] == "</s>" and mask.all()


def test_tokenizer_template_trains_what_it_saves(tiny_config, tmp_path):
    """The whole data path in tokenizer mode: every sample is the tokenizer's own rendering."""
    import json

    from mftcoder.data.dataset import build_datasets

    path = tmp_path / "chat" / "a.jsonl"
    path.parent.mkdir()
    records = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}, {"prompt": "p", "response": "r"}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_config(data_paths=[str(path.parent)], template="tokenizer", data_split=[0.7, 0.3])
    tokenizer = tokenizer_with(*TEMPLATES["llama3"])
    data = build_datasets(config, tokenizer, chat_format(config, tokenizer))
    expected = {
        tuple(tokenizer.apply_chat_template(r.messages, tokenize=True, return_dict=False)) for r in read_records(path)
    }
    assert {tuple(s.input_ids.tolist()) for s in data.train + data.valid} == expected
