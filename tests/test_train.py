"""End-to-end runs of the tiny demo model in one process."""

import json

import pytest
import torch
from conftest import EQUIVALENCE_ADAM_EPSILON, read_metrics, reset_accelerate
from peft import PeftModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from mftcoder.data.records import read_records
from mftcoder.data.template import chat_format, tokenize_conversations
from mftcoder.errors import ConfigError
from mftcoder.run_config import load_config
from mftcoder.training.trainer import train

pytestmark = pytest.mark.e2e

TRAIN_KEYS = {
    "step",
    "epoch",
    "split",
    "loss",
    "lr",
    "grad_norm",
    "task_loss",
    "tokens",
    "train_seconds",
    "tokens_per_s",
}
TASKS = {"code_completion", "text_to_code", "unit_test_generation"}


def first_and_last_task_losses(output_dir):
    train_lines = [m for m in read_metrics(output_dir) if m["split"] == "train"]
    return train_lines[0]["task_loss"], train_lines[-1]["task_loss"]


def test_lora_run_learns_every_task_and_writes_a_self_describing_output_dir(tiny_config):
    config = tiny_config(
        num_train_epochs=2,
        log_interval=9,
        evaluation_steps=20,
        checkpointing_steps=20,
        lora_modules_to_save=["embed_tokens", "lm_head"],
    )
    result = train(config)
    out = result.output_dir

    first, last = first_and_last_task_losses(out)
    assert set(first) == set(last) == TASKS
    for task in TASKS:
        assert last[task] < first[task] - 0.5, (task, first[task], last[task])

    # metrics contract
    lines = read_metrics(out)
    train_lines = [m for m in lines if m["split"] == "train"]
    valid_lines = [m for m in lines if m["split"] == "valid"]
    assert all(TRAIN_KEYS <= set(m) for m in train_lines)
    assert [m["step"] for m in train_lines] == [9, 18, 27, 36, 45, 54]
    assert train_lines[-1]["tokens"] > train_lines[0]["tokens"] > 0
    assert [m["step"] for m in valid_lines] == [20, 40, 54]  # every 20 steps, and always at the end
    assert set(valid_lines[-1]["task_loss"]) == TASKS
    assert result.steps == 54

    # the resolved config runs again as it is
    assert load_config(out / "config.yaml") == config
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 1 and run["distributed_type"] == "NO" and run["mixed_precision"] == "no"
    assert run["versions"]["transformers"]
    report = json.loads((out / "logs" / "data_report.json").read_text())
    assert set(report) == TASKS and all(r["train_samples"] == 36 for r in report.values())
    assert list((out / "logs").glob("events.out.tfevents.*"))

    # checkpoints every 20 steps, and at the final evaluation, which improved the best: best/ is that one
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-54"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-20", "step-40", "step-54"]
    assert result.progress.best_step == 54
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == (
        out / "final" / "adapter_model.safetensors"
    ).read_bytes()
    assert not list((out / "best").glob("*.pt"))

    # final/ is a PEFT adapter on the saved initial weights, loadable by plain HF/PEFT calls
    adapter_config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out / "base_model")
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, out / "final")
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())

    # the saved chat template renders exactly what was trained on
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    records = read_records(config.data_paths[0])[:3]
    trained = tokenize_conversations(tokenizer, chat_format(config, tokenizer), [r.messages for r in records])
    for record, (ids, _) in zip(records, trained, strict=True):
        assert list(tokenizer.apply_chat_template(record.messages, tokenize=True, return_dict=False)) == ids.tolist()
    with torch.no_grad():
        logits = model(torch.tensor([trained[0][0][:20].tolist()])).logits
    assert torch.isfinite(logits).all()


