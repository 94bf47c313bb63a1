"""The console entry: exit codes, one readable message naming the field or file:line."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import DEMO_MODEL, REPO

from mftcoder.cli import main
from mftcoder.config.schema import TrainConfig

pytestmark = pytest.mark.unit


def write_config(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def config_path(tmp_path, small_data):
    return write_config(
        tmp_path / "run.yaml",
        pretrained_model_path=str(DEMO_MODEL),
        model_init="from_config",
        data_paths=small_data,
        output_dir=str(tmp_path / "out"),
        max_train_steps=1,
        evaluation_steps=None,
        early_stopping=False,
    )


def test_python_dash_m_validate_prints_the_resolved_config(config_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mftcoder", "validate", str(config_path), "learning_rate=1e-4"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["learning_rate"] == 1e-4 and resolved["weighted_loss_mode"] == "case3"


def test_validate_reports_every_problem_with_its_location(config_path, capsys):
    assert main(["validate", str(config_path), "lora_rank=0", "seq_lenght=512"]) == 2
    err = capsys.readouterr().err
    assert "override lora_rank=0: lora_rank: Input should be greater than 0" in err
    assert "seq_lenght: unknown key; did you mean 'seq_length'?" in err
    assert err.startswith("error: invalid config") and "Traceback" not in err


def test_train_names_the_bad_record_and_writes_nothing(config_path, tmp_path, small_data, capsys):
    bad = tmp_path / "broken_task"
    bad.mkdir()
    lines = [json.dumps({"chat_rounds": [{"role": "human", "content": "a"}, {"role": "bot", "content": "b"}]})] * 3
    lines.append(json.dumps({"chat_rounds": [{"role": "human", "content": "a"}, {"role": "bot", "content": 42}]}))
    (bad / "part.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["train", str(config_path), f"data_paths=[{small_data[0]}, {bad}]"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"broken_task/part.jsonl:4: chat_rounds\[1\].content: must be a string, got int", err)
    assert not (tmp_path / "out").exists()


def test_mftcoder_config_flag_forces_translation(config_path, capsys):
    assert main(["validate", "--mftcoder-config", str(config_path), "peft_type=lora"]) == 0
    out = capsys.readouterr().out
    assert "is an MFTCoder train config; translated" in out


def test_merge_refusal_is_one_message(tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m")]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_the_config_reference_documents_every_config_key():
    reference = (REPO / "docs" / "config.md").read_text()
    missing = [name for name in TrainConfig.model_fields if f"| `{name}` |" not in reference]
    assert not missing, f"docs/config.md lacks: {missing}; run `python scripts/config_reference.py`"


@pytest.mark.parametrize(("rank", "waits", "prefix"), [("0", [], "error: "), ("1", [30.0], "error (process 1): ")])
def test_the_main_process_reports_at_once_the_others_after_a_grace_period(
    rank, waits, prefix, tmp_path, monkeypatch, capsys
):
    """The launcher stops the other processes when one exits: rank 0 speaks first, and another
    rank speaks only if it is still alive after the grace period (rank 0 was slower or gone)."""
    import mftcoder.cli as cli

    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", rank)
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m")]) == 2
    assert slept == waits
    err = capsys.readouterr().err
    assert err.startswith(prefix) and "not a LoRA adapter" in err
