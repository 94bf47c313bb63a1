"""`mftcoder eval`: the pass@k estimator, the sandbox against hostile completions on real HumanEval
problems, HumanEval end to end on a trained demo run, the per-task loss of that run on its validation
and held-out test splits and of its base model, and bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import DEMO_MODEL, reset_accelerate

from mftcoder.cli import main
from mftcoder.errors import EvalError
from mftcoder.evaluate.humaneval import extract_code, load_problems, program, solution
from mftcoder.evaluate.pass_at_k import mean_pass_at_k, parse_ks, pass_at_k
from mftcoder.evaluate.sandbox import Limits, run_program, run_programs

LIMITS = Limits(timeout=3.0, memory_mb=512)


# ---- pass@k --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10), rel=1e-12)
    assert mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


@pytest.mark.unit
def test_k_values():
    assert parse_ks(None, 1) == [1] and parse_ks(None, 20) == [1, 10] and parse_ks("10,1", 10) == [1, 10]
    with pytest.raises(EvalError, match=r"--k 1,10: pass@10 needs at least 10 samples per problem but --n is 1"):
        parse_ks("1,10", 1)
    with pytest.raises(EvalError, match="positive integers"):
        parse_ks("1,x", 5)


# ---- prompts and code extraction ------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    return load_problems("humaneval")


@pytest.mark.unit
def test_the_humaneval_problems_ship_with_the_package(problems):
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert [p.task_id for p in load_problems("humaneval", limit=2)] == ["HumanEval/0", "HumanEval/1"]


@pytest.mark.unit
def test_code_of_a_chat_answer(problems):
    p = problems[0]
    body = p.canonical_solution
    answer = f"Here you go:\n```python\n{p.prompt}{body}```\nDone."
    assert extract_code(answer, p.entry_point) == p.prompt + body
    assert extract_code("```python\nprint(1)\n```\n```python\ndef has_close_elements(x, t):\n", p.entry_point) == (
        "def has_close_elements(x, t):\n"
    )  # the block defining the entry point, unterminated (cut by the token limit)
    assert extract_code("no code", p.entry_point) == "no code"
    # a whole function replaces the prompt's stub; a body continues the prompt
    assert solution(p, answer, "chat").startswith(p.prompt) and solution(p, body, "chat") == p.prompt + body
    assert solution(p, body, "completion") == p.prompt + body


# ---- the sandbox ---------------------------------------------------------------------------------


def _children() -> list:
    return psutil.Process().children(recursive=True)


@pytest.mark.e2e
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    chosen = problems[:4]
    codes = [p.prompt + p.canonical_solution for p in chosen] + [chosen[0].prompt + "    return 42\n"]
    outcomes = run_programs([program(p, c) for p, c in zip(chosen + chosen[:1], codes, strict=True)], LIMITS, 2)
    assert [o.kind for o in outcomes] == ["passed"] * 4 + ["failed_assertion"]
    assert run_program(program(chosen[0], chosen[0].prompt + "    return (\n"), LIMITS).kind == "syntax_error"


@pytest.mark.e2e
def test_hostile_completions_fail_their_own_sample_only(problems, tmp_path):
    """Each hostile body fails with its kind, within its limit; the canonical solution run right after
    it (in the same pool) still passes; nothing outside the sandbox changes; no child is left."""
    p = problems[0]
    outside = tmp_path / "written_by_the_program.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    hostile = {
        "loop": ("    while True:\n        pass\n", "timeout"),
        "sleep": ("    import time\n    time.sleep(60)\n", "timeout"),
        "fork bomb": ("    import os\n    while True:\n        os.fork()\n", "forbidden"),
        "caught fork": (
            "    import os\n    try:\n        os.fork()\n    except BaseException:\n        pass\n",
            "forbidden",
        ),
        "posix.fork": ("    import posix\n    posix.fork()\n", "forbidden"),
        "subprocess": ("    import subprocess\n    subprocess.run(['sleep', '30'])\n", "forbidden"),
        "multiprocessing": (
            "    import multiprocessing\n    multiprocessing.Process(target=print).start()\n",
            "forbidden",
        ),
        "os.system": ("    import os\n    os.system('sleep 30')\n", "forbidden"),
        "write outside": (f"    open({str(outside)!r}, 'w').write('x')\n", "forbidden"),
        "pathlib write": (f"    import pathlib\n    pathlib.Path({str(outside)!r}).write_text('x')\n", "forbidden"),
        "remove outside": (f"    import os\n    os.remove({str(keep)!r})\n", "forbidden"),
        "rmtree outside": (f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n", "forbidden"),
        "huge allocation": ("    x = bytearray(10 ** 11)\n", "memory"),
        "growing list": ("    x = []\n    while True:\n        x.append(' ' * 10 ** 6)\n", "memory"),
        "socket": ("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n", "forbidden"),
        "raw socket": ("    import socket\n    socket.socket().connect(('127.0.0.1', 9))\n", "forbidden"),
        "ctypes": ("    import ctypes\n    ctypes.CDLL(None).fork()\n", "forbidden"),
        "exit early": ("    import sys\n    sys.exit(0)\n", "runtime_error"),
        "os._exit": ("    import os\n    os._exit(0)\n", "forbidden"),
        "kill the parent": ("    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n", "forbidden"),
        "raise the limits": (
            "    import resource\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
            "forbidden",
        ),
        "huge output": ("    while True:\n        print('x' * 10000)\n", "file_size"),
    }
    good = program(p, p.prompt + p.canonical_solution)
    programs = []
    for body, _ in hostile.values():
        programs += [program(p, p.prompt + body), good]
    outcomes = run_programs(programs, LIMITS, workers=2)
    got = {name: outcomes[2 * i].kind for i, name in enumerate(hostile)}
    assert got == {name: kind for name, (_, kind) in hostile.items()}
    assert all(o.kind == "passed" for o in outcomes[1::2])
    for name, outcome in zip(hostile, outcomes[::2], strict=True):
        assert outcome.seconds < LIMITS.timeout + 5, name
    assert not outside.exists() and keep.read_text() == "keep"
    assert _children() == []
    # a writing program may use its own directory
    inside = "    open('scratch.txt', 'w').write('x')\n    import os\n    os.remove('scratch.txt')\n"
    assert run_program(program(p, p.prompt + inside + p.canonical_solution), LIMITS).kind == "passed"


# ---- end to end on the demo model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory) -> Path:
    """A 2-step LoRA run of the demo model with a held-out test split; its OUTPUT_DIR (base_model/,
    final/ and a final validation line)."""
    from mftcoder.run_config import validate_mapping
    from mftcoder.training.trainer import train

    config = validate_mapping(
        {
            "pretrained_model_path": str(DEMO_MODEL),
            "model_init": "from_config",
            "data_paths": small_data,
            "data_split": [0.8, 0.1, 0.1],
            "seq_length": 512,
            "output_dir": str(tmp_path_factory.mktemp("eval_run") / "out"),
            "peft_type": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "per_device_train_batch_size": 4,
            "learning_rate": 2e-2,
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


@pytest.mark.e2e
def test_humaneval_end_to_end_on_the_demo_run(trained, tmp_path, capsys):
    out = tmp_path / "he.json"
    args = ["eval", "humaneval", "--model", str(trained / "final"), "--limit", "2", "--max-new-tokens", "16"]
    assert main([*args, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert [p["task_id"] for p in result["problems"]] == ["HumanEval/0", "HumanEval/1"]
    assert summary["problems"] == 2 and summary["samples"] == 2 and summary["settings"]["prompt_style"] == "chat"
    assert set(summary["pass@k"]) == {"pass@1"} and 0.0 <= summary["pass@k"]["pass@1"] <= 1.0
    sample = result["problems"][0]["samples"][0]
    assert set(sample) >= {"completion", "code", "finish_reason", "passed", "error_kind", "error"}
    assert sum(summary["outcomes"].values()) == 2
    assert "pass@1" in capsys.readouterr().out
    # the raw-prompt style on the same model; default output under the run's eval/
    assert main([*args[:-4], "--limit", "1", "--max-new-tokens", "8", "--prompt-style", "completion"]) == 0
    written = json.loads((trained / "eval" / "humaneval-final.json").read_text())
    assert written["summary"]["settings"]["prompt_style"] == "completion"
    assert "\ndef " in written["summary"]["settings"]["stop"]
    assert main([*args[:-4], "--limit", "1", "--max-new-tokens", "8"]) == 2  # exists: refused
    assert "exists" in capsys.readouterr().err


@pytest.mark.e2e
def test_run_loss_equals_the_final_validation_line(trained, tmp_path, capsys):
    out = tmp_path / "loss.json"
    try:
        assert main(["eval", "--run", str(trained), "--output", str(out)]) == 0
    finally:
        reset_accelerate()
    result = json.loads(out.read_text())
    lines = [json.loads(line) for line in (trained / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if line["split"] == "valid"][-1]
    assert set(result["task_loss"]) == set(logged["task_loss"]) and len(result["task_loss"]) == 3
    for task, loss in logged["task_loss"].items():
        assert result["task_loss"][task] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert result["task_perplexity"][task] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    table = capsys.readouterr().out
    assert all(task in table for task in logged["task_loss"]) and "ppl" in table


@pytest.fixture(scope="module")
def held_out(trained) -> dict:
    """The run's test records, found again from its config and split without the trainer's data or
    evaluation code, and each task's mean target cross-entropy on them (each record run alone) under
    the base model and under base + the final adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mftcoder.data.encoding import split_records
    from mftcoder.data.records import read_task
    from mftcoder.data.tasks import task_name
    from mftcoder.data.template import chat_format, render_record, tokenize
    from mftcoder.data.tokenizer import load_tokenizer
    from mftcoder.run_config import load_config

    config = load_config(trained / "config.yaml")
    tokenizer = load_tokenizer(config)
    chat = chat_format(config, tokenizer)
    records = {}
    for entry in config.data_paths:
        everything = read_task(entry).records
        train, valid, test = split_records(everything, config.data_split, config.seed, task_name(entry))
        sources = [{r.source for r in part} for part in (train, valid, test)]
        assert [len(part) for part in sources] == [32, 4, 4]  # 40 records: the splits are disjoint and cover all
        assert set.union(*sources) == {r.source for r in everything}
        records[task_name(entry)] = test
    samples = {task: tokenize(tokenizer, [render_record(chat, r) for r in test]) for task, test in records.items()}

    @torch.no_grad()
    def losses(model) -> dict[str, float]:
        found = {}
        for task, pairs in samples.items():
            total, count = 0.0, 0
            for ids, mask in pairs:
                ids = torch.as_tensor(ids, dtype=torch.long)
                logits = model(input_ids=ids[None]).logits[0, :-1].float()
                ce = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
                target = torch.as_tensor(mask[1:], dtype=torch.bool)
                total, count = total + float(ce[target].sum()), count + int(target.sum())
            found[task] = total / count
        return found

    model = AutoModelForCausalLM.from_pretrained(trained / "base_model", dtype=torch.float32).eval()
    base = losses(model)
    final = losses(PeftModel.from_pretrained(model, trained / "final").eval())
    return {"units": sum(len(test) for test in records.values()), "base": base, "final": final}


