"""`mftcoder generate`: batch and interactive generation with the adapter of a real (tiny) training run.

One 2-step run per module trains the adapter, which is also merged once; the tests generate from
final/, the output directory and the merged model, and feed the CLI bad models and bad inputs.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import DEMO, DEMO_MODEL, reset_accelerate
from transformers import LlamaConfig, LlamaForCausalLM

from mftcoder.cli import main
from mftcoder.data.records import read_records
from mftcoder.data.template import chat_format, tokenize_conversations
from mftcoder.data.tokenizer import load_tokenizer
from mftcoder.errors import DataError, GenerateError
from mftcoder.generate import Generator, Settings, cut_at_stop, generate_file, load_generator, read_prompts
from mftcoder.merge import merge_adapter
from mftcoder.run_config import load_config

pytestmark = pytest.mark.e2e

TOKENS = 12


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory) -> Path:
    """A 2-step LoRA run of the demo model; its OUTPUT_DIR."""
    from mftcoder.run_config import validate_mapping
    from mftcoder.training.trainer import train

    config = validate_mapping(
        {
            "pretrained_model_path": str(DEMO_MODEL),
            "model_init": "from_config",
            "data_paths": small_data,
            "data_split": [0.9, 0.1],
            "seq_length": 512,
            "output_dir": str(tmp_path_factory.mktemp("generate_run") / "out"),
            "peft_type": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "per_device_train_batch_size": 4,
            "learning_rate": 2e-2,  # high, so that 2 steps move the adapter well away from B = 0
            "num_warmup_steps": 0,
            "max_train_steps": 2,
            "log_interval": 2,
            "evaluation_steps": None,
            "checkpointing_steps": None,
            "early_stopping": False,
            "seed": 7,
        }
    )
    try:
        return train(config).output_dir
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> Path:
    return merge_adapter(trained / "final", tmp_path_factory.mktemp("merged") / "model")


@pytest.fixture(scope="module")
def generator(trained) -> Generator:
    return load_generator(trained / "final")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """Prompts of different lengths in several formats, with and without a reference answer."""
    lines = [
        *(DEMO / "data" / "text_to_code" / "text_to_code.jsonl").read_text().splitlines()[:2],
        json.dumps({"instruction": "Write a function `double(x)`."}),
        json.dumps({"messages": [{"role": "user", "content": "Sort a list."}]}),
        json.dumps({"prompt": "def add(a, b):", "answer": "    return a + b"}),
    ]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def greedy(**changes) -> Settings:
    return Settings(max_new_tokens=TOKENS, **changes)


def test_prompts_in_every_training_format(prompts_file):
    prompts = read_prompts(prompts_file)
    assert [p.reference is not None for p in prompts] == [True, True, False, False, True]
    assert prompts[0].messages[0]["role"] == "system" and prompts[0].reference.startswith("```python")
    assert [m["role"] for m in prompts[1].messages] == ["user", "assistant", "user", "assistant", "user"]
    assert prompts[2].messages == [{"role": "user", "content": "Write a function `double(x)`."}]
    assert prompts[4].messages == [{"role": "user", "content": "def add(a, b):"}]
    assert prompts[4].reference == "    return a + b" and prompts[4].source == f"{prompts_file}:5"
    assert len(read_prompts(prompts_file, limit=2)) == 2


def test_prompt_ids_equal_the_training_render(trained, generator):
    """The saved template puts before the answer exactly the ids training had there."""
    config = load_config(trained / "config.yaml")
    tokenizer = load_tokenizer(config)
    records = read_records(DEMO / "data" / "text_to_code")[:8]
    encoded = tokenize_conversations(tokenizer, chat_format(config, tokenizer), [r.messages for r in records])
    for record, (ids, mask) in zip(records, encoded, strict=True):
        prompt = generator.prompt_ids(record.messages[:-1])
        assert ids[: len(prompt)].tolist() == prompt
        assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1  # the answer starts right after it
        # then the answer, its newline and EOS are the targets; the newline after the EOS is not
        assert mask[len(prompt) : -1].all() and mask[-1] == 0 and ids[-2] == tokenizer.eos_token_id
    assert generator.tokenizer.chat_template == tokenizer.chat_template


def test_greedy_from_adapter_equals_merged_model_token_for_token(trained, merged, generator, prompts_file, tmp_path):
    from_merged = load_generator(merged)
    prompts = [p.messages for p in read_prompts(prompts_file)]
    adapter_out = generator.generate(prompts, greedy())
    merged_out = from_merged.generate(prompts, greedy())
    assert [c.token_ids for (c,) in adapter_out] == [c.token_ids for (c,) in merged_out]
    assert all(len(c.token_ids) > 0 for (c,) in adapter_out)
    # and through the files: OUTPUT_DIR (-> final/) and the merged directory
    common = ["--input", str(prompts_file), "--max-new-tokens", str(TOKENS)]
    assert main(["generate", "--model", str(trained), "--output", str(tmp_path / "a.jsonl"), *common]) == 0
    assert (
        main(["generate", "--model", str(merged), "--output", str(tmp_path / "m.jsonl"), "--batch-size", "2", *common])
        == 0
    )
    lines = read_jsonl(tmp_path / "a.jsonl")
    assert lines == read_jsonl(tmp_path / "m.jsonl")
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4] and {line["n"] for line in lines} == {0}
    assert lines[0]["completion"] == adapter_out[0][0].text and lines[0]["reference"].startswith("```python")
    assert lines[3]["messages"] == [{"role": "user", "content": "Sort a list."}] and lines[3]["reference"] is None
    assert all(line["finish_reason"] in ("eos", "length") for line in lines)


def test_batch_of_one_and_left_padded_batch_of_three_agree(generator, prompts_file):
    prompts = [p.messages for p in read_prompts(prompts_file)]
    lengths = {len(generator.prompt_ids(m)) for m in prompts}
    assert len(lengths) == len(prompts)  # every row of a batch is padded differently
    assert generator.tokenizer.padding_side == "left"
    one = [generator.generate([m], greedy())[0][0].token_ids for m in prompts]
    three = [
        c.token_ids for i in range(0, len(prompts), 3) for (c,) in generator.generate(prompts[i : i + 3], greedy())
    ]
    assert one == three


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(generator, prompts_file, tmp_path):
    def run(seed: int, name: str) -> list[dict]:
        settings = Settings(max_new_tokens=TOKENS, temperature=1.0, top_p=0.95, n=2, seed=seed)
        return read_jsonl(generate_file(generator, prompts_file, tmp_path / name, settings, batch_size=2, limit=2))

    first, again, other = run(1, "a.jsonl"), run(1, "b.jsonl"), run(2, "c.jsonl")
    assert [(line["index"], line["n"]) for line in first] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert first == again
    assert [line["completion"] for line in first] != [line["completion"] for line in other]


def test_stop_strings_cut_the_completion(generator, prompts_file):
    prompts = [p.messages for p in read_prompts(prompts_file)][:3]
    plain = [c for (c,) in generator.generate(prompts, greedy())]
    text = plain[0].text
    assert len(text) > 3
    stop = text[2:4]  # occurs in the first completion, maybe earlier than at 2
    stopped = [c for (c,) in generator.generate(prompts, greedy(stop=("\x00never", stop)))]
    assert stopped[0].text == text[: text.find(stop)] and stopped[0].finish_reason == "stop"
    assert stopped[0].tokens <= plain[0].tokens
    for before, after in zip(plain[1:], stopped[1:], strict=True):
        if stop in before.text:
            assert after.text == before.text[: before.text.find(stop)] and after.finish_reason == "stop"
        else:
            assert after == before  # rows that never meet it are not affected by the others stopping
    assert cut_at_stop("abcXdefY", ["Y", "X"]) == "abc" and cut_at_stop("abc", ["X"]) is None


def test_finish_reasons_eos_and_length(generator):
    tokenizer = generator.tokenizer
    assert generator.turn_suffix == "\n"  # the mftcoder layout: content, newline, EOS
    answer = tokenizer.encode("x = 1\n", add_special_tokens=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    done = generator._completion([*answer, eos, pad, pad], greedy())
    assert (done.text, done.finish_reason, done.tokens) == ("x = 1", "eos", len(answer) + 1)
    cut = generator._completion(answer, greedy())
    assert (cut.text, cut.finish_reason, cut.tokens) == ("x = 1\n", "length", len(answer))


def test_interactive_chat_keeps_history_and_resets(trained, generator, monkeypatch, capsys):
    seen: list[list[dict]] = []
    real = Generator.generate

    def spy(self, prompts, settings):
        seen.extend([list(m) for m in prompts])
        return real(self, prompts, settings)

    monkeypatch.setattr(Generator, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("write f\n\nnow g\n/reset\nhello\n/exit\nnever read\n"))
    assert main(["generate", "--model", str(trained / "final"), "--max-new-tokens", "4", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert "(new conversation)" in out
    assert [[m["role"] for m in messages] for messages in seen] == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user"],
    ]
    assert seen[1][1]["content"] == "write f" and seen[1][3]["content"] == "now g" and seen[2][1]["content"] == "hello"
    # end of input ends the chat too
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\n"))
    assert main(["generate", "--model", str(trained), "--max-new-tokens", "2"]) == 0
    assert len(seen) == 4


def _run_fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _shifted_base(tmp_path: Path) -> Path:
    """A llama with the demo's vocabulary but other widths: the adapter cannot fit it."""
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=96, head_dim=16)
    config.pop("transformers_version", None)
    path = tmp_path / "other_base"
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing_model",
        "no_model_here",
        "base_not_found",
        "adapter_does_not_fit",
        "n_without_sampling",
        "output_exists",
        "batch_size_zero",
    ],
)
def test_bad_models_and_settings_give_a_message_and_no_output(trained, prompts_file, tmp_path, capsys, case):
    out = tmp_path / "out.jsonl"
    model, extra = str(trained / "final"), []
    if case == "missing_model":
        model, expected = str(tmp_path / "nowhere"), "nowhere: no such directory"
    elif case == "no_model_here":
        (tmp_path / "empty").mkdir()
        model, expected = str(tmp_path / "empty"), "holds no model (config.json), no adapter"
    elif case == "base_not_found":
        adapter = shutil.copytree(trained / "final", tmp_path / "moved")
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "gone" / "base_model")
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        model, expected = str(adapter), "the base model of the adapter"
    elif case == "adapter_does_not_fit":
        extra, expected = ["--base", str(_shifted_base(tmp_path))], "does not fit the base"
    elif case == "n_without_sampling":
        extra, expected = ["--n", "2"], "--n 2 needs sampling"
    elif case == "batch_size_zero":
        extra, expected = ["--batch-size", "0"], "--batch-size must be at least 1"
    else:
        out.write_text("kept\n")
        expected = "out.jsonl exists; give a new file or --overwrite"
    argv = ["generate", "--model", model, "--input", str(prompts_file), "--output", str(out), *extra]
    err = _run_fails(argv, capsys)
    assert expected in err, err
    if case == "output_exists":
        assert out.read_text() == "kept\n"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"output": "x = 1"}', ":2: record: no user prompt (keys: output)"),
        ('{"messages": [{"role": "system", "content": "s"}]}', ":2: messages: no user turn, so no prompt"),
        ('{"messages": [{"role": "user", "content": ""}]}', ":2: messages[0].content: empty user turn"),
        ('{"text": "def f(): pass"}', ":2: a plain-text record (text) has no user prompt"),
        ('{"prompt": "a", ', ":2: invalid JSON"),
    ],
)
def test_bad_records_name_file_and_line_and_leave_no_output(generator, tmp_path, capsys, line, expected):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=re.escape("in.jsonl" + expected)):
        generate_file(generator, source, out, greedy())
    assert list(tmp_path.iterdir()) == [source]


