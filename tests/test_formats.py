"""Record formats, task sources and bad input: every problem names file:line and the field."""

import gzip
import json

import pytest

from mftcoder.config.schema import DataSource
from mftcoder.data.formats import BadRecord, parse_record
from mftcoder.data.records import BadRecords, read_records, read_task
from mftcoder.data.tasks import task_files, task_name
from mftcoder.errors import DataError

pytestmark = pytest.mark.unit

USER, ANSWER = {"role": "user", "content": "Write f."}, {"role": "assistant", "content": "def f(): pass"}
CANONICAL = [USER, ANSWER]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *CANONICAL]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


GOOD = {"chat_rounds": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}]}


# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt", "messages"),
    [
        (
            {"chat_rounds": [{"role": "human", "content": "Write f."}, {"role": "bot", "content": "def f(): pass"}]},
            "chat_rounds",
            CANONICAL,
        ),
        ({"messages": [{"role": "developer", "content": "Be brief."}, USER, ANSWER]}, "messages", WITH_SYSTEM),
        ({"messages": CANONICAL, "system": "Be brief."}, "messages", WITH_SYSTEM),
        (
            {
                "conversations": [{"from": "human", "value": "Write f."}, {"from": "gpt", "value": "def f(): pass"}],
                "system": "Be brief.",
            },
            "sharegpt",
            WITH_SYSTEM,
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Write f."},
                    {"from": "gpt", "value": "def f(): pass"},
                ]
            },
            "sharegpt",
            WITH_SYSTEM,
        ),
        ({"instruction": "Write f.", "output": "def f(): pass"}, "alpaca", CANONICAL),
        (
            {"instruction": "Write f.", "input": "", "output": "def f(): pass", "system": "Be brief."},
            "alpaca",
            WITH_SYSTEM,
        ),
        (
            {"instruction": "Write f.", "input": "x = 1", "output": "def f(): pass"},
            "alpaca",
            [{"role": "user", "content": "Write f.\nx = 1"}, ANSWER],
        ),
        ({"prompt": "Write f.", "answer": "def f(): pass"}, "prompt_answer", CANONICAL),
        ({"prompt": "Write f.", "response": "def f(): pass", "system": "Be brief."}, "prompt_answer", WITH_SYSTEM),
        ({"input": "Write f.", "output": "def f(): pass"}, "prompt_answer", CANONICAL),
        ({"instruction": "Write f.", "response": "def f(): pass"}, "prompt_answer", CANONICAL),
        ({"question": "Write f.", "response": "def f(): pass"}, "prompt_answer", CANONICAL),
        ({"question": "Write f.", "answer": "def f(): pass"}, "prompt_answer", CANONICAL),
        ({"query": "Write f.", "answer": "def f(): pass", "id": 7}, "prompt_answer", CANONICAL),
    ],
)
def test_every_format_is_detected_and_canonicalised(record, fmt, messages):
    parsed = parse_record(record)
    assert parsed.format == fmt and parsed.messages == messages and parsed.text is None
    assert parse_record(record, fmt) == parsed  # forcing the detected format changes nothing


def test_text_records_are_plain_text():
    parsed = parse_record({"text": "def f():\n    pass\n", "meta": 1})
    assert (parsed.format, parsed.messages, parsed.text) == ("text", [], "def f():\n    pass\n")


def test_detection_order_prefers_conversations_over_text():
    both = {"messages": CANONICAL, "text": "rendered elsewhere"}
    assert parse_record(both).format == "messages"
    assert parse_record(both, "text").text == "rendered elsewhere"


def test_forced_pairs_follow_mftcoder_order():
    """MFTCoder reads {instruction, input, output} as the pair input+output; `alpaca` (auto) keeps both."""
    record = {"instruction": "Write f.", "input": "x = 1", "output": "def f(): pass"}
    assert parse_record(record, "prompt_answer").messages[0]["content"] == "x = 1"
    assert parse_record(record).messages[0]["content"] == "Write f.\nx = 1"


def test_multi_round_and_trailing_user_turn():
    rounds = [USER, ANSWER, {"role": "user", "content": "again"}, ANSWER, {"role": "user", "content": "unanswered"}]
    assert [m["role"] for m in parse_record({"messages": rounds}).messages] == ["user", "assistant"] * 2 + ["user"]