def test_full_fine_tuning_learns_every_task(tiny_config):
    result = train(tiny_config(peft_type=None, learning_rate=2e-3, num_train_epochs=2, log_interval=9))
    first, last = first_and_last_task_losses(result.output_dir)
    for task in TASKS:
        assert last[task] < first[task] - 0.5, (task, first[task], last[task])
    final = result.final_dir
    assert (final / "model.safetensors").exists() and not (final / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    initial = AutoModelForCausalLM.from_pretrained(result.output_dir / "base_model")
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)


def final_weights(final_dir):
    name = "adapter_model.safetensors" if (final_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(final_dir / name)


# The loss-driven modes with settings that change their weights within a 2-step run.
ADAPTIVE = {
    "focal_task": dict(weighted_loss_mode="focal", focal_level="task"),
    "focal_sample": dict(weighted_loss_mode="focal", focal_level="sample"),
    "self_paced": dict(weighted_loss_mode="self_paced", selfpaced_history_length=2),
    "coba": dict(weighted_loss_mode="coba", coba_warmup_steps=0, coba_history_length=3),
}


@pytest.mark.parametrize("mode", ["case1", "case2", "case3", "case4", *ADAPTIVE])
def test_accumulation_equals_a_larger_batch(tiny_config, tmp_path, mode):
    """GA=4 x bs=1 and GA=1 x bs=4 make the same optimizer steps, in every loss mode (a large Adam
    eps: a rare token's head row has a gradient of ~1e-9, see EQUIVALENCE_ADAM_EPSILON)."""
    common = dict(
        max_train_steps=2,
        learning_rate=1e-2,
        adam_epsilon=EQUIVALENCE_ADAM_EPSILON,
        lora_modules_to_save=["lm_head"],
        **ADAPTIVE.get(mode, {"weighted_loss_mode": mode}),
    )
    accumulated = train(
        tiny_config(
            per_device_train_batch_size=1, gradient_accumulation_steps=4, output_dir=str(tmp_path / "ga"), **common
        )
    )
    reset_accelerate()
    batched = train(
        tiny_config(
            per_device_train_batch_size=4, gradient_accumulation_steps=1, output_dir=str(tmp_path / "bs"), **common
        )
    )
    a, b = final_weights(accumulated.final_dir), final_weights(batched.final_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    la = [m for m in read_metrics(accumulated.output_dir) if m["split"] == "train"]
    lb = [m for m in read_metrics(batched.output_dir) if m["split"] == "train"]
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], rel=1e-5)
    for ma, mb in zip(la, lb, strict=True):
        assert ma.keys() == mb.keys()
        if "task_weight" in ma:
            # Weights from validation slopes amplify float noise (measured up to 2.4e-6 relative).
            assert ma["task_weight"] == pytest.approx(mb["task_weight"], rel=1e-4)


def objective_with(line: dict, weights: dict[str, float], mode: str) -> float:
    """The step objective made of a train line's task losses with `weights`: Σ ω_k ℓ_k / Σ ω_k over
    the tasks present, or for focal (whose logged weights are w_k φ_k, static w = 1) over their count."""
    losses = line["task_loss"]
    norm = len(losses) if mode == "focal_task" else sum(weights[t] for t in losses)
    return sum(weights[t] * v for t, v in losses.items()) / norm


