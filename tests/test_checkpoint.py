"""Checkpoint writing, failures, resume decisions and numerical faults, in one process."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import poison_forward, read_metrics, reset_accelerate

from mftcoder.errors import ConfigError, LaunchError, TrainingError
from mftcoder.training import checkpoint as ckpt
from mftcoder.training import outputs
from mftcoder.training.resume import compatibility
from mftcoder.training.trainer import train


def make_checkpoint(directory: Path, complete: bool = True) -> Path:
    directory.mkdir(parents=True)
    if complete:
        (directory / ckpt.TRAINER_STATE).write_text("{}")
    return directory


@pytest.mark.unit
def test_latest_ignores_tmp_and_incomplete_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints / "step-2")
    make_checkpoint(checkpoints / "step-4.tmp")
    make_checkpoint(checkpoints / "step-6", complete=False)
    assert ckpt.latest_checkpoint(checkpoints) == checkpoints / "step-2"
    (checkpoints / "latest").write_text("step-4.tmp\n")  # a pointer to a half-written one is not trusted
    assert ckpt.latest_checkpoint(checkpoints) == checkpoints / "step-2"
    make_checkpoint(checkpoints / "step-8")  # renamed, but killed before `latest` was updated
    assert ckpt.latest_checkpoint(checkpoints) == checkpoints / "step-8"
    assert ckpt.latest_checkpoint(tmp_path / "none") is None


@pytest.mark.unit
def test_free_space_is_checked(tmp_path, monkeypatch):
    assert ckpt.free_space_problem(tmp_path, 1 << 20) == ""
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: type("U", (), {"free": 10 << 20})())
    assert "only 10 MiB free" in ckpt.free_space_problem(tmp_path, 100 << 20)


@pytest.mark.unit
def test_compatibility_accepts_schedule_keys_and_refuses_the_rest(tiny_config):
    config = tiny_config(max_train_steps=10)
    saved = config.model_dump(mode="json")
    longer = config.model_copy(update={"max_train_steps": 20, "log_interval": 5})
    accepted, refused = compatibility(saved, longer, 1, 1)
    assert [c.split(":")[0] for c in accepted] == ["log_interval", "max_train_steps"] and not refused
    other = config.model_copy(update={"seq_length": 256, "learning_rate": 1.0})
    _, refused = compatibility(saved, other, 1, 1)
    assert [c.split(":")[0] for c in refused] == ["learning_rate", "seq_length"]
    _, refused = compatibility(saved, config, 2, 1)
    assert refused == ["world size: 2 -> 1"]
    accepted, refused = compatibility(saved, config.model_copy(update={"allow_inexact_resume": True}), 2, 1)
    assert "world size: 2 -> 1" in accepted and not refused  # allow_inexact_resume itself is safe to change
    del saved["on_nan"]  # a checkpoint written before the key existed: it had the default
    assert compatibility(saved, config, 1, 1) == ([], [])


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["case3", "focal", "self_paced", "coba"])
def test_eval_batch_size_may_change_unless_validation_draws_set_the_weights(tiny_config, mode):
    config = tiny_config(weighted_loss_mode=mode)
    saved = config.model_dump(mode="json")
    accepted, refused = compatibility(saved, config.model_copy(update={"per_device_eval_batch_size": 2}), 1, 1)
    changed = ["per_device_eval_batch_size: 8 -> 2"]
    assert (accepted, refused) == (([], changed) if mode in ("self_paced", "coba") else (changed, []))


@pytest.mark.e2e
def test_failed_save_keeps_the_previous_checkpoint_and_training_goes_on(tiny_config, monkeypatch, capsys):
    real = outputs.save_pretrained
    calls = []

    def failing_on_step_4(directory, *args, **kwargs):
        calls.append(Path(directory).name)
        if Path(directory).name == "step-4.tmp":
            (Path(directory)).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")  # fail halfway
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(outputs, "save_pretrained", failing_on_step_4)
    result = train(tiny_config(max_train_steps=4, checkpointing_steps=2))
    out = capsys.readouterr().out
    assert "checkpoint step-4 was not written (OSError: [Errno 28] No space left on device)" in out
    assert "the previous checkpoint step-2 and `latest` are intact; training goes on" in out
    checkpoints = result.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
    assert (checkpoints / "latest").read_text().strip() == "step-2"
    assert (result.output_dir / "final" / "adapter_model.safetensors").is_file()
    reset_accelerate()
    resumed = train(tiny_config(max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="auto"))
    assert resumed.steps_run == 2


@pytest.mark.e2e
def test_resume_refuses_changed_training_and_accepts_a_longer_run(tiny_config, capsys):
    first = train(tiny_config(max_train_steps=3, checkpointing_steps=3))
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"seq_length: 512 -> 256"):
        train(tiny_config(max_train_steps=3, seq_length=256, resume_from_checkpoint="auto"))
    reset_accelerate()
    result = train(tiny_config(max_train_steps=5, checkpointing_steps=3, resume_from_checkpoint="auto"))
    out = capsys.readouterr().out
    assert "resume: accepted change max_train_steps: 3 -> 5" in out
    assert f"resumed from {first.output_dir / 'checkpoints' / 'step-3'} at step 3" in out
    assert result.steps == 5 and result.steps_run == 2
    assert [m["step"] for m in read_metrics(result.output_dir) if m["split"] == "train"] == [1, 2, 3, 4, 5]


@pytest.mark.e2e
def test_resume_on_edited_data_is_refused(tiny_config, small_data, tmp_path):
    import shutil

    data = [shutil.copytree(p, tmp_path / "data" / Path(p).name) for p in small_data]
    train(tiny_config(max_train_steps=2, checkpointing_steps=2, data_paths=[str(p) for p in data]))
    reset_accelerate()
    file = next(data[0].glob("*.jsonl"))
    lines = file.read_text().splitlines()
    record = json.loads(lines[0])
    record["chat_rounds"][-1]["content"] += " edited"
    file.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(LaunchError, match="training data changed"):
        train(tiny_config(max_train_steps=2, data_paths=[str(p) for p in data], resume_from_checkpoint="auto"))


@pytest.mark.e2e
def test_auto_without_a_checkpoint_starts_fresh(tiny_config, capsys):
    result = train(tiny_config(max_train_steps=2, resume_from_checkpoint="auto"))
    assert "no complete checkpoint" in capsys.readouterr().out
    assert result.steps_run == 2


@pytest.mark.e2e
def test_non_finite_steps_are_skipped_then_stop(tiny_config, monkeypatch, capsys):
    import mftcoder.training.step as step_module

    real = step_module.forward_token_losses
    poisoned = {3, 5, 6, 7}  # forward calls (one micro-batch per step) that return NaN
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        ce = real(model, batch)
        return ce * float("nan") if calls["n"] in poisoned else ce

    monkeypatch.setattr(step_module, "forward_token_losses", sometimes_nan)
    with pytest.raises(
        TrainingError,
        match=r"step 7: non-finite loss or gradient norm \(tasks in this rank's batch: .+\); stopping \(3 in a row\)",
    ):
        train(tiny_config(max_train_steps=10, max_consecutive_nan=3))
    out = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient norm" in out and "update skipped (1 so far)" in out
    lines = [m for m in read_metrics(Path(tiny_config().output_dir)) if m["split"] == "train"]
    assert [m["step"] for m in lines] == [1, 2, 4]  # skipped steps are not in the log windows
    assert lines[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)


@pytest.mark.e2e
def test_on_nan_stop_stops_at_the_first(tiny_config, monkeypatch):
    import mftcoder.training.step as step_module

    real = step_module.forward_token_losses
    monkeypatch.setattr(step_module, "forward_token_losses", lambda m, b: real(m, b) * float("inf"))
    with pytest.raises(TrainingError, match=r"step 1: .*on_nan: stop"):
        train(tiny_config(max_train_steps=3, on_nan="stop"))


@pytest.mark.e2e
def test_best_follows_a_named_task(tiny_config):
    result = train(tiny_config(max_train_steps=4, evaluation_steps=2, metric_for_best="text_to_code"))
    valid = [m for m in read_metrics(result.output_dir) if m["split"] == "valid"]
    best = min(valid, key=lambda m: m["task_loss"]["text_to_code"])
    assert result.progress.best_step == best["step"]
    assert (result.output_dir / "best" / "adapter_model.safetensors").is_file()


@pytest.fixture
def fp16_scaler_on_cpu(monkeypatch):
    """accelerate builds fp16's GradScaler for GPUs only (mftcoder refuses fp16 on CPU); this puts the
    accelerator in the state it has on a GPU under fp16, with a real torch GradScaler and fp16 autocast on
    the CPU, so that the trainer's loss-scaling path runs here: accelerate's scaled backward, the unscale in
    clipping and scaler.step/update in its optimizer wrapper."""
    import mftcoder.training.trainer as trainer_module

    real = trainer_module.build_accelerator

    def build(config):
        accelerator = real(config)
        accelerator.state._mixed_precision = "fp16"
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10_000)
        return accelerator

    monkeypatch.setattr(trainer_module, "build_accelerator", build)


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "adapter_model.safetensors")


@pytest.mark.e2e
def test_fp16_overflow_skips_the_update_lowers_the_loss_scale_and_resumes_exactly(
    tiny_config, fp16_scaler_on_cpu, monkeypatch, capsys, tmp_path
):
    """A finite but huge loss at step 3 overflows the fp16 gradients once the scaler multiplies it: the
    scaler skips that update and halves its scale, and the run goes on. It is not a non-finite step, so
    even on_nan: stop lets it pass; a checkpoint holds the lowered scale, and a run resumed there ends
    where the uninterrupted one does."""
    import shutil

    poison_forward(monkeypatch, {3}, 1e9)
    config = tiny_config(max_train_steps=5, checkpointing_steps=1, on_nan="stop", lora_dropout=0.0)
    result = train(config)
    out = result.output_dir
    assert result.steps == 5
    console = capsys.readouterr().out
    assert "step 3: fp16 gradients overflowed; update skipped, loss scale lowered from 4096 to 2048" in console
    assert json.loads((out / "run.json").read_text())["mixed_precision"] == "fp16"
    lines = [m for m in read_metrics(out) if m["split"] == "train"]
    assert [m["step"] for m in lines] == [1, 2, 4, 5]
    assert [m["loss_scale"] for m in lines] == [4096, 4096, 2048, 2048]
    assert [m.get("overflow_steps", 0) for m in lines] == [0, 0, 1, 1]
    assert not any("skipped_steps" in m for m in lines)
    steps = {n: adapter(out / "checkpoints" / f"step-{n}") for n in (2, 3, 4)}
    assert all(torch.equal(steps[2][k], steps[3][k]) for k in steps[2]), "the overflowing update reached the weights"
    assert any(not torch.equal(steps[3][k], steps[4][k]) for k in steps[3]), "training did not go on"
    assert torch.load(out / "checkpoints" / "step-3" / "scaler.pt")["scale"] == 2048

    # Resume from step 3 in a copy of the run: the loss scale, weights and log continue exactly.
    reset_accelerate()
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    for name in ("step-4", "step-5"):
        shutil.rmtree(copy / "checkpoints" / name)
    shutil.rmtree(copy / "final")
    (copy / "checkpoints" / ckpt.LATEST).write_text("step-3\n")
    resumed = train(config.model_copy(update={"output_dir": str(copy), "resume_from_checkpoint": "auto"}))
    assert resumed.steps_run == 2
    ours, reference = adapter(copy / "final"), adapter(out / "final")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    timing = {"train_seconds", "tokens_per_s"}
    strip = lambda lines: [{k: v for k, v in m.items() if k not in timing} for m in lines]  # noqa: E731
    assert strip(read_metrics(copy)) == strip(read_metrics(out))


@pytest.mark.unit
def test_step_outcome_names_what_happened_to_the_update():
    from mftcoder.training.step_outcome import Outcome, step_outcome

    assert step_outcome(True, True, applied=True, loss_scale=None, step=1) is Outcome.APPLIED
    # Skipped with a finite loss: a loss-scale overflow under fp16, a non-finite gradient otherwise.
    assert step_outcome(True, False, applied=False, loss_scale=1024.0, step=1) is Outcome.OVERFLOW
    assert step_outcome(True, False, applied=False, loss_scale=None, step=1) is Outcome.NON_FINITE
    # At a scale of 1 or less the gradients overflow unscaled: no longer the scale's business.
    assert step_outcome(True, False, applied=False, loss_scale=1.0, step=1) is Outcome.NON_FINITE
    # A non-finite loss is never a mere overflow.
    assert step_outcome(False, False, applied=False, loss_scale=1024.0, step=1) is Outcome.NON_FINITE
    # Skipped by DeepSpeed although mftcoder saw finite numbers (its check is its own): not applied, counted.
    assert step_outcome(True, True, applied=False, loss_scale=None, step=1) is Outcome.NON_FINITE
    for loss_finite, grads_finite in ((False, True), (True, False), (False, False)):
        with pytest.raises(
            TrainingError, match="step 4: an update with a non-finite loss or gradient norm was applied"
        ):
            step_outcome(loss_finite, grads_finite, applied=True, loss_scale=None, step=4)


@pytest.mark.e2e
@pytest.mark.parametrize("recorded", [True, False], ids=["lr_steps", "older-checkpoint"])
def test_a_run_made_longer_on_resume_continues_its_learning_rate_schedule(tiny_config, capsys, recorded):
    """Resumed at step 2 of a 4-step cosine run with max_train_steps: 6, steps 3-4 get the original run's
    rates and steps 5-6 its final rate; the console says so (this is not a fresh 6-step run). A checkpoint
    written before the schedule's length was recorded gives it by its own config."""
    first = train(tiny_config(max_train_steps=4, checkpointing_steps=2, min_lr=1e-4, lr_scheduler_type="cosine"))
    original = {m["step"]: m["lr"] for m in read_metrics(first.output_dir) if m["split"] == "train"}
    reset_accelerate()
    checkpoint = first.output_dir / "checkpoints" / "step-2"
    if not recorded:
        state = json.loads((checkpoint / ckpt.TRAINER_STATE).read_text())
        del state["lr_steps"]
        (checkpoint / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    longer = tiny_config(
        max_train_steps=6, min_lr=1e-4, lr_scheduler_type="cosine", resume_from_checkpoint=str(checkpoint)
    )
    result = train(longer)
    out = capsys.readouterr().out
    assert (
        "resume: the run now has 6 steps, its learning-rate schedule keeps the original 4 (warm-up 0); steps 5-6 run at its final rate 0.0001"
        in out
    )
    lr = {m["step"]: m["lr"] for m in read_metrics(result.output_dir) if m["split"] == "train"}
    assert [lr[s] for s in (1, 2, 3, 4)] == pytest.approx([original[s] for s in (1, 2, 3, 4)])
    assert lr[3] > lr[4] > 1e-4
    assert [lr[5], lr[6]] == pytest.approx([1e-4, 1e-4])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "task_mean"),  # case3
        ({"weighted_loss_mode": "case4"}, "task_mean"),
        ({"weighted_loss_mode": "focal"}, "task_mean"),
        ({"weighted_loss_mode": "coba"}, "task_mean"),
        ({"weighted_loss_mode": "case1"}, "loss"),
        ({"weighted_loss_mode": "case2"}, "loss"),
        ({"weighted_loss_mode": "focal", "focal_level": "sample"}, "loss"),
        ({"weighted_loss_mode": "case1", "metric_for_best": "task_mean"}, "task_mean"),
        ({"metric_for_best": "loss"}, "loss"),
    ],
)  # fmt: skip
def test_best_follows_what_the_loss_mode_balances_by_default(tiny_config, settings, expected):
    assert tiny_config(**settings).metric_for_best == expected


