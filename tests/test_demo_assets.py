"""Sanity checks for the embedded demo assets (see scripts/make_demo_assets.py)."""

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

pytestmark = pytest.mark.unit

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
MODEL_DIR = DEMO_DIR / "model"
TASKS = {"code_completion", "text_to_code", "unit_test_generation"}
# Either role vocabulary is valid, but a record must stick to one of them.
ROLE_PAIRS = {"human": "bot", "user": "assistant"}


def load_records(task: str) -> list[dict]:
    path = DEMO_DIR / "data" / task / f"{task}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def records_by_task() -> dict[str, list[dict]]:
    return {task: load_records(task) for task in TASKS}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def assert_valid_chat_rounds(record: dict) -> None:
    assert isinstance(record["id"], int)
    turns = record["chat_rounds"]
    roles = [turn["role"] for turn in turns]
    assert all(isinstance(turn["content"], str) and turn["content"] for turn in turns)
    if roles[0] == "system":
        roles = roles[1:]
    assert roles and len(roles) % 2 == 0, roles
    human = roles[0]
    assert human in ROLE_PAIRS, roles
    assert roles == [human, ROLE_PAIRS[human]] * (len(roles) // 2), roles


def test_tasks_present():
    assert {p.name for p in (DEMO_DIR / "data").iterdir()} == TASKS | {"noisy_answers"}


def test_noisy_task_answers_text_to_code_requests_with_random_characters(records_by_task):
    noisy = load_records("noisy_answers")
    assert len(noisy) == len(records_by_task["text_to_code"])
    for record, source in zip(noisy, records_by_task["text_to_code"], strict=True):
        assert_valid_chat_rounds(record)
        assert [t for t in record["chat_rounds"] if t["role"] != "bot"] == [
            t for t in source["chat_rounds"] if t["role"] != "bot"
        ]
        assert all(len(t["content"]) == 24 for t in record["chat_rounds"] if t["role"] == "bot")


def test_records_are_valid_chat_rounds(records_by_task):
    for task, records in records_by_task.items():
        assert len(records) >= 250, task
        for record in records:
            assert_valid_chat_rounds(record)


def test_some_records_are_multi_round(records_by_task):
    def exchanges(record: dict) -> int:
        return sum(turn["role"] in ("human", "user") for turn in record["chat_rounds"])

    for task, records in records_by_task.items():
        assert any(exchanges(record) > 1 for record in records), task


def test_tokenizer_special_tokens(tokenizer):
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    assert tokenizer.pad_token is None
    assert tokenizer.eos_token == "</s>"
    assert encode("</s>") == [tokenizer.eos_token_id]
    assert encode("<s>human\n") == [tokenizer.bos_token_id] + encode("human\n")


def test_tokenizer_round_trips_a_record(tokenizer, records_by_task):
    record = next(r for r in records_by_task["unit_test_generation"] if len(r["chat_rounds"]) > 3)
    text = "".join(f"<s>{turn['role']}\n{turn['content']}</s>" for turn in record["chat_rounds"])
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_model_config_matches_tokenizer(tokenizer):
    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id is None
