import numpy as np
import pytest

from mftcoder.config.schema import RoleMarkers
from mftcoder.data.template import ChatFormat, supervised_mask, tokenize_conversations

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
        "<s>system\nBe brief.\n"
        "<s>human\nadd\n"
        "<s>bot\nx = 1\n</s>\n"
        "<s>human\nmore\n"
        "<s>bot\nreturn x\n</s>\n"
    )
    supervised = [rendered.text[a:b] for a, b in rendered.supervised]
    assert supervised == ["x = 1\n</s>", "return x\n</s>"]


def test_multi_round_mask_token_by_token(demo_tokenizer, chat):
    """Each assistant turn's content, its newline and its EOS are targets; nothing else is."""
    (ids, mask), = tokenize_conversations(demo_tokenizer, chat, [CONVERSATION])
    tokens = demo_tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    expected = [
        # system turn: marker and content, never a target
        ("<s>", 0), ("system", 0), ("Ċ", 0), ("B", 0), ("e", 0), ("Ġb", 0), ("r", 0), ("i", 0), ("e", 0),
        ("f", 0), (".", 0), ("Ċ", 0),
        # first user turn and the assistant marker
        ("<s>", 0), ("human", 0), ("Ċ", 0), ("add", 0), ("Ċ", 0), ("<s>", 0), ("bot", 0), ("Ċ", 0),
        # first answer: content, appended newline and EOS are targets; the newline after EOS is not
        ("x", 1), ("Ġ=", 1), ("Ġ1", 1), ("Ċ", 1), ("</s>", 1), ("Ċ", 0),
        # second round, conditioned on the whole history
        ("<s>", 0), ("human", 0), ("Ċ", 0), ("m", 0), ("ore", 0), ("Ċ", 0), ("<s>", 0), ("bot", 0), ("Ċ", 0),
        ("r", 1), ("eturn", 1), ("Ġx", 1), ("Ċ", 1), ("</s>", 1), ("Ċ", 0),
    ]
    assert list(zip(tokens, mask.tolist(), strict=True)) == expected
    assert ids.dtype == np.int32 and mask.dtype == np.uint8


def test_eos_stays_a_target_when_pad_is_eos(demo_tokenizer, chat):
    """The mask comes from text spans, so pad := EOS cannot hide the EOS targets."""
    demo_tokenizer.pad_token = demo_tokenizer.eos_token  # what training does for a tokenizer without pad
    (ids, mask), = tokenize_conversations(demo_tokenizer, chat, [CONVERSATION])
    eos_positions = np.flatnonzero(ids == demo_tokenizer.eos_token_id)
    assert len(eos_positions) == 2 and mask[eos_positions].tolist() == [1, 1]


@pytest.mark.parametrize(
    "markers",
    [RoleMarkers(), RoleMarkers(system="### System:\n", user="### Question:\n", assistant="### Answer:\n")],
)
def test_saved_chat_template_reproduces_training_ids(demo_tokenizer, markers):
    chat = ChatFormat(markers, demo_tokenizer.eos_token)
    demo_tokenizer.chat_template = chat.jinja()
    (ids, _), = tokenize_conversations(demo_tokenizer, chat, [CONVERSATION])
    rendered = demo_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert list(rendered) == ids.tolist()
    prompt = demo_tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == chat.render(CONVERSATION[:4]).text + markers.assistant


def test_straddling_token_belongs_to_the_side_it_starts_on():
    # tokens: [0,3) [3,6) [6,9); supervised span [4, 9): the token starting at 3 is not a target
    assert supervised_mask([(0, 3), (3, 6), (6, 9)], [(4, 9)]).tolist() == [0, 0, 1]
    assert supervised_mask([(0, 3), (3, 6), (6, 9)], [(3, 6)]).tolist() == [0, 1, 0]