@pytest.mark.parametrize("mode", ["focal_task", "self_paced", "coba"])
def test_logged_task_weights_are_those_the_step_applied(tiny_config, mode):
    """With log_interval 1 each train line is one step, and its `loss` is the objective made of its
    `task_loss` with the weights of that very step: case3 with ω, `Σ ω_k ℓ_k / Σ ω_k` over the tasks
    present (focal: `Σ w_k φ_k ℓ_k / Σ w_k` with the logged `w_k φ_k` and static w = 1). The
    weights change every step here, so the weights of a neighbouring step (what a line showed
    when it was written after the next step's validation update) do not fit."""
    result = train(tiny_config(max_train_steps=6, learning_rate=2e-2, **ADAPTIVE[mode]))
    lines = [m for m in read_metrics(result.output_dir) if m["split"] == "train"]
    assert [m["step"] for m in lines] == list(range(1, 7))
    weights = [m["task_weight"] for m in lines]
    for line, w in zip(lines, weights, strict=True):
        assert line["loss"] == pytest.approx(objective_with(line, w, mode), rel=1e-5), line["step"]
    # Discriminating: the next step's weights give another objective at most steps.
    misfits = sum(
        line["loss"] != pytest.approx(objective_with(line, w, mode), rel=1e-5)
        for line, w in zip(lines, weights[1:], strict=False)
    )
    assert misfits >= 3, weights
    # TensorBoard shows the same weights under MFTCoder's tags.
    tags = EventAccumulator(str(result.output_dir / "logs")).Reload()
    name = {"focal_task": "focal", "self_paced": "selfpaced", "coba": "coba"}[mode]
    for task in TASKS:
        events = tags.Scalars(f"{task}_{name}_weight/train")
        assert [e.step for e in events] == list(range(1, 7))
        assert [e.value for e in events] == pytest.approx([w[task] for w in weights], rel=1e-6)


def test_used_output_dir_is_refused_and_left_untouched(tiny_config):
    config = tiny_config(max_train_steps=1)
    train(config)
    reset_accelerate()
    out = config.output_dir
    before = {p: p.stat().st_mtime_ns for p in sorted(__import__("pathlib").Path(out).rglob("*"))}
    with pytest.raises(ConfigError, match="overwrite_output_dir=true"):
        train(config)
    after = {p: p.stat().st_mtime_ns for p in sorted(__import__("pathlib").Path(out).rglob("*"))}
    assert before == after

    reset_accelerate()
    (config_out := __import__("pathlib").Path(out))
    (config_out / "my_notes.txt").write_text("keep me")
    result = train(config.model_copy(update={"overwrite_output_dir": True, "max_train_steps": 2}))
    assert result.steps == 2 and (config_out / "my_notes.txt").read_text() == "keep me"
    assert [m["step"] for m in read_metrics(config_out) if m["split"] == "train"] == [1, 2]


def test_early_stopping_and_checkpoint_rotation(tiny_config):
    # learning_rate 0: the validation loss never improves after the first evaluation
    config = tiny_config(
        learning_rate=0,
        evaluation_steps=2,
        early_stopping=True,
        early_stopping_stall_num=2,
        checkpointing_steps=1,
        saving_limit=2,
    )
    result = train(config)
    assert result.steps == 6  # evaluations at 2 (best), 4 and 6 (two stalls)
    assert result.progress.best_step == 2
    checkpoints = result.output_dir / "checkpoints"
    # two kept: the best (step 2) is never rotated away, the newest (step 6) neither
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2", "step-6"]
    assert (checkpoints / "latest").read_text().strip() == "step-6"


def test_new_special_tokens_train_embeddings_and_head(tiny_config):
    markers = {"system": "<|sys|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
    config = tiny_config(
        max_train_steps=2, role_markers=markers, new_special_tokens=["<|sys|>", "<|user|>", "<|assistant|>"]
    )
    result = train(config)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") >= 1294
    saved = load_file(result.final_dir / "adapter_model.safetensors")
    embed = [v for k, v in saved.items() if "embed_tokens" in k]
    assert embed and embed[0].shape[0] == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(result.output_dir / "base_model")
    assert base.get_input_embeddings().num_embeddings == len(tokenizer)


def test_a_bf16_lora_run_keeps_every_trainable_weight_in_fp32(tiny_config):
    """The frozen base computes in bf16; the adapter and the full copies of `lora_modules_to_save` are
    the weights the optimizer updates, so they (and their Adam states) stay fp32."""
    result = train(tiny_config(dtype="bf16", max_train_steps=1, lora_modules_to_save=["embed_tokens", "lm_head"]))
    adapter = load_file(result.output_dir / "final" / "adapter_model.safetensors")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= adapter.keys()
    assert {t.dtype for t in adapter.values()} == {torch.float32}