@pytest.mark.parametrize(
    ("record", "fmt", "field", "problem"),
    [
        ({"chosen": [], "rejected": []}, "auto", "record", "this is preference data"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "messages", "record", "this is preference data"),
        ({"messages": []}, "auto", "messages", "non-empty list"),
        ({"foo": 1, "bar": 2}, "auto", "record", "no known format (keys: bar, foo)"),
        ({"prompt": "only a prompt"}, "auto", "record", "no known format"),
        ({"text": "t"}, "messages", "record", "format messages needs messages (the record has keys: text)"),
        ({"messages": CANONICAL}, "prompt_answer", "record", "prompt+answer or prompt+response"),
        ({"chat_rounds": "hi"}, "auto", "chat_rounds", "non-empty list of {role, content} objects, got str"),
        ({"chat_rounds": [{"role": "robot", "content": "x"}]}, "auto", "chat_rounds[0].role", "unknown role 'robot'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "auto", "messages[0].role", "unknown role 'tool'"),
        ({"messages": [{"role": ["user"], "content": "x"}]}, "auto", "messages[0].role", "unknown role ['user']"),
        ({"messages": [{"content": "x"}]}, "auto", "messages[0].role", "missing"),
        ({"messages": ["hi"]}, "auto", "messages[0]", "must be an object with role and content, got str"),
        (
            {"chat_rounds": [{"role": "human", "content": None}]},
            "auto",
            "chat_rounds[0].content",
            "must be a string, got null",
        ),
        (
            {"chat_rounds": [{"role": "human", "content": 3}]},
            "auto",
            "chat_rounds[0].content",
            "must be a string, got int",
        ),
        ({"messages": [{"role": "user"}]}, "auto", "messages[0].content", "missing"),
        (
            {"conversations": [{"from": "gpt", "value": "x"}]},
            "auto",
            "conversations[0].from",
            "expected the user turn here, got assistant",
        ),
        ({"messages": [USER, USER]}, "auto", "messages[1].role", "expected the assistant turn"),
        ({"messages": [USER]}, "auto", "messages", "no assistant turn"),
        (
            {"messages": [USER, {"role": "assistant", "content": ""}]},
            "auto",
            "messages[1].content",
            "empty assistant turn",
        ),
        (
            {"messages": [USER, {"role": "system", "content": "late"}]},
            "auto",
            "messages[1].role",
            "may only come first",
        ),
        (
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}], "system": "t"},
            "auto",
            "conversations[0].from",
            "also has a top-level system",
        ),
        ({"prompt": "", "response": "r"}, "auto", "prompt", "empty"),
        ({"prompt": "p", "response": ["r"]}, "auto", "response", "must be a string, got list"),
        ({"prompt": "p", "response": "r", "system": 5}, "auto", "system", "must be a string, got int"),
        ({"instruction": "i", "input": 3, "output": "o"}, "auto", "input", "must be a string, got int"),
        ({"text": ""}, "auto", "text", "empty"),
        ({"text": None}, "auto", "text", "must be a string, got null"),
        ([1, 2], "auto", "record", "expected a JSON object, got list"),
    ],
)
def test_bad_records_name_the_field(record, fmt, field, problem):
    with pytest.raises(BadRecord) as excinfo:
        parse_record(record, fmt)
    assert excinfo.value.field == field
    assert problem in excinfo.value.problem


# --- sources ---------------------------------------------------------------------------------


def test_task_names_and_files(tmp_path):
    task = tmp_path / "text_to_code"
    (task / "sub").mkdir(parents=True)
    (task / ".cache").mkdir()
    jsonl(task / "b.jsonl", [GOOD])
    jsonl(task / "sub" / "a.json", [GOOD])
    with gzip.open(task / "sub" / "c.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(GOOD) + "\n")
    jsonl(task / ".cache" / "hidden.jsonl", [GOOD])
    (task / "notes.txt").write_text("ignored")
    assert task_name(task) == "text_to_code"
    assert task_name(task / "b.jsonl") == "b"
    assert task_name(task / "sub" / "c.jsonl.gz") == "c"
    assert task_name(DataSource(path=str(task), name="t2c")) == "t2c"
    assert [p.relative_to(task).as_posix() for p in task_files(task)] == ["b.jsonl", "sub/a.json", "sub/c.jsonl.gz"]
    assert len(read_records(task)) == 3


def test_json_file_holds_an_array_with_lines_named(tmp_path):
    path = tmp_path / "task.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"prompt": "p",\n   "answer": "r"}\n]\n', encoding="utf-8")
    records = read_records(path)
    assert [r.source for r in records] == [f"{path}:2", f"{path}:4"]
    assert [r.format for r in records] == ["text", "prompt_answer"]
    path.write_text('[\n  {"text": "a"},\n  {"text": 3}\n]')
    with pytest.raises(DataError, match=r"task.json:3: text: must be a string, got int"):
        read_records(path)
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]')
    with pytest.raises(
        DataError, match=r"task.json:4: invalid JSON \(Expecting ',' delimiter.*the rest of the array was not read"
    ):
        read_records(path)