@pytest.mark.e2e
def test_run_loss_on_the_test_split_is_that_of_the_held_out_records(trained, held_out, capsys):
    try:
        assert main(["eval", "--run", str(trained), "--split", "test"]) == 0
    finally:
        reset_accelerate()
    result = json.loads((trained / "eval" / "loss-final-test.json").read_text())  # the default name
    assert result["split"] == "test" and result["checkpoint"] == "final" and result["weights"] == str(trained / "final")
    assert result["test_units"] == held_out["units"] == 12
    assert result["task_loss"] == pytest.approx(held_out["final"], rel=1e-4)
    assert "held-out test loss of" in capsys.readouterr().out
    report = json.loads((trained / "logs" / "data_report.json").read_text())
    assert [rep["test_samples"] for rep in report.values()] == [4, 4, 4]


@pytest.mark.e2e
def test_run_loss_of_the_base_is_that_of_the_untrained_model(trained, held_out, capsys):
    try:
        assert main(["eval", "--run", str(trained), "--checkpoint", "base", "--split", "test"]) == 0
    finally:
        reset_accelerate()
    result = json.loads((trained / "eval" / "loss-base-test.json").read_text())
    assert result["checkpoint"] == "base" and result["weights"] == str(trained / "base_model")
    assert result["task_loss"] == pytest.approx(held_out["base"], rel=1e-4)
    for task, loss in held_out["final"].items():  # two steps at lr 2e-2 moved every task
        assert abs(result["task_loss"][task] - loss) > 1e-3
    assert f"loss of the base model {trained / 'base_model'} (before training)" in capsys.readouterr().out


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_bad_inputs_give_one_line_and_exit_code_2(tmp_path, capsys, trained):
    no_final = tmp_path / "run_without_final"
    no_final.mkdir()
    shutil.copy(trained / "config.yaml", no_final / "config.yaml")
    no_test = tmp_path / "run_without_test_split"
    (no_test / "final").mkdir(parents=True)
    raw = yaml.safe_load((trained / "config.yaml").read_text())
    (no_test / "config.yaml").write_text(yaml.safe_dump({**raw, "data_split": [0.9, 0.1]}))
    cases = [
        (["eval", "humaneval", "--model", str(tmp_path / "missing")], "missing: no such directory"),
        (["eval", "mbpp", "--model", str(trained)], "unknown benchmark 'mbpp'; available: humaneval"),
        (["eval", "humaneval", "--model", str(trained), "--k", "1,10"], "pass@10 needs at least 10 samples"),
        (["eval", "humaneval", "--model", str(trained), "--n", "2"], "--n 2 needs sampling"),
        (["eval", "humaneval", "--model", str(trained), "--prompt-style", "x"], "--prompt-style x: expected one of"),
        (["eval", "humaneval", "--model", str(trained), "--timeout", "0"], "--timeout must be > 0"),
        (["eval", "humaneval"], "needs --model"),
        (["eval"], "give a benchmark"),
        (["eval", "--run", str(tmp_path / "nope")], "no such directory; give a training run's output_dir"),
        (["eval", "--run", str(tmp_path)], "no config.yaml"),
        (["eval", "--run", str(no_final)], "final: no such directory (the run has not finished"),
        (["eval", "--run", str(trained), "--checkpoint", "step-9"], "step-9: no such directory"),
        (
            ["eval", "--run", str(no_test), "--split", "test"],
            f"{no_test}/config.yaml: data_split [0.9, 0.1] holds out no test split",
        ),
        (["eval", "--run", str(no_test), "--split", "test"], "data_split: [train, valid, test]"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