def test_bad_record_through_the_cli(trained, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "fine"}\n{"output": "x"}\n')
    err = _run_fails(
        ["generate", "--model", str(trained), "--input", str(source), "--output", str(tmp_path / "o.jsonl")], capsys
    )
    assert f"error: {source}:2: record: no user prompt" in err
    assert "generating with" not in err  # found before the model is loaded
    assert not (tmp_path / "o.jsonl").exists()


def test_a_failure_while_generating_leaves_no_file(generator, prompts_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = Generator.generate

    def fail_second(self, prompts, settings):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, prompts, settings)

    monkeypatch.setattr(Generator, "generate", fail_second)
    with pytest.raises(KeyboardInterrupt):
        generate_file(generator, prompts_file, tmp_path / "out.jsonl", greedy(), batch_size=2)
    assert list(tmp_path.iterdir()) == []


def test_settings_are_checked_before_anything_runs():
    with pytest.raises(GenerateError, match="--top-p must be in"):
        Settings(temperature=1.0, top_p=0).check()
    with pytest.raises(GenerateError, match="a stop string may not be empty"):
        Settings(stop=("",)).check()


def test_full_records_read_as_prompts_exactly_as_training_reads_them():
    from mftcoder.data.formats import parse_record

    for task in ("code_completion", "text_to_code", "unit_test_generation"):
        for line in (DEMO / "data" / task / f"{task}.jsonl").read_text().splitlines()[:20]:
            obj = json.loads(line)
            assert parse_record(obj, answer_required=False) == parse_record(obj)
    both = {"instruction": "Write f.", "response": "def f(): pass"}  # a pair, not Alpaca, with or without answers
    assert parse_record(both, answer_required=False) == parse_record(both)