@pytest.mark.unit
def test_task_mean_counts_every_task_once():
    from mftcoder.training.evaluation import Evaluation

    # 90 tokens of a task at loss 1.0 and 10 of another at 3.0: token-weighted 1.2, task mean 2.0.
    result = Evaluation(loss=1.2, task_loss={"big": 1.0, "small": 3.0})
    assert result.metric("task_mean") == pytest.approx(2.0)
    assert result.metric("loss") == 1.2 and result.metric("small") == 3.0


@pytest.mark.e2e
def test_best_follows_the_task_mean_by_default(tiny_config):
    result = train(tiny_config(max_train_steps=4, evaluation_steps=1))
    valid = [m for m in read_metrics(result.output_dir) if m["split"] == "valid"]
    assert all(m["task_mean"] == pytest.approx(sum(m["task_loss"].values()) / 3) for m in valid)
    assert result.progress.best_step == min(valid, key=lambda m: m["task_mean"])["step"]
    assert result.progress.best_metric == pytest.approx(min(m["task_mean"] for m in valid))


@pytest.mark.e2e
def test_fp16_overflow_on_every_step_reaches_on_nan_once_the_scale_is_spent(
    tiny_config, fp16_scaler_on_cpu, monkeypatch
):
    """Gradients that overflow whatever the scale: the scale halves from 4096 to 1 over steps 1-12; from
    step 13 (scale 1) they overflow unscaled and count as non-finite, so the run stops instead of halving
    its scale forever without an update."""
    poison_forward(monkeypatch, set(range(1, 100)), 1e9)
    with pytest.raises(TrainingError, match=r"step 14: non-finite loss or gradient norm .*\(2 in a row\)"):
        train(tiny_config(max_train_steps=30, max_consecutive_nan=2))


@pytest.mark.e2e
def test_a_checkpoint_judged_by_another_metric_resumes_and_tracks_the_best_afresh(tiny_config, capsys):
    """A case3 run saved with metric_for_best: loss (the default of earlier versions) resumes under the
    task_mean default: the best so far was another number, so best/ and early stopping start over."""
    first = train(tiny_config(max_train_steps=4, evaluation_steps=2, checkpointing_steps=2, metric_for_best="loss"))
    assert first.progress.best_step is not None
    reset_accelerate()
    resumed = train(tiny_config(max_train_steps=6, evaluation_steps=2, resume_from_checkpoint="auto"))
    out = capsys.readouterr().out
    assert "resume: accepted change metric_for_best: 'loss' -> 'task_mean'" in out
    assert "resume: metric_for_best is now task_mean; the best model is tracked afresh" in out
    valid = [m for m in read_metrics(resumed.output_dir) if m["split"] == "valid" and m["step"] > 4]
    assert resumed.progress.best_step == min(valid, key=lambda m: m["task_mean"])["step"]
