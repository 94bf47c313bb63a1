"""MFTCoder (v0.5) train configs: detection, the field table, and the shipped sample configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mftcoder.config import TrainConfig
from mftcoder.config.mftcoder_compat import (
    MFTCODER_FIELDS,
    XXPO_FIELDS,
    Copy,
    Ignore,
    Rename,
    looks_like_mftcoder,
    translate_mftcoder,
)
from mftcoder.errors import ConfigError
from mftcoder.run_config import load_config

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).parent / "data" / "mftcoder_configs"

# Transcribed from the spec's §2 table (`MftTrainArgs`, 60 fields), in its order.
SPEC_FIELDS = [
    "data_paths", "output_dir", "tb_dir", "pretrained_model_path", "model_type", "load_raw_dataset",
    "task_weights", "data_weights", "low_cpu_mem_usage", "data_split", "padding_mode", "tokenize_mode",
    "weighted_loss_mode", "peft_type", "quantization", "lora_rank", "lora_alpha", "lora_dropout",
    "target_modules", "per_device_train_batch_size", "per_device_eval_batch_size", "tokenizer_type",
    "learning_rate", "min_lr", "weight_decay", "gradient_accumulation_steps", "lr_scheduler_type",
    "num_warmup_steps", "num_train_epochs", "seed", "seq_length", "resume_from_checkpoint", "auto_resume",
    "log_interval", "checkpointing_steps", "evaluation_steps", "max_train_steps", "epoch_checkpointing",
    "shuffle_before_split", "use_random_sampler", "early_stopping", "early_stopping_stall_num",
    "saving_limit", "use_dynamic_padding", "coba_warmup_steps", "coba_history_length", "coba_tau",
    "coba_update_interval", "coba_sample_valid_num", "attn_implementation", "role_markers",
    "distributed_type", "init_timeout_seconds", "use_xformers", "trust_remote_code",
    "weight_by_num_documents", "make_vocab_size_divisible_by", "model_parallel_size", "use_slow_tokenizer",
    "world_size",
]  # fmt: skip
# Spec §4.4: the self-paced mode of v0.3/v0.4.
SELF_PACED_FIELDS = [
    "selfpaced_interval",
    "selfpaced_history_length",
    "selfpaced_sample_valid_num",
    "selfpaced_scale_factor",
]

CHAT_LINE = {"chat_rounds": [{"role": "human", "content": "Add 1 and 2."}, {"role": "bot", "content": "3"}]}

# What each sample translates to beyond the fields all four share (see `expected_translation`).
SAMPLE_SPECIFICS: dict[str, dict[str, Any]] = {
    "full": {"peft_type": None, "saving_limit": 3},
    "lora": {"peft_type": "lora", "lora_rank": 96, "lora_alpha": 32, "lora_dropout": 0.05},
    "qlora": {"peft_type": "qlora", "lora_rank": 96, "lora_alpha": 32, "lora_dropout": 0.05},
    "coba": {
        "peft_type": "qlora",
        "lora_rank": 96,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "data_split": [0.95, 0.05],
        "weighted_loss_mode": "coba",
        "coba_warmup_steps": 100,
        "coba_history_length": 200,
        "coba_tau": 5,
        "coba_update_interval": 1,
        "coba_sample_valid_num": 1,
    },
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    """Two task directories with one valid chat line each, a model directory, an output path."""
    tasks = [tmp_path / "data" / "code_completion", tmp_path / "data" / "text_to_code"]
    for task in tasks:
        task.mkdir(parents=True)
        (task / "train.jsonl").write_text(json.dumps(CHAT_LINE) + "\n", encoding="utf-8")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    return {"task_a": tasks[0], "task_b": tasks[1], "model": model, "output": tmp_path / "out", "tmp": tmp_path}


def instantiate_sample(name: str, ws: dict[str, Path]) -> Path:
    """The sample with its `$...` placeholders replaced by real paths; the trailing '/' is deliberate."""
    placeholders = {
        "$DATA_PATHS": f"[{ws['task_a']}/, {ws['task_b']}]",
        "$OUTPUT_DIR": str(ws["output"]),
        "$TensorBoard_DIR": str(ws["tmp"] / "tb"),
        "$MODEL_NAME_OR_PATH": str(ws["model"]),
        "$MODEL_TYPE": "llama",
    }
    text = (SAMPLES / f"{name}_train_config.json").read_text(encoding="utf-8")
    for placeholder, value in placeholders.items():
        text = text.replace(placeholder, json.dumps(value)[1:-1])
    assert "$" not in text, "a placeholder was not substituted"
    path = ws["tmp"] / f"{name}.json"
    path.write_text(text, encoding="utf-8")
    return path


def expected_translation(name: str, ws: dict[str, Path]) -> dict[str, Any]:
    shared = {
        "data_paths": [str(ws["task_a"]), str(ws["task_b"])],
        "output_dir": str(ws["output"]),
        "pretrained_model_path": str(ws["model"]),
        "data_split": [0.98, 0.02],
        "padding_mode": "padding",
        "weighted_loss_mode": "case3",
        "attn_implementation": "auto",
        "seq_length": 4096,
        "seed": 1234,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 5e-5,
        "min_lr": 5e-6,
        "weight_decay": 0.1,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "cosine",
        "num_warmup_steps": 300,
        "num_train_epochs": 4,
        "log_interval": 10,
        "checkpointing_steps": 100,
        "evaluation_steps": 100,
        "max_train_steps": None,
        "epoch_checkpointing": True,
        "early_stopping": True,
        "early_stopping_stall_num": 5,
        "saving_limit": None,
    }
    return shared | SAMPLE_SPECIFICS[name]


def minimal(**fields: Any) -> dict[str, Any]:
    return {"data_paths": "[a]", "output_dir": "out", "pretrained_model_path": "m", "peft_type": "lora"} | fields


def note_for(notes: list[str], field: str) -> str:
    # load_config's notice prefixes each note with "  - "; translate_mftcoder's notes are bare.
    matches = [note for note in notes if note.lstrip(" -").startswith(f"{field}:")]
    assert len(matches) == 1, f"expected one note for {field}, got {matches}"
    return matches[0]


# --- the field table ------------------------------------------------------------------------


def test_spec_field_list_is_complete() -> None:
    assert len(SPEC_FIELDS) == len(set(SPEC_FIELDS)) == 60


def test_table_covers_exactly_the_spec_fields() -> None:
    assert list(MFTCODER_FIELDS) == SPEC_FIELDS + SELF_PACED_FIELDS


@pytest.mark.parametrize("field", SPEC_FIELDS + SELF_PACED_FIELDS)
def test_every_field_is_mapped_or_ignored_with_a_reason(field: str) -> None:
    rule = MFTCODER_FIELDS[field]
    if isinstance(rule, Copy):
        assert field in TrainConfig.model_fields, f"{field} is copied to a key our schema lacks"
    else:
        assert isinstance(rule, Ignore) and len(rule.reason) > 15


@pytest.mark.parametrize("field", SELF_PACED_FIELDS + [f for f in SPEC_FIELDS if f.startswith("coba_")])
def test_balancing_hyper_parameters_are_copied(field: str) -> None:
    rule = MFTCODER_FIELDS[field]
    assert isinstance(rule, Copy)
    # MFTCoder's defaults are ours: a config that omits them trains the same without a note.
    assert rule.default == TrainConfig.model_fields[field].default
    translated, notes = translate_mftcoder(minimal(**{field: 7}))
    assert translated[field] == 7


# --- the shipped sample configs -------------------------------------------------------------


@pytest.mark.parametrize("name", ["full", "lora", "qlora", "coba"])
def test_sample_config_translates(name: str, workspace: dict[str, Path]) -> None:
    path = instantiate_sample(name, workspace)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert looks_like_mftcoder(raw)

    translated, _ = translate_mftcoder(raw)
    assert translated == expected_translation(name, workspace)


@pytest.mark.parametrize("name", ["full", "lora", "qlora", "coba"])
def test_sample_config_loads(name: str, workspace: dict[str, Path]) -> None:
    path = instantiate_sample(name, workspace)
    notes: list[str] = []
    config = load_config(path, mftcoder=None, notice=notes.append)
    assert config.data_paths == [str(workspace["task_a"]), str(workspace["task_b"])]
    assert config.data_split == ([0.95, 0.05] if name == "coba" else [0.98, 0.02])
    assert config.attn_implementation == "auto"
    assert config.peft_type == SAMPLE_SPECIFICS[name]["peft_type"]

    assert "is an MFTCoder train config" in notes[0]
    assert "only the first number" in note_for(notes, "data_split")
    assert "resume_from_checkpoint" in note_for(notes, "auto_resume")
    attention = note_for(notes, "attn_implementation")
    assert '"flash_attention_2" -> "auto"' in attention and "sdpa" in attention
    assert "<output_dir>/logs" in note_for(notes, "tb_dir")


def test_coba_sample_keeps_its_coba_fields(workspace: dict[str, Path]) -> None:
    translated, notes = translate_mftcoder(json.loads(instantiate_sample("coba", workspace).read_text()))
    assert {f: translated[f] for f in SPEC_FIELDS if f.startswith("coba_")} == {
        f: SAMPLE_SPECIFICS["coba"][f] for f in SPEC_FIELDS if f.startswith("coba_")
    }
    # Only the batch count says something: MFTCoder counts it per process.
    assert "on all processes together" in note_for(notes, "coba_sample_valid_num")
    assert not any(note.startswith(("coba_warmup_steps", "coba_tau")) for note in notes)


def test_dpo_sample_translates_and_loads(workspace: dict[str, Path]) -> None:
    path = instantiate_sample("dpo", workspace)
    translated, _ = translate_mftcoder(json.loads(path.read_text(encoding="utf-8")))
    assert {key: translated[key] for key in DPO_SAMPLE} == DPO_SAMPLE
    notes: list[str] = []
    config = load_config(path, mftcoder=None, notice=notes.append)
    assert {key: getattr(config, key) for key in DPO_SAMPLE} == DPO_SAMPLE
    assert '-> training_stage: "dpo"' in note_for(notes, "xxpo")
    assert "overlength" in note_for(notes, "max_prompt_length")
    assert "-> seq_length: 4096" in note_for(notes, "max_length")
    assert "MFTCoder's default true applied" in note_for(notes, "gradient_checkpointing")


# What MFTCoder's dpo_train_config.json becomes (it spells some fields as HF TrainingArguments does).
DPO_SAMPLE = {
    "training_stage": "dpo",
    "beta": 0.1,
    "rpo_alpha": 0.5,
    "weighted_loss_mode": "case2",
    "data_split": [0.99, 0.01],
    "peft_type": "lora",
    "lora_rank": 64,
    "lora_alpha": 128,
    "lora_dropout": 0.0,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": 5e-7,
    "num_warmup_steps": 100,
    "num_train_epochs": 2,
    "seed": 1105,
    "seq_length": 4096,
    "log_interval": 20,
    "checkpointing_steps": 500,
    "evaluation_steps": 500,
    "saving_limit": 5,
    "num_proc": 1,
    "gradient_checkpointing": True,
}


@pytest.mark.parametrize("field", list(XXPO_FIELDS))
def test_every_xxpo_field_is_mapped_or_ignored_with_a_reason(field: str) -> None:
    rule = XXPO_FIELDS[field]
    if isinstance(rule, Rename):
        assert rule.target in TrainConfig.model_fields
    elif isinstance(rule, Copy):
        assert field in TrainConfig.model_fields
    else:
        assert isinstance(rule, Ignore) and len(rule.reason) > 15


def test_xxpo_reads_its_own_spellings_not_mftcoders() -> None:
    translated, notes = translate_mftcoder(minimal(xxpo="orpo", seq_length=1024, warmup_steps=0.05, max_steps=-1))
    assert translated["training_stage"] == "orpo"
    assert translated["seq_length"] == 4096  # xxpo's max_length default; its seq_length is not read
    assert "reads max_length instead" in note_for(notes, "seq_length")
    assert translated["num_warmup_steps"] == 0 and "number of steps" in note_for(notes, "warmup_steps")
    assert "max_train_steps" not in translated


def test_xxpo_values_mftcoder_cannot_honour_are_refused_together() -> None:
    with pytest.raises(ConfigError) as caught:
        translate_mftcoder(minimal(xxpo="kto", rpo_alpha=0.5, optimizer_type="sgd", sanity_check=True))
    assert {issue.field for issue in caught.value.issues} == {"xxpo", "optimizer_type", "sanity_check"}
    with pytest.raises(ConfigError, match="ORPOConfig"):
        translate_mftcoder(minimal(xxpo="orpo", rpo_alpha=0.5))


# --- detection ------------------------------------------------------------------------------


def own_schema_file(ws: dict[str, Path]) -> Path:
    path = ws["tmp"] / "ours.json"
    config = {
        "pretrained_model_path": str(ws["model"]),
        "data_paths": [str(ws["task_a"]), str(ws["task_b"])],
        "data_split": [0.9, 0.1],
        "output_dir": str(ws["output"]),
        "peft_type": "lora",
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_own_schema_is_not_detected(workspace: dict[str, Path]) -> None:
    path = own_schema_file(workspace)
    assert not looks_like_mftcoder(json.loads(path.read_text()))
    notes: list[str] = []
    config = load_config(path, mftcoder=None, notice=notes.append)
    assert notes == []
    assert config.seq_length == TrainConfig.model_fields["seq_length"].default


def test_forced_translation_applies_mftcoder_defaults(workspace: dict[str, Path]) -> None:
    notes: list[str] = []
    config = load_config(own_schema_file(workspace), mftcoder=True, notice=notes.append)
    assert "is an MFTCoder train config" in notes[0]
    assert (config.seq_length, config.lora_rank, config.lora_alpha, config.min_lr) == (4096, 96, 32, 5e-6)
    assert "MFTCoder's default 4096" in note_for(notes, "seq_length")


@pytest.mark.parametrize(
    "raw",
    [
        {"data_paths": "[a,b]"},
        {"task_weights": "[1,2]"},
        {"data_split": "98,2,0"},
        {"tb_dir": "tb"},
        {"use_dynamic_padding": True},
        {"xxpo": "dpo"},
    ],
)
def test_detected_by_mftcoder_only_field_or_string_list(raw: dict[str, Any]) -> None:
    assert looks_like_mftcoder(raw)


def test_not_detected_for_real_lists() -> None:
    assert not looks_like_mftcoder({"data_paths": ["a"], "data_split": [0.9, 0.1], "target_modules": "all-linear"})


# --- single rules ---------------------------------------------------------------------------


def test_string_lists_become_lists() -> None:
    raw = minimal(data_paths="[ a/ , b/c/ ]", task_weights="[1, 2.5]", target_modules="[q_proj,v_proj]")
    translated, _ = translate_mftcoder(raw)
    assert translated["data_paths"] == ["a", "b/c"]
    assert translated["task_weights"] == [1.0, 2.5]
    assert translated["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("split, fractions", [("98,2,0", [0.98, 0.02]), ("90/10", [0.9, 0.1]), ("100", [1.0, 0.0])])
def test_data_split_uses_only_the_first_percentage(split: str, fractions: list[float]) -> None:
    translated, _ = translate_mftcoder(minimal(data_split=split))
    assert translated["data_split"] == fractions


def test_data_split_fractions_in_a_string_are_refused() -> None:
    with pytest.raises(ConfigError, match="looks like fractions"):
        translate_mftcoder(minimal(data_split="0.9,0.1"))


def test_data_weights_dropped_with_notice() -> None:
    translated, notes = translate_mftcoder(minimal(data_weights="[1,3]"))
    assert "data_weights" not in translated
    assert "task_weights" in note_for(notes, "data_weights")


def test_selfpaced_maps_to_self_paced() -> None:
    translated, notes = translate_mftcoder(minimal(weighted_loss_mode="selfpaced", selfpaced_interval=1))
    assert translated["weighted_loss_mode"] == "self_paced"
    assert '"self_paced"' in note_for(notes, "weighted_loss_mode")
    assert translated["selfpaced_interval"] == 1
    assert not any(note.startswith("selfpaced_interval") for note in notes)


def test_explicit_auto_resume_and_resume_path() -> None:
    translated, notes = translate_mftcoder(minimal(auto_resume=True, resume_from_checkpoint="out/step_100"))
    assert "auto_resume" not in translated
    assert "resume_from_checkpoint: auto" in note_for(notes, "auto_resume")
    assert translated["resume_from_checkpoint"] == "out/step_100"  # kept: the validator decides


def test_null_resume_is_dropped_quietly() -> None:
    translated, notes = translate_mftcoder(minimal(resume_from_checkpoint=None))
    assert "resume_from_checkpoint" not in translated
    assert not any(note.startswith("resume_from_checkpoint") for note in notes)


def test_other_attention_values_kept() -> None:
    translated, notes = translate_mftcoder(minimal(attn_implementation="sdpa"))
    assert translated["attn_implementation"] == "sdpa"
    assert not any(note.startswith("attn_implementation") for note in notes)


def test_full_fine_tuning_keeps_two_checkpoints_like_mftcoder() -> None:
    translated, notes = translate_mftcoder(minimal(peft_type=None))
    assert translated["saving_limit"] == 2
    assert "full fine-tuning" in note_for(notes, "saving_limit")
    assert "lora_rank" not in translated  # LoRA defaults are not filled into a full fine-tuning


def test_omitted_peft_type_is_mftcoders_qlora() -> None:
    raw = minimal()
    del raw["peft_type"]
    translated, notes = translate_mftcoder(raw)
    assert translated["peft_type"] == "qlora"
    assert "MFTCoder's default" in note_for(notes, "peft_type")


def test_unknown_keys_pass_through_to_the_validator(workspace: dict[str, Path]) -> None:
    path = instantiate_sample("lora", workspace)
    raw = json.loads(path.read_text()) | {"learning_rat": 1e-4}
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(path, mftcoder=None, notice=lambda _: None)
    [issue] = caught.value.issues
    assert issue.field == "learning_rat" and "did you mean 'learning_rate'" in issue.message


def test_all_translation_errors_reported_together() -> None:
    raw = minimal(load_raw_dataset=False, tokenize_mode="pretrain", data_split="abc", task_weights="[1,x]")
    with pytest.raises(ConfigError) as caught:
        translate_mftcoder(raw)
    messages = {issue.field: issue.message for issue in caught.value.issues}
    assert set(messages) == {"load_raw_dataset", "tokenize_mode", "data_split", "task_weights"}
    assert "binary" in messages["load_raw_dataset"]
    assert "for continued pre-training give `text` records" in messages["tokenize_mode"]
