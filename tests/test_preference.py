"""Preference training (training_stage dpo, orpo): the losses against hand-computed values, the
step normalisation, preference records through the data pipeline, a DPO run on the demo model that
learns the held-out preferences, MFTCoder's DPO sample config, 2 processes against 1, exact resume."""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO, DEMO_MODEL, DEMO_TASKS, EQUIVALENCE_ADAM_EPSILON, read_metrics, reset_accelerate
from safetensors.torch import load_file

from mftcoder.data.batching import collate
from mftcoder.data.formats import BadRecord, parse_preference
from mftcoder.data.records import read_task
from mftcoder.data.sample import Sample
from mftcoder.errors import ConfigError, DataError
from mftcoder.losses.preference import (
    PreferenceLoss,
    dpo_loss,
    orpo_loss,
    pair_coefficients,
    pair_counts,
    responses,
)
from mftcoder.run_config import validate_mapping


def write_preference_data(target: Path, records_per_task: int) -> list[str]:
    """Pairs from the demo tasks: chosen = the record's real answer, rejected = that answer corrupted (its
    words in reverse order). code_completion in MFTCoder's xxpo layout (two whole conversations), the others
    as prompt (messages) / chosen / rejected strings."""
    rows = {
        task: [json.loads(line) for line in (DEMO / "data" / task / f"{task}.jsonl").read_text().splitlines()]
        for task in DEMO_TASKS
    }
    paths = []
    for i, task in enumerate(DEMO_TASKS):
        lines = []
        for record in rows[task][:records_per_task]:
            turns = record["chat_rounds"]
            wrong = " ".join(reversed(turns[-1]["content"].split(" ")))
            if i == 0:
                rejected = [*turns[:-1], {"role": turns[-1]["role"], "content": wrong}]
                lines.append({"chosen": turns, "rejected": rejected})
            else:
                lines.append({"prompt": turns[:-1], "chosen": turns[-1]["content"], "rejected": wrong})
        directory = target / task
        directory.mkdir(parents=True)
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        paths.append(str(directory))
    return paths


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> list[str]:
    return write_preference_data(tmp_path_factory.mktemp("pairs"), 30)


def dpo_config(data: list[str], out: Path, **overrides):
    raw = {
        "pretrained_model_path": str(DEMO_MODEL),
        "model_init": "from_config",
        "data_paths": data,
        "data_split": [0.9, 0.1],
        "seq_length": 512,
        "output_dir": str(out),
        "training_stage": "dpo",
        "peft_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 5e-3,
        "num_warmup_steps": 0,
        "log_interval": 1,
        "evaluation_steps": None,
        "checkpointing_steps": None,
        "early_stopping": False,
        "seed": 7,
    }
    return raw | overrides


# --- the losses, by hand ------------------------------------------------------------------------


@pytest.mark.unit
def test_dpo_loss_matches_hand_computation():
    policy_c, policy_r = torch.tensor([-5.0, -8.0]), torch.tensor([-7.0, -6.0])
    ref_c, ref_r = torch.tensor([-6.0, -7.0]), torch.tensor([-6.0, -7.0])
    out = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)
    # pair 1: (−5+6) − (−7+6) = 2; pair 2: (−8+7) − (−6+7) = −2;  −log σ(x) = log(1 + e^−x)
    expected = [math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.2))]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_reward.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_reward.tolist() == pytest.approx([-0.1, 0.1])


@pytest.mark.unit
def test_orpo_loss_matches_hand_computation():
    chosen, rejected, lam = [-0.5, -1.2], [-1.0, -0.3], 0.25
    out = orpo_loss(torch.tensor(chosen), torch.tensor(rejected), lam)

    def log_odds(a: float) -> float:
        p = math.exp(a)
        return math.log(p / (1 - p))

    expected = [
        -c + lam * math.log1p(math.exp(-(log_odds(c) - log_odds(r)))) for c, r in zip(chosen, rejected, strict=True)
    ]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_reward.tolist() == pytest.approx([lam * c for c in chosen])


@pytest.mark.unit
def test_orpo_log_odds_stay_finite_near_certainty():
    a = torch.tensor([-1e-9, -1e-4, -30.0], requires_grad=True)
    out = orpo_loss(a, torch.tensor([-2.0, -2.0, -2.0]), 0.1)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(a.grad).all()


