import json
from pathlib import Path

import pytest
from conftest import DEMO_MODEL

from mftcoder.config import dump_config
from mftcoder.config.loading import apply_overrides, parse_value
from mftcoder.errors import ConfigError
from mftcoder.run_config import load_config

pytestmark = pytest.mark.unit


@pytest.fixture
def config_file(tmp_path, small_data):
    def write(extra: str = "", name: str = "run.yaml") -> Path:
        path = tmp_path / name
        lines = [
            f"pretrained_model_path: {DEMO_MODEL}",
            "model_init: from_config",
            "data_paths:",
            *[f"  - {p}" for p in small_data],
            f"output_dir: {tmp_path / 'out'}",
        ]
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    return write


def problems(excinfo) -> dict[str, str]:
    return {issue.field: issue.render() for issue in excinfo.value.issues}


def test_valid_config_resolves_with_defaults(config_file):
    config = load_config(config_file())
    assert config.weighted_loss_mode == "case3"
    assert config.target_modules == "all-linear"
    assert config.dtype == "auto" and config.peft_type == "lora"
    assert all(Path(p).is_absolute() for p in config.data_paths)


def test_unknown_key_gets_a_did_you_mean_hint_with_file_and_line(config_file):
    path = config_file("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = problems(excinfo)["lerning_rate"]
    assert "did you mean 'learning_rate'" in message
    assert f"{path}:" in message and ":8:" in message  # the key's line in the file


def test_every_error_is_reported_at_once(config_file):
    path = config_file("lora_rank: many\nweighted_loss_mode: case9\ndata_split: [0.5, 0.2]\nbogus: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["per_device_train_batch_size=0"])
    found = problems(excinfo)
    assert set(found) == {"lora_rank", "weighted_loss_mode", "data_split", "bogus", "per_device_train_batch_size"}
    assert "valid integer" in found["lora_rank"]
    assert "sum to 1" in found["data_split"]
    assert "override per_device_train_batch_size=0" in found["per_device_train_batch_size"]
    assert "5 problems" in str(excinfo.value)


def test_override_values_are_parsed_as_yaml(config_file):
    config = load_config(
        config_file(),
        [
            "learning_rate=1e-4",
            "min_lr=5E-6",
            "data_split=[0.8,0.2]",
            r'role_markers.user="<|user|>\n"',
            "max_train_steps=7",
        ],
    )
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1e-4
    assert config.min_lr == 5e-6
    assert config.data_split == [0.8, 0.2]
    assert config.role_markers.user == "<|user|>\n" and config.role_markers.assistant == "<s>bot\n"
    assert config.max_train_steps == 7


def test_float_without_dot_in_file_is_a_float(config_file):
    config = load_config(config_file("learning_rate: 2e-4\n"))
    assert config.learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize(
    ("text", "value"), [("1e-4", 1e-4), ("[a, b]", ["a", "b"]), ("null", None), ("true", True), ("x=y", "x=y")]
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_malformed_override_is_reported():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["learning_rate"])


def test_json_config_is_read_with_lines(tmp_path, small_data):
    path = tmp_path / "run.json"
    raw = {
        "pretrained_model_path": str(DEMO_MODEL),
        "data_paths": small_data,
        "output_dir": str(tmp_path),
        "seq_length": "long",
    }
    path.write_text(json.dumps(raw, indent=2))
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert f"{path}:" in problems(excinfo)["seq_length"]


def test_cross_field_and_file_system_checks(config_file, tmp_path):
    path = config_file(
        f"learning_rate: 0.001\nmin_lr: 0.01\ntask_weights: [1, 2]\ntokenizer_path: {tmp_path / 'missing_tokenizer'}\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, [f"data_paths=[{tmp_path / 'nope'}, {tmp_path / 'nope2'}]"])
    found = problems(excinfo)
    assert "exceeds learning_rate" in found["min_lr"]
    assert "no such file or directory" in found["data_paths.0"]
    assert "no such directory" in found["tokenizer_path"]
    assert "2 weights for 2 tasks" not in str(excinfo.value)  # two paths, two weights: fine


def test_task_weights_must_match_tasks(config_file):
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file("task_weights: [1, 2]\n"))
    assert "2 weights for 3 tasks" in problems(excinfo)["task_weights"]


def test_duplicate_task_names_are_refused(config_file, small_data):
    with pytest.raises(ConfigError, match="task names must be unique"):
        load_config(config_file(), [f"data_paths=[{small_data[0]}, {small_data[0]}]"])


def test_learning_rate_zero_is_valid(config_file):
    assert load_config(config_file(), ["learning_rate=0"]).learning_rate == 0


def test_validation_needed_without_a_validation_split(config_file):
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file(), ["data_split=[1, 0]"])
    assert {"early_stopping", "evaluation_steps"} <= set(problems(excinfo))
    config = load_config(config_file(), ["data_split=[1, 0]", "early_stopping=false", "evaluation_steps=null"])
    assert config.valid_fraction == 0


def test_warmup_must_be_steps_or_fraction(config_file):
    assert load_config(config_file(), ["num_warmup_steps=0.1"]).num_warmup_steps == 0.1
    assert load_config(config_file(), ["num_warmup_steps=30"]).num_warmup_steps == 30
    with pytest.raises(ConfigError, match="whole number of steps"):
        load_config(config_file(), ["num_warmup_steps=2.5"])


def test_dtype_aliases_and_selfpaced_spelling(config_file):
    assert load_config(config_file(), ["dtype=bfloat16"]).dtype == "bf16"


def test_missing_required_keys(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    found = problems(excinfo)
    assert {"pretrained_model_path", "data_paths", "output_dir"} <= set(found)
    assert "required key is missing" in found["output_dir"]


def test_unreadable_config_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\ndata_paths: [a, b\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: config: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_resolved_config_round_trips(config_file, tmp_path):
    config = load_config(config_file(), ["learning_rate=1e-5", "task_weights=[1, 2, 3]"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_config(config))
    assert load_config(saved) == config


def test_hub_id_is_resolved_from_the_local_cache(config_file, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--coder-1b" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((DEMO_MODEL / "config.json").read_text())
    (cache / "models--acme--coder-1b" / "refs").mkdir()
    (cache / "models--acme--coder-1b" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert load_config(config_file(), ["pretrained_model_path=acme/coder-1b"]).pretrained_model_path == "acme/coder-1b"
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file(), ["pretrained_model_path=acme/other-model"])
    assert "not in the Hugging Face cache" in problems(excinfo)["pretrained_model_path"]
    with pytest.raises(ConfigError, match="no such directory"):
        load_config(config_file(), ["pretrained_model_path=./models/local"])


def test_data_paths_entries_may_be_mappings(config_file, small_data, tmp_path):
    entries = f"[{small_data[0]}, {{path: {small_data[1]}, name: t2c, format: messages, weight: 2}}, {{path: {small_data[2]}}}]"
    config = load_config(config_file(), [f"data_paths={entries}"])
    assert config.data_paths[0] == small_data[0]  # a plain path stays a string
    assert (config.data_paths[1].name, config.data_paths[1].format, config.data_paths[1].weight) == (
        "t2c",
        "messages",
        2.0,
    )
    assert Path(config.data_paths[2].path).is_absolute()
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_config(config))
    assert load_config(saved) == config


def test_bad_data_paths_entries_are_located(config_file, small_data, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "dd"))
    entries = (
        f"[{{path: {small_data[0]}, format: alpacca, weight: 0}}, 3, {{path: {small_data[1]}, nme: x}}, "
        f"{{path: {small_data[2]}, name: same}}, {{path: {tmp_path / 'dd'}, name: same}}]"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file(), [f"data_paths={entries}"])
    found = problems(excinfo)
    assert "Input should be 'auto', 'chat_rounds'" in found["data_paths.0.format"]
    assert "greater than 0" in found["data_paths.0.weight"]
    assert "each entry is a path, or a mapping {path, name, format, weight}" in found["data_paths.1"]
    assert "unknown key" in found["data_paths.2.nme"]
    with pytest.raises(ConfigError) as excinfo:
        load_config(
            config_file(),
            [f"data_paths=[{{path: {small_data[2]}, name: same}}, {{path: {tmp_path / 'dd'}, name: same}}]"],
        )
    found = problems(excinfo)
    assert "a saved DatasetDict (splits: train); point the entry at one split's directory" in found["data_paths.1"]
    assert "task name 'same'" in found["data_paths"]


def test_role_markers_do_not_apply_to_the_tokenizer_template(config_file):
    assert load_config(config_file(), ["template=tokenizer"]).template == "tokenizer"
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file(), ["template=tokenizer", r'role_markers.user="<|user|>\n"'])
    assert "apply to template: mftcoder" in problems(excinfo)["role_markers"]


def test_data_policies_are_checked(config_file):
    config = load_config(config_file(), ["overlength=truncate", "on_bad_record=skip"])
    assert (config.overlength, config.on_bad_record) == ("truncate", "skip")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file(), ["overlength=cut", "on_bad_record=ignore"])
    assert {"overlength", "on_bad_record"} <= set(problems(excinfo))