def test_json_file_may_be_jsonl(tmp_path):
    path = jsonl(tmp_path / "task.json", [GOOD, {"text": "t"}])
    assert [r.format for r in read_records(path)] == ["chat_rounds", "text"]
    path.write_text('{\n  "text": "pretty-printed"\n}\n')
    with pytest.raises(
        DataError, match=r"task.json:1: invalid JSON .*one JSON array of records, or one record per line"
    ):
        read_records(path)


def test_gzip_is_read_transparently(tmp_path):
    path = tmp_path / "task.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(GOOD) + "\n" + '{"text": 1}\n')
    with pytest.raises(DataError, match=r"task.jsonl.gz:2: text: must be a string, got int"):
        read_records(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"task.jsonl.gz: cannot read the file"):
        read_records(path)


def test_saved_dataset_is_a_source(tmp_path):
    import datasets

    rows = [{"messages": CANONICAL, "text": None}, {"messages": None, "text": "plain"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    records = read_records(tmp_path / "saved")
    assert [(r.format, r.source) for r in records] == [
        ("messages", f"{tmp_path / 'saved'}[0]"),
        ("text", f"{tmp_path / 'saved'}[1]"),
    ]
    assert task_name(tmp_path / "saved") == "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"a saved DatasetDict \(splits: train\); point the entry at one split"):
        task_files(tmp_path / "dict")


def test_forced_format_applies_to_every_record(tmp_path):
    path = jsonl(tmp_path / "task.jsonl", [{"text": "a", "messages": CANONICAL}])
    assert read_records(DataSource(path=str(path), format="text"))[0].text == "a"
    assert read_records(path)[0].format == "messages"
    with pytest.raises(DataError, match=r"task.jsonl:1: record: format alpaca needs instruction and output"):
        read_records(DataSource(path=str(path), format="alpaca"))


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"chat_rounds": [}', r"task.jsonl:3: invalid JSON \(Expecting value at column 18\)"),
        ("[1, 2]", r"task.jsonl:3: record: expected a JSON object, got list"),
        ('"just a string"', r"task.jsonl:3: record: expected a JSON object, got str"),
        (
            '{"chat_rounds": [{"role": "bot", "content": "x"}]}',
            r"task.jsonl:3: chat_rounds\[0\].role: expected the user turn",
        ),
        ('{"chosen": "a", "rejected": "b"}', r"task.jsonl:3: record: this is preference data"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "task.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_bad_bytes_and_byte_order_mark(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid UTF-8"):
        read_records(bad)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert len(read_records(bom)) == 1


def test_empty_and_missing_sources_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: holds no \*.jsonl"):
        read_records(tmp_path / "empty")
    with pytest.raises(DataError, match=r"blank.jsonl: empty \(no records\)"):
        read_records(write_lines(tmp_path / "blank.jsonl", ["", "  "]))
    with pytest.raises(DataError, match=r"nope: no such file or directory"):
        read_records(tmp_path / "nope")


def test_skip_counts_bad_records_and_keeps_the_first_examples(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    write_lines(
        task / "a.jsonl",
        [json.dumps(GOOD), "{oops", json.dumps({"text": 5}), json.dumps({"x": 1}), json.dumps(GOOD), "[]"],
    )
    (task / "b.jsonl").write_text("")
    bad = BadRecords("skip")
    loaded = read_task(task, bad)
    assert len(loaded.records) == 2 and loaded.read == 7 and bad.count == 5
    assert loaded.formats == {"chat_rounds": 2}
    assert bad.examples == [
        f"{task / 'a.jsonl'}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{task / 'a.jsonl'}:3: text: must be a string, got int",
        (
            f"{task / 'a.jsonl'}:4: record: no known format (keys: x); expected chat_rounds, messages, conversations "
            "(ShareGPT), instruction/output (Alpaca), a prompt/answer pair such as prompt+response, or text"
        ),
    ]


def test_a_task_without_usable_records_is_an_error_even_when_skipping(tmp_path):
    path = write_lines(tmp_path / "task.jsonl", ["{oops", json.dumps({"text": ""})])
    with pytest.raises(DataError, match=r"task.jsonl: no usable records \(2 bad; first: .*task.jsonl:1: invalid JSON"):
        read_task(path, BadRecords("skip"))