def pair_batch(pairs: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """A padded micro-batch of pairs (task, chosen response length, rejected response length), prompt 3 tokens."""
    samples = []
    for task, *lengths in pairs:
        for n in lengths:
            mask = np.r_[np.zeros(3, dtype=np.uint8), np.ones(n, dtype=np.uint8)]
            samples.append(Sample(np.arange(3 + n, dtype=np.int32) + 5, mask, task))
    return collate(samples, pad_id=0)


@pytest.mark.unit
def test_responses_sum_the_response_tokens_of_each_row():
    batch = pair_batch([(1, 2, 3), (0, 4, 1)])
    ce = torch.rand(batch["loss_mask"].shape) * batch["loss_mask"]
    got = responses(ce, batch)
    assert got.chosen.tolist() == pytest.approx((-ce[0::2].sum(1)).tolist())
    assert got.rejected.tolist() == pytest.approx((-ce[1::2].sum(1)).tolist())
    assert got.chosen_tokens.tolist() == [2, 4] and got.rejected_tokens.tolist() == [3, 1]
    assert got.task.tolist() == [1, 0]
    # A rank whose share ran out gets one dummy row: no pair.
    empty = collate([], pad_id=0)
    assert responses(torch.zeros(empty["loss_mask"].shape), empty).chosen.numel() == 0


@pytest.mark.unit
def test_preference_loss_with_rpo_alpha_adds_the_mean_chosen_nll():
    batch = pair_batch([(0, 2, 2), (0, 4, 1)])
    ce = torch.rand(batch["loss_mask"].shape) * batch["loss_mask"]
    policy = responses(ce, batch)
    reference = responses(ce * 1.1, batch)
    plain = PreferenceLoss("dpo", 0.1, None, "case2", torch.ones(1)).losses(policy, reference)
    rpo = PreferenceLoss("dpo", 0.1, 0.5, "case2", torch.ones(1)).losses(policy, reference)
    nll = ce[0::2].sum(1) / batch["loss_mask"][0::2].sum(1)
    assert (rpo.loss - plain.loss).tolist() == pytest.approx((0.5 * nll).tolist(), rel=1e-6)


@pytest.mark.unit
def test_pair_modes_normalise_over_the_whole_step():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    tasks = torch.tensor([0, 0, 0, 1, 2])
    counts = pair_counts(tasks, 4)
    assert counts.tolist() == [3, 1, 1, 0]
    case2 = (pair_coefficients("case2", tasks, counts, torch.ones(4)) * losses).sum()
    assert float(case2) == pytest.approx(20 / 5)
    # case3: each task's mean pair loss, averaged over the tasks present (task 3 has no pair: no NaN)
    weights = torch.tensor([1.0, 1.0, 2.0, 5.0])
    case3 = (pair_coefficients("case3", tasks, counts, weights) * losses).sum()
    assert float(case3) == pytest.approx((2.0 + 4.0 + 2 * 10.0) / 4)
    # Micro-batches of the step, each with the step's counts, add up to the same objective.
    parts = sum(
        float((pair_coefficients("case3", tasks[s], counts, weights) * losses[s]).sum())
        for s in (slice(0, 2), slice(2, 5))
    )
    assert parts == pytest.approx(float(case3))


# --- the data -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_preference_record_layouts():
    chosen, rejected = parse_preference(
        {"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4", "system": "Be brief."}
    )
    assert chosen == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 1 and 2."},
        {"role": "assistant", "content": "3"},
    ]
    assert rejected[:-1] == chosen[:-1] and rejected[-1] == {"role": "assistant", "content": "4"}
    turns = [{"role": "human", "content": "Add 1 and 2."}, {"role": "bot", "content": "3"}]
    xxpo = parse_preference({"chosen": turns, "rejected": [turns[0], {"role": "bot", "content": "4"}]})
    assert xxpo == (chosen[1:], rejected[1:])
    trl = parse_preference({"prompt": turns[:1], "chosen": [{"role": "assistant", "content": "3"}], "rejected": "4"})
    assert trl == (chosen[1:], rejected[1:])


@pytest.mark.unit
@pytest.mark.parametrize(
    "record, field",
    [
        ({"prompt": "q", "chosen": "a"}, "rejected"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, "rejected"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "chosen": "a", "rejected": "b"},
         "prompt"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen[0].role"),
        ({"chosen": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}],
          "rejected": [{"role": "human", "content": "other"}, {"role": "bot", "content": "b"}]}, "rejected"),
    ],
)  # fmt: skip
def test_bad_preference_records_name_the_field(record, field):
    with pytest.raises(BadRecord) as caught:
        parse_preference(record)
    assert caught.value.field == field


@pytest.mark.unit
def test_bad_preference_line_is_reported_by_file_and_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q"}))
    with pytest.raises(DataError, match=rf"{path}:2: chosen: missing"):
        read_task(str(path), preference=True)
    # And an SFT run names the setting that reads such records.
    with pytest.raises(DataError, match="training_stage: dpo or orpo"):
        read_task(str(path))


@pytest.mark.unit
def test_pairs_score_only_the_response_and_count_over_length(tmp_path, demo_tokenizer):
    from mftcoder.data.dataset import build_datasets
    from mftcoder.data.template import chat_format

    task = tmp_path / "pairs"
    task.mkdir()
    prompt = [
        {"role": "human", "content": "Say hi."},
        {"role": "bot", "content": "hi"},
        {"role": "human", "content": "Again."},
    ]
    lines = [{"prompt": prompt, "chosen": "hi", "rejected": "no"} for _ in range(6)]
    lines.append({"prompt": "long", "chosen": "x " * 400, "rejected": "no"})
    (task / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    raw = dpo_config([str(task)], tmp_path / "out", data_split=[0.75, 0.25], seq_length=64)
    config = validate_mapping(raw | {"cache_dir": str(tmp_path / "cache")})
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    report = data.report["pairs"]
    assert (report.records, report.dropped_overlength, report.train_samples + report.valid_samples) == (7, 1, 6)
    assert data.train.units == report.train_samples and data.train.paired
    batch = data.train.batch([0, 1], pad_id=0)
    assert batch["input_ids"].shape[0] == 4  # chosen, rejected, chosen, rejected
    first = data.train.unit(0)
    for sample, response in zip(first, ("hi", "no"), strict=True):
        scored = demo_tokenizer.decode(sample.input_ids[sample.loss_mask.astype(bool)])
        assert scored == f"{response}\n{demo_tokenizer.eos_token}"  # the earlier assistant turn "hi" is not scored

    config = validate_mapping(raw | {"cache_dir": str(tmp_path / "cache"), "overlength": "truncate", "seq_length": 64})
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    assert data.report["pairs"].truncated == 1
    cut = [data.train.unit(u) for u in range(data.train.units)] + [data.valid.unit(u) for u in range(data.valid.units)]
    long = next(pair for pair in cut if len(pair[0].input_ids) == 64)
    # The same prompt tokens were cut from both: they still share their first (prompt) token.
    assert long[0].input_ids[0] == long[1].input_ids[0] and not long[0].loss_mask[:1].any()


@pytest.mark.unit
def test_preference_settings_are_checked_together(pairs_data, tmp_path):
    with pytest.raises(ConfigError) as caught:
        validate_mapping(
            dpo_config(pairs_data, tmp_path / "out", training_stage="orpo", weighted_loss_mode="coba",
                       padding_mode="pack", rpo_alpha=0.5)
        )  # fmt: skip
    fields = {issue.field for issue in caught.value.issues}
    assert {"weighted_loss_mode", "padding_mode", "rpo_alpha"} <= fields
    with pytest.raises(ConfigError, match="training_stage"):
        validate_mapping(dpo_config(pairs_data, tmp_path / "out", training_stage="ppo"))
    with pytest.raises(ConfigError, match="rpo_alpha"):
        validate_mapping(dpo_config(pairs_data, tmp_path / "out", training_stage="sft", rpo_alpha=0.1))


# --- runs on the demo model ---------------------------------------------------------------------


@pytest.mark.e2e
def test_dpo_raises_the_held_out_margin(pairs_data, tmp_path):
    """Before training the LoRA policy is its reference (margin 0 on the held-out pairs); 10 DPO steps
    later the held-out real answers are preferred to their corrupted copies."""
    from mftcoder.training.preference import evaluate_pairs
    from mftcoder.training.trainer import Trainer, train

    config = validate_mapping(dpo_config(pairs_data, tmp_path / "out", max_train_steps=10, evaluation_steps=5))
    trainer = Trainer(config)
    run = trainer.setup()
    before = evaluate_pairs(run, trainer.accelerator, run.data.valid, 8)
    assert before.extra["margin"] == pytest.approx(0.0, abs=1e-6)
    assert before.loss == pytest.approx(math.log(2), rel=1e-5)
    reset_accelerate()

    result = train(config.model_copy(update={"overwrite_output_dir": True}))
    assert result.steps == 10
    records = read_metrics(result.output_dir)
    valid = [r for r in records if r["split"] == "valid"]
    after = valid[-1]
    assert after["step"] == 10
    assert after["margin"] > 1.0 and after["accuracy"] >= 0.9, after
    assert after["loss"] < before.loss
    assert set(after["task_preference"]) == set(DEMO_TASKS)
    train_lines = [r for r in records if r["split"] == "train"]
    assert {"rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= set(train_lines[-1])
    assert set(train_lines[-1]["task_loss"]) <= set(DEMO_TASKS)


@pytest.mark.e2e
def test_orpo_trains_without_a_reference(pairs_data, tmp_path):
    from mftcoder.training.trainer import train

    result = train(validate_mapping(dpo_config(pairs_data, tmp_path / "out", training_stage="orpo", max_train_steps=3)))
    records = read_metrics(result.output_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    valid = records[-1]
    assert valid["split"] == "valid" and all(math.isfinite(valid[k]) for k in ("loss", "margin", "accuracy"))
    # ORPO's loss includes the chosen NLL: well above the odds-ratio term's λ·log 2 on a random model.
    assert valid["loss"] > 1.0


@pytest.mark.e2e
def test_mftcoder_dpo_sample_config_runs_two_steps(pairs_data, tmp_path):
    from test_mftcoder_config import instantiate_sample

    from mftcoder.cli import main
    from mftcoder.run_config import load_config

    workspace = {
        "task_a": Path(pairs_data[0]),
        "task_b": Path(pairs_data[1]),
        "model": DEMO_MODEL,
        "output": tmp_path / "out",
        "tmp": tmp_path,
    }
    path = instantiate_sample("dpo", workspace)
    overrides = ["model_init=from_config", "max_train_steps=2"]
    config = load_config(path, overrides, notice=lambda _: None)
    assert (config.training_stage, config.beta, config.rpo_alpha) == ("dpo", 0.1, 0.5)
    assert main(["train", str(path), *overrides]) == 0
    records = read_metrics(tmp_path / "out")
    assert [r["step"] for r in records if r["split"] == "train"] == [2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.dist
def test_two_processes_equal_one_process(pairs_data, tmp_path):
    """DPO with 2 ranks × 1 pair × 2 accumulation steps makes the updates of 1 rank × 4 pairs."""
    from test_distributed import launch_two

    from mftcoder.cli import main
    from mftcoder.config import dump_config

    raw = dpo_config(pairs_data, tmp_path / "unused", max_train_steps=3, learning_rate=2e-2)
    config_file = tmp_path / "dpo.yaml"
    config_file.write_text(dump_config(validate_mapping(raw | {"adam_epsilon": EQUIVALENCE_ADAM_EPSILON})))
    launch_two(config_file, tmp_path / "ddp")
    serial = ["per_device_train_batch_size=4", "gradient_accumulation_steps=1"]
    assert main(["train", str(config_file), f"output_dir={tmp_path / 'serial'}", *serial]) == 0

    ddp = load_file(tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    one = load_file(tmp_path / "serial" / "final" / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], atol=1e-6, rtol=1e-5)
    lines = [[r for r in read_metrics(tmp_path / out) if r["split"] == "train"] for out in ("ddp", "serial")]
    assert [r["step"] for r in lines[0]] == [r["step"] for r in lines[1]] == [1, 2, 3]
    for a, b in zip(*lines, strict=True):
        for key in ("loss", "grad_norm", "margin", "accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
        assert a["task_loss"] == pytest.approx(b["task_loss"], rel=1e-5)


@pytest.mark.e2e
def test_killed_and_resumed_dpo_run_is_exact(pairs_data, tmp_path):
    from test_resume import assert_same_run, finish, interrupt_at, launch, reference_run, resumed_step, write_config

    settings = {"training_stage": "dpo", "max_train_steps": 9, "evaluation_steps": 4}
    reference = reference_run(tmp_path, pairs_data, **settings)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", pairs_data, out, **settings)
    process = launch(config)
    interrupt_at(process, out, random.randint(4, 7), signal.SIGKILL)
    process.wait(timeout=60)
    code, output = finish(launch(config, "resume_from_checkpoint=auto"))
    assert code == 0, output[-3000:]
    start = resumed_step(output)
    assert f"finished at step 9 ({9 - start} steps in this process)" in output
    assert_same_run(out, reference)
