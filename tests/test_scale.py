"""The shipped Accelerate presets, each through a real 2-process `accelerate launch` on CPU.

Every launch is `accelerate launch --config_file configs/accelerate/X.yaml --num_processes 2` with
no special environment variable: mftcoder must select the CPU, gloo and DeepSpeed itself (a
multi-node preset runs as two such launchers of one process each, as on two machines). Each test
asserts the world size and distributed type the run really got (run.json), and that the ranks
trained as one: the saved final weights equal those of a 1-process run on the same global batch
(2 processes x 1 sample x 2 accumulation steps = 1 process x 4 samples). Under ZeRO the saved
weights are gathered from both ranks' shards (and under ZeRO-2 each rank updates its own slice of
the weights before they are all-gathered), so a rank that drifted, saw other samples or was not
connected shows in the saved weights: training on half the global batch moves them by 6e-2 here,
while float noise from other reduction orders stays below ~2e-5 (measured 8e-6 to 2.1e-5 for
DDP, ZeRO-2, ZeRO-3 and FSDP2).

The equivalence runs pass `--mixed_precision no` so that they compare in fp32 against the 1-process
run; the presets' own bf16 is exercised by the ZeRO-3 `from_config` run. The first DeepSpeed launch
on a machine JIT-compiles DeepSpeed's shm_comm op (about 60 s, cached under ~/.cache/torch_extensions);
the offload presets also compile cpu_adam (about 100 s) and are marked slow.

FSDP: accelerate 1.15 does not run FSDP on CPU (it silently becomes DDP), so mftcoder refuses it
there (tests/test_launch.py); see test_fsdp2_* below for how our FSDP path is still tested on CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_MODEL, EQUIVALENCE_ADAM_EPSILON, REPO, launch_env
from safetensors.torch import load_file

from mftcoder.cli import main
from mftcoder.config import dump_config
from mftcoder.run_config import validate_mapping

PRESETS = REPO / "configs" / "accelerate"
LAUNCH_TIMEOUT = 900
STEPS = 3
DIST = ["per_device_train_batch_size=1", "gradient_accumulation_steps=2"]
SERIAL = ["per_device_train_batch_size=4", "gradient_accumulation_steps=1"]
FULL = ["peft_type=null", "learning_rate=1e-3"]


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="module")
def tiny_base(root) -> Path:
    """A saved random tiny Llama: loaded with from_pretrained, it is the same model under ZeRO-3's
    sharded construction (zero.Init) as in one process, unlike a from_config initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL))
    model.save_pretrained(root / "tiny")
    return root / "tiny"


@pytest.fixture(scope="module")
def config_file(root, small_data, tiny_base) -> Path:
    config = validate_mapping(
        {
            "pretrained_model_path": str(tiny_base),
            "tokenizer_path": str(DEMO_MODEL),
            "data_paths": small_data,
            "data_split": [0.9, 0.1],
            "seq_length": 512,
            "output_dir": str(root / "unused"),  # every run overrides it
            "peft_type": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,  # dropout masks would differ between the layouts
            "per_device_eval_batch_size": 8,
            "learning_rate": 2e-2,
            "adam_epsilon": EQUIVALENCE_ADAM_EPSILON,
            "num_warmup_steps": 0,
            "max_train_steps": STEPS,
            "log_interval": 1,
            "evaluation_steps": None,
            "checkpointing_steps": None,
            "early_stopping": False,
            "seed": 7,
        }
    )
    path = root / "train.yaml"
    path.write_text(dump_config(config))
    return path


def free_port() -> int:
    """A port nothing listens on now: launchers that must all be told the same one cannot use 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_together(commands: list[list[str]], cwd: Path) -> list[str]:
    """Runs the commands at the same time and returns their consoles. They wait for each other in the
    rendezvous and the collectives, so once one fails the others are stopped rather than left waiting
    for their timeout; each runs in its own session so that stopping it reaches its workers too."""
    with contextlib.ExitStack() as files:
        logs = [files.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
        procs = [
            subprocess.Popen(
                command, env=launch_env(), stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                start_new_session=True,
            )
            for command, log in zip(commands, logs, strict=True)
        ]  # fmt: skip
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if None not in codes or any(codes):
                break
            time.sleep(0.5)
        timed_out = time.monotonic() >= deadline
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        consoles = []
        for log in logs:
            log.seek(0)
            consoles.append(log.read())
    failed = [
        f"launch {i} ({p.returncode}):\n{c[-6000:]}"
        for i, (p, c) in enumerate(zip(procs, consoles, strict=True))
        if p.returncode
    ]
    assert not failed, (f"timed out after {LAUNCH_TIMEOUT} s\n" if timed_out else "") + "\n".join(failed)
    return consoles


def launch(
    config_file: Path, preset: str, name: str, *overrides: str,
    flags=("--mixed_precision", "no"), entry=("-m", "mftcoder"), machines=1,
):  # fmt: skip
    """One 2-process run of `preset`; returns (output_dir, run.json, console). With machines=2 the two
    processes are two launchers of one process each, started together on this host as on two nodes
    (machine 0 holds the rendezvous); the console is then machine 0's, where the main process prints."""
    out = config_file.parent / name
    if machines == 1:
        placements = [["--main_process_port", "0"]]
    else:
        port = str(free_port())
        placements = [
            ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port]
            for rank in range(machines)
        ]  # fmt: skip
    commands = [
        [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PRESETS / preset),
            "--num_processes", "2", *placement, *flags,
            *entry, "train", str(config_file), f"output_dir={out}", *DIST, *overrides,
        ]
        for placement in placements
    ]  # fmt: skip
    consoles = run_together(commands, cwd=config_file.parent)
    return out, json.loads((out / "run.json").read_text()), consoles[0]


def serial(config_file: Path, name: str, *overrides: str) -> Path:
    out = config_file.parent / name
    assert main(["train", str(config_file), f"output_dir={out}", *SERIAL, *overrides]) == 0
    return out


# A checkpoint mid-run, for the runs that compare theirs (the last step has one: its evaluation is the best).
@pytest.fixture(scope="module")
def serial_lora(config_file) -> Path:
    return serial(config_file, "serial-lora", "checkpointing_steps=2")


@pytest.fixture(scope="module")
def serial_full(config_file) -> Path:
    return serial(config_file, "serial-full", *FULL, "checkpointing_steps=2")


# --- checks ------------------------------------------------------------------------------------
def train_records(out: Path) -> list[dict]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def assert_world(info: dict, console: str, distributed: str) -> None:
    assert info["world_size"] == 2, info
    assert info["distributed_type"] == distributed, info
    assert info["global_batch_size"] == 4, info
    assert f"mftcoder: world_size=2 distributed={distributed}" in console, console[-3000:]


def assert_same_weights(ours_file: Path, theirs_file: Path) -> None:
    """The same saved weights, to float noise."""
    ours, theirs = load_file(ours_file), load_file(theirs_file)
    assert ours.keys() == theirs.keys()
    diffs = torch.cat([(ours[k].float() - theirs[k].float()).abs().flatten() for k in theirs])
    assert diffs.max().item() < 1e-4, f"max |diff| {diffs.max().item():.3e}"
    assert diffs.quantile(0.999).item() < 1e-6, f"99.9th percentile |diff| {diffs.quantile(0.999).item():.3e}"


def assert_same_run(out: Path, reference: Path, weights: str, rel: float = 1e-5) -> None:
    """Same saved weights (to float noise) and the same logged loss and gradient norm per step."""
    assert_same_weights(out / "final" / weights, reference / "final" / weights)
    records, expected = train_records(out), train_records(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in expected], rel=rel, abs=1e-6), key


def assert_adapter_trained(out: Path) -> None:
    """LoRA's B starts at zero: a trained adapter has moved it far beyond the float noise above."""
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 1e-3


def reload_adapter(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 33).unsqueeze(0)).logits


# --- the presets ---------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_parses_and_leaves_the_batch_to_the_train_config(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    preset = load_config_from_file(str(path))
    assert preset.num_processes == -1, "the number of processes is given at launch, never fixed in a preset"
    assert preset.use_cpu is False, "use_cpu turns DeepSpeed off; mftcoder selects the CPU itself"
    assert preset.mixed_precision == "bf16"
    ds = preset.deepspeed_config or {}
    for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu"):
        assert ds.get(key, "auto") == "auto", f"{key}: the train config is its only source"
    if preset.distributed_type == DistributedType.DEEPSPEED:
        assert ds["zero_stage"] in (2, 3)
        if ds["zero_stage"] == 3:
            assert ds["zero3_save_16bit_model"] is True
        assert ds["offload_optimizer_device"] == ("cpu" if "offload" in path.name else "none")
    if preset.distributed_type == DistributedType.FSDP:
        fsdp = preset.fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp, "the model's _no_split_modules decide"


@pytest.mark.unit
def test_the_issue_names_every_preset():
    names = {p.name for p in PRESETS.glob("*.yaml")}
    expected = {"ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero2_offload.yaml", "deepspeed_zero3.yaml",
                "deepspeed_zero3_offload.yaml", "fsdp2.yaml"}  # fmt: skip
    assert expected <= names
    assert any(name.startswith("multinode_") for name in names)


# --- 2-process runs ------------------------------------------------------------------------------
@pytest.mark.dist
def test_ddp_preset_lora_trains_as_one_run(config_file, serial_lora):
    out, info, console = launch(config_file, "ddp.yaml", "ddp-lora")
    assert_world(info, console, "MULTI_CPU")
    assert info["deepspeed"] is False and info["fsdp"] is False
    assert_same_run(out, serial_lora, "adapter_model.safetensors")
    assert_adapter_trained(out)


@pytest.mark.dist
def test_zero2_lora_trains_as_one_run(config_file, serial_lora):
    out, info, console = launch(config_file, "deepspeed_zero2.yaml", "zero2-lora")
    assert_world(info, console, "DEEPSPEED")
    assert info["deepspeed"]["zero_stage"] == 2 and info["deepspeed"]["offload_optimizer"] == "none"
    assert info["mixed_precision"] == "no"
    assert_same_run(out, serial_lora, "adapter_model.safetensors")
    assert_adapter_trained(out)


@pytest.mark.dist
def test_zero3_lora_trains_as_one_run_and_its_16bit_save_reloads(config_file, serial_lora, tiny_base):
    out, info, console = launch(config_file, "deepspeed_zero3.yaml", "zero3-lora")
    assert_world(info, console, "DEEPSPEED")
    assert info["deepspeed"]["zero_stage"] == 3 and info["deepspeed"]["gather_16bit_on_save"] is True
    assert_same_run(out, serial_lora, "adapter_model.safetensors")
    assert_adapter_trained(out)
    # The adapter gathered from the shards loads onto the base and equals the 1-process adapter in use.
    sharded, one = reload_adapter(tiny_base, out / "final"), reload_adapter(tiny_base, serial_lora / "final")
    assert (logits(sharded) - logits(one)).abs().max().item() < 1e-3


@pytest.mark.dist
def test_zero3_coba_evaluates_uneven_validation_draws_and_trains_as_one_run(config_file):
    """CoBa's draws of 3 validation samples, one per batch, over 2 ranks: one rank has a batch more,
    and under ZeRO-3 every forward gathers the parameters from all ranks, so a rank that skipped a
    forward would leave the other waiting (the launch would hit its timeout). The run makes the
    updates and the weights of one process."""
    coba = [
        "weighted_loss_mode=coba", "coba_warmup_steps=1", "coba_history_length=3",
        "coba_sample_valid_num=3", "per_device_eval_batch_size=1",
    ]  # fmt: skip
    out, info, console = launch(config_file, "deepspeed_zero3.yaml", "zero3-coba", *coba)
    assert_world(info, console, "DEEPSPEED")
    reference = serial(config_file, "serial-coba", *coba)
    assert_same_run(out, reference, "adapter_model.safetensors")
    weights, expected = ([r["task_weight"] for r in train_records(run)] for run in (out, reference))
    assert all(w == pytest.approx(e, rel=1e-4) for w, e in zip(weights, expected, strict=True)), (weights, expected)
    assert weights[-1] != pytest.approx(weights[0], rel=1e-3)  # CoBa did move them


@pytest.mark.dist
def test_zero3_full_fine_tuning_trains_as_one_run_and_its_16bit_save_reloads(config_file, serial_full, tiny_base):
    from transformers import AutoModelForCausalLM

    out, info, console = launch(config_file, "deepspeed_zero3.yaml", "zero3-full", *FULL)
    assert_world(info, console, "DEEPSPEED")
    assert info["deepspeed"]["zero_stage"] == 3
    assert_same_run(out, serial_full, "model.safetensors")
    trained, base = load_file(out / "final" / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-3
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(serial_full / "final", dtype=torch.float32).eval()
    assert (logits(reloaded) - logits(reference)).abs().max().item() < 1e-3


@pytest.fixture(scope="module")
def zero3_from_config(config_file):
    """ZeRO-3 LoRA in the preset's own bf16, the model built from its config (as the demo does)."""
    return launch(
        config_file, "deepspeed_zero3.yaml", "zero3-from-config", "model_init=from_config",
        f"pretrained_model_path={DEMO_MODEL}", flags=(),
    )  # fmt: skip


@pytest.mark.dist
def test_zero3_runs_in_the_presets_bf16(zero3_from_config):
    out, info, console = zero3_from_config
    assert_world(info, console, "DEEPSPEED")
    assert info["mixed_precision"] == "bf16"
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert_adapter_trained(out)


@pytest.mark.dist
def test_zero3_from_config_saves_the_real_base_model(zero3_from_config):
    from transformers import AutoConfig

    out, _, _ = zero3_from_config
    base = load_file(out / "base_model" / "model.safetensors")
    hidden = AutoConfig.from_pretrained(DEMO_MODEL).hidden_size
    assert base["model.embed_tokens.weight"].shape[1] == hidden
    assert all(t.numel() > 0 for t in base.values())
    assert torch.isfinite(logits(reload_adapter(out / "base_model", out / "final"))).all()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["deepspeed_zero2_offload.yaml", "deepspeed_zero3_offload.yaml"])
def test_offload_presets_lora_train_as_one_run(preset, config_file, serial_lora):
    """DeepSpeed swaps the torch AdamW for its CPU Adam here (JIT-compiled on first use, ~100 s)."""
    out, info, console = launch(config_file, preset, preset.removesuffix(".yaml"))
    assert_world(info, console, "DEEPSPEED")
    assert info["deepspeed"]["offload_optimizer"] == "cpu"
    assert info["optimizer"] == "DeepSpeedCPUAdam(adamw_mode=True)"
    assert_same_run(out, serial_lora, "adapter_model.safetensors")
    assert_adapter_trained(out)


# --- a non-finite step under DeepSpeed -----------------------------------------------------------
# DeepSpeed applies (or skips) the update inside the last backward, before the trainer sees the
# gradient norm; this entry point poisons rank 0's loss at step 2 so the run can show what it did.
POISON_STEP_2 = """
import sys

import torch.distributed as dist

from mftcoder.cli import main
from mftcoder.training import step

real = step.forward_token_losses
calls = {"n": 0}


def poisoned(model, batch):
    calls["n"] += 1
    ce = real(model, batch)
    return ce * float("nan") if calls["n"] == 2 and dist.get_rank() == 0 else ce


step.forward_token_losses = poisoned
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.dist
def test_zero2_non_finite_step_is_skipped_by_deepspeed_and_reported_as_such(config_file, root):
    """One micro-batch per step and rank: rank 0's NaN loss at step 2 makes the all-reduced gradients
    NaN. The update is reported skipped because the engine skipped it (the weights before and after
    step 2 are equal), and training goes on."""
    entry = root / "poison_step_2.py"
    entry.write_text(POISON_STEP_2)
    out, info, console = launch(
        config_file, "deepspeed_zero2.yaml", "zero2-nan", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
        "checkpointing_steps=1", "on_nan=skip", entry=(str(entry),),
    )  # fmt: skip
    assert info["world_size"] == 2 and info["distributed_type"] == "DEEPSPEED", info
    assert "step 2: non-finite loss or gradient norm" in console and "update skipped (1 so far)" in console
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 3] and records[-1]["skipped_steps"] == 1
    weights = {n: load_file(out / "checkpoints" / f"step-{n}" / "adapter_model.safetensors") for n in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1]), "DeepSpeed applied the NaN update"
    assert all(torch.isfinite(t).all() for t in weights[3].values())
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2]), "training did not go on"


# --- the demo config as shipped, under each preset ---------------------------------------------
@pytest.fixture(scope="module")
def demo_config(root) -> Path:
    """configs/train/demo.yaml unchanged but for its relative paths, anchored at the repository."""
    raw = yaml.safe_load((REPO / "configs" / "train" / "demo.yaml").read_text())
    raw["pretrained_model_path"] = str(REPO / raw["pretrained_model_path"])
    raw["data_paths"] = [str(REPO / path) for path in raw["data_paths"]]
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


PRESET_DISTRIBUTED = {
    "ddp.yaml": "MULTI_CPU",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    "fsdp2.yaml": "FSDP",
    "multinode_ddp.yaml": "MULTI_CPU",
    "multinode_deepspeed_zero2.yaml": "DEEPSPEED",
}


@pytest.mark.dist
@pytest.mark.parametrize(
    "preset",
    [*PRESET_DISTRIBUTED]
    + [
        pytest.param(p, marks=pytest.mark.slow)
        for p in ("deepspeed_zero2_offload.yaml", "deepspeed_zero3_offload.yaml")
    ],
)
def test_every_preset_runs_the_demo_config_as_shipped(preset, demo_config, fsdp_entry):
    """The demo's own batch, bf16 from the preset and LoRA with embeddings and head trained in full
    (`lora_modules_to_save`): the adapter's fp32 matrices and the full copies of bf16 base modules
    must reach the optimizer in one dtype (ZeRO-3 refuses a mix). FSDP2 (on CPU through `fsdp_entry`)
    computes in bf16 through its mixed-precision policy alone. The multi-node presets run as two machines
    of one process each."""
    shipped = ["per_device_train_batch_size=8", "gradient_accumulation_steps=1"]  # undo the launch's DIST
    entry = fsdp_entry if preset == "fsdp2.yaml" else ("-m", "mftcoder")
    machines = 2 if preset.startswith("multinode_") else 1
    out, info, console = launch(
        demo_config, preset, f"demo-{preset}", *shipped, "max_train_steps=2", flags=(), entry=entry, machines=machines
    )  # fmt: skip
    assert info["world_size"] == 2 and info["global_batch_size"] == 16, info
    assert info["distributed_type"] == PRESET_DISTRIBUTED.get(preset, "DEEPSPEED")
    assert info["mixed_precision"] == "bf16"
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    adapter, base = (
        load_file(out / "final" / "adapter_model.safetensors"),
        load_file(out / "base_model" / "model.safetensors"),
    )
    for module in ("model.embed_tokens", "lm_head"):
        trained = adapter[f"base_model.model.{module}.weight"].float()
        assert trained.shape == base[f"{module}.weight"].shape
        assert (trained - base[f"{module}.weight"].float()).abs().max().item() > 1e-3, f"{module} was not trained"
    assert_adapter_trained(out)


# --- several machines ----------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize(
    ("preset", "distributed"),
    [("multinode_ddp.yaml", "MULTI_CPU"), ("multinode_deepspeed_zero2.yaml", "DEEPSPEED")],
)
def test_multinode_preset_on_two_machines_trains_as_one_run(preset, distributed, config_file, serial_lora):
    """The preset's own command, run once per machine: two launchers on this host stand for two
    nodes of one process each, meeting at machine 0's address (torchrun's static rendezvous, for
    DeepSpeed through its `standard` multi-node launcher). A world of 2 can only come from the two
    launchers connecting, and the weights show that both ranks trained on their share of each step.
    A checkpoint holds a file from each machine's process."""
    name = preset.removesuffix(".yaml")
    out, info, console = launch(config_file, preset, name, "checkpointing_steps=2", machines=2)
    assert_world(info, console, distributed)
    assert info["optimizer"] == "adamw"
    assert_same_run(out, serial_lora, "adapter_model.safetensors")
    assert_adapter_trained(out)
    assert sorted(p.name for p in (out / "checkpoints" / "step-2").glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]


# --- FSDP2 -----------------------------------------------------------------------------------------
# Run through `fsdp_entry` (FSDP_ON_CPU in conftest.py), which makes accelerate run FSDP2 on CPU. Tested
# this way: the preset (auto-wrap from the model's own _no_split_modules), the trainer's prepare, loop,
# no_sync and clipping under FSDP2, in fp32 and in the preset's bf16 (the demo config above), the
# full-state gather for final/, checkpoints and best/, LoRA with modules_to_save on a tied model, 4-bit
# QLoRA with its weights sharded (dense, and MoE as in the shipped Mixtral recipe), and the reloads;
# kill-and-resume is in tests/test_resume.py. Not tested on CPU: build_accelerator's own FSDP branch,
# which needs GPUs (test_fsdp2_on_gpus).


def assert_sharded_per_decoder_layer(console: str, layer: str = "LlamaDecoderLayer") -> None:
    # Anywhere in a line: the other rank's progress bars (carriage returns, no newline) can come first.
    line = next(line[line.index("fully_shard: ") :] for line in console.splitlines() if "fully_shard: " in line)
    assert f"FSDP{layer}" in line, line  # from the model class's _no_split_modules, named nowhere


def assert_saved_as_one_run(out: Path, reference: Path, weights: str, reload) -> None:
    """final/, the checkpoint of step 2 and best/ hold what the 1-process run saved there (the weights
    are gathered from the shards at each save) and `reload` loads each into the same model. best/ is
    the export of the last step's checkpoint, whose evaluation is the best, without training state."""
    for saved in ("final", "checkpoints/step-2", "best"):
        assert_same_weights(out / saved / weights, reference / saved / weights)
        assert (logits(reload(out / saved)) - logits(reload(reference / saved))).abs().max().item() < 1e-3, saved
    assert json.loads((out / "best" / "trainer_state.json").read_text())["progress"]["step"] == STEPS
    assert {"state", "scheduler.pt", "rank-0.pt", "rank-1.pt"}.isdisjoint(p.name for p in (out / "best").iterdir())


@pytest.mark.dist
def test_fsdp2_lora_trains_as_one_run_and_its_gathered_adapters_reload(config_file, serial_lora, fsdp_entry, tiny_base):
    out, info, console = launch(config_file, "fsdp2.yaml", "fsdp2-lora", "checkpointing_steps=2", entry=fsdp_entry)
    assert_world(info, console, "FSDP")
    assert info["fsdp"] == {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}
    assert_sharded_per_decoder_layer(console)
    assert_same_run(out, serial_lora, "adapter_model.safetensors")
    assert_adapter_trained(out)
    assert_saved_as_one_run(out, serial_lora, "adapter_model.safetensors", lambda path: reload_adapter(tiny_base, path))


@pytest.mark.dist
def test_fsdp2_full_fine_tuning_gathers_full_state_dicts_that_reload(config_file, serial_full, fsdp_entry):
    from transformers import AutoModelForCausalLM

    out, info, console = launch(
        config_file, "fsdp2.yaml", "fsdp2-full", *FULL, "checkpointing_steps=2", entry=fsdp_entry
    )  # fmt: skip
    assert_world(info, console, "FSDP")
    assert_sharded_per_decoder_layer(console)
    assert_same_run(out, serial_full, "model.safetensors")
    assert_saved_as_one_run(
        out, serial_full, "model.safetensors",
        lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tied_base(root) -> Path:
    """tiny_base's architecture with the head tied to the input embeddings, as in Gemma 2."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(DEMO_MODEL)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "tied")
    return root / "tied"


@pytest.mark.dist
def test_fsdp2_lora_with_modules_to_save_on_a_tied_model_trains_and_merges(config_file, fsdp_entry, tied_base):
    """Embeddings and head trained in full (`lora_modules_to_save`) where the head is tied to the
    embeddings: one trained copy serves both, in one process as under FSDP2 (separate copies would put
    the frozen weight they share in two FSDP groups, which fully_shard refuses at the first forward),
    and `mftcoder merge` folds it into a model that is still tied."""
    from transformers import AutoModelForCausalLM

    from mftcoder.merge import merge_adapter

    tied = [f"pretrained_model_path={tied_base}", "lora_modules_to_save=[embed_tokens,lm_head]"]
    out, info, console = launch(config_file, "fsdp2.yaml", "fsdp2-tied", *tied, entry=fsdp_entry)
    assert_world(info, console, "FSDP")
    reference = serial(config_file, "serial-tied", *tied)
    # The gradient of a whole embedding matrix sums over every token: the other micro-batch shapes
    # reorder those sums, which moves its norm by up to ~3e-5 (relative), as without tying.
    assert_same_run(out, reference, "adapter_model.safetensors", rel=1e-4)
    assert_adapter_trained(out)
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    embeddings, head = adapter["base_model.model.model.embed_tokens.weight"], adapter["base_model.model.lm_head.weight"]
    assert torch.equal(embeddings, head)
    base = load_file(tied_base / "model.safetensors")["model.embed_tokens.weight"]
    assert (embeddings - base).abs().max().item() > 1e-3, "the embeddings were not trained"
    sharded, one = reload_adapter(tied_base, out / "final"), reload_adapter(tied_base, reference / "final")
    assert (logits(sharded) - logits(one)).abs().max().item() < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(out / "final", out / "merged"), dtype=torch.float32)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert (logits(merged.eval()) - logits(sharded)).abs().max().item() < 1e-4


@pytest.mark.dist
def test_fsdp2_qlora_shards_the_4bit_weights_and_trains_as_one_run(config_file, fsdp_entry):
    """4-bit QLoRA packs its weights in a float dtype (bnb_4bit_quant_storage), so FSDP2 shards them
    like any weight: no parameter stays whole on every rank (with bitsandbytes' default uint8 packing
    accelerate leaves every 4-bit weight out of the sharding)."""
    out, info, console = launch(config_file, "fsdp2.yaml", "fsdp2-qlora", "peft_type=qlora", entry=fsdp_entry)
    assert_world(info, console, "FSDP")
    assert "not sharded: []" in console, console[-3000:]
    reference = serial(config_file, "serial-qlora", "peft_type=qlora")
    assert_same_run(out, reference, "adapter_model.safetensors")
    assert_adapter_trained(out)


@pytest.mark.dist
def test_fsdp2_runs_the_shipped_mixtral_qlora_recipe_on_a_tiny_mixtral(config_file, fsdp_entry, root):
    """What scripts/mixtral_8x7b_qlora.sh combines, the one shipped recipe on fsdp2.yaml: a MoE model,
    4-bit QLoRA with LoRA on the fused experts, gradient checkpointing and the preset's bf16; here the
    model is built from its config, so the QLoRA base is first saved, then loaded back quantised."""
    from test_moe_training import tiny_mixtral

    model = tiny_mixtral(root / "mixtral", coefficient=0.02)
    recipe = ["peft_type=qlora", "gradient_checkpointing=true", "model_init=from_config"]
    out, info, console = launch(
        config_file, "fsdp2.yaml", "fsdp2-mixtral-qlora", f"pretrained_model_path={model}", *recipe,
        flags=(), entry=fsdp_entry,
    )  # fmt: skip
    assert_world(info, console, "FSDP")
    assert info["mixed_precision"] == "bf16"
    assert_sharded_per_decoder_layer(console, "MixtralDecoderLayer")
    assert "not sharded: []" in console, console[-3000:]
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["aux_loss"]) for r in records)
    assert_adapter_trained(out)
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert any(".mlp.experts." in k and "lora_B" in k and t.abs().max() > 1e-3 for k, t in adapter.items())


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP through accelerate needs 2 CUDA GPUs")
def test_fsdp2_on_gpus(config_file, serial_lora):
    """The product path itself (launch.build_accelerator, no override) where accelerate runs FSDP."""
    out, info, console = launch(config_file, "fsdp2.yaml", "fsdp2-gpu")
    assert_world(info, console, "FSDP")
    assert info["fsdp"]["version"] == 2
    assert_adapter_trained(out)


# --- the per-model scripts -----------------------------------------------------------------------
# demo*.sh run configs/train/demo*.yaml end to end on a CPU; the others launch a model config on GPUs.
SCRIPTS = sorted(p for p in (REPO / "scripts").glob("*.sh") if not p.name.startswith("demo"))
MODEL_CONFIGS = sorted(p for p in (REPO / "configs" / "train").glob("*.yaml") if not p.name.startswith("demo"))


def run_script(script: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env or launch_env(), capture_output=True, text=True, timeout=120
    )


@pytest.mark.unit
def test_every_model_config_has_its_script():
    launched = sorted(
        REPO / re.search(r"^CONFIG=(\S+)$", s.read_text(), re.M).group(1) for s in SCRIPTS
    )  # fmt: skip
    assert launched == MODEL_CONFIGS


@pytest.mark.e2e
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_model_script_dry_runs(script, small_data, tmp_path):
    """`--dry-run` prints the launch command and runs `mftcoder validate` on the config with the
    overrides, exactly as a user's dry run does; nothing is launched. The demo data stands in for
    the user's task directories. The hub is not marked offline, as on a user's machine online, so a
    model id that is not in the local cache passes (validation looks in the cache only; HF_ENDPOINT
    points nowhere, so any request would fail rather than download)."""
    from accelerate.commands.config.config_args import load_config_from_file

    env = launch_env()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    out = tmp_path / "out"
    overrides = [f"data_paths=[{','.join(small_data)}]", f"output_dir={out}"]
    proc = run_script(
        script, "--gpus", "8", "--nodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--dry-run",
        *overrides, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    first, resolved = proc.stdout.split("\n", 1)
    command = shlex.split(first)
    assert command[:2] == ["accelerate", "launch"]

    def option(name: str) -> str:
        return command[command.index(name) + 1]

    preset = load_config_from_file(str(REPO / option("--config_file")))
    assert (option("--num_machines"), option("--num_processes"), option("--machine_rank")) == ("2", "16", "1")
    assert option("--main_process_ip") == "10.0.0.1"
    assert ("--deepspeed_multinode_launcher" in command) == (preset.distributed_type.value == "DEEPSPEED")
    entry = command.index("-m")
    assert command[entry + 1 : entry + 3] == ["mftcoder", "train"]
    config_path = REPO / command[entry + 3]
    assert config_path in MODEL_CONFIGS
    assert command[entry + 4 :] == overrides

    shipped, validated = yaml.safe_load(config_path.read_text()), yaml.safe_load(resolved)
    assert validated["pretrained_model_path"] == shipped["pretrained_model_path"]
    assert "/" in shipped["pretrained_model_path"], "a real hub id"
    assert validated["data_paths"] == small_data
    assert not out.exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "2", "--nodes", "2", "--dry-run"], "--nodes 2 needs --master-addr"),
        (["--gpus", "two"], "--gpus takes a whole number, got 'two'"),
        (["--gpus", "2", "--nodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2 is not below"),
        (["--gpus", "2", "learning_rate"], "unknown argument 'learning_rate'"),
    ],
)  # fmt: skip
def test_model_scripts_refuse_bad_arguments(args, message):
    proc = run_script(SCRIPTS[0], *args)
    assert proc.returncode == 2
    assert f"error: {message}" in proc.stderr, proc.stderr
    assert "accelerate launch" not in proc.stdout


@pytest.mark.unit
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine lists GPUs")
def test_model_scripts_without_gpus_ask_for_the_number():
    proc = run_script(SCRIPTS[0], "--dry-run")
    assert proc.returncode == 2
    assert "error: no GPU found; give the number of GPUs per node with --gpus N" in proc.stderr


# --- the memory estimate -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("estimate_memory", REPO / "scripts" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def tiny_run(memory, **changes):
    fields = dict(
        mode="lora", lora_rank=2, lora_alpha=4, target_modules="all-linear", quantization_bits=4,
        optimizer="adamw", batch=1, seq=3, checkpointing=False, eager_attention=False,
    )  # fmt: skip
    return memory.Run(**{**fields, **changes})


@pytest.mark.unit
def test_memory_formula_by_hand(memory):
    sizes = memory.ModelSizes(
        params=1000, linear=800, trainable=20, largest_layer=100, layers=2, hidden=4, kv=2, mlp=16, heads=2, vocab=10
    )
    # activations: a = 2·(6·4 + 2·2 + 16) = 88 per token and layer; logits 10·10; b·s = 3
    assert memory.activations(sizes, tiny_run(memory)) == 3 * (2 * 88 + 100)
    assert memory.activations(sizes, tiny_run(memory, checkpointing=True)) == 3 * (2 * 2 * 4 + 88 + 100)
    assert memory.activations(sizes, tiny_run(memory, eager_attention=True)) == 3 * (2 * (88 + 4 * 2 * 3) + 100)

    acts = 3 * (2 * 88 + 100)
    lora = {p: memory.estimate(sizes, tiny_run(memory), p, processes=4, per_node=4) for p in memory.PRESETS}
    # LoRA: frozen base 2·1000, trainable 20 -> weights 2000 + 40, grads 40, Adam 12·20
    assert lora["ddp"] == dict(
        weights=2040, gradients=40, optimizer=240, activations=acts, total=2320 + acts, cpu_per_node=0
    )
    assert lora["deepspeed_zero2"]["total"] == 2040 + 10 + 60 + acts
    assert lora["deepspeed_zero2_offload"]["cpu_per_node"] == 240 and lora["deepspeed_zero2_offload"]["optimizer"] == 0
    gathered = 2 * 100 * 2040 / 1000
    assert lora["deepspeed_zero3"]["weights"] == lora["fsdp2"]["weights"] == 2040 / 4 + gathered
    assert lora["deepspeed_zero3_offload"]["weights"] == gathered
    assert lora["deepspeed_zero3_offload"]["cpu_per_node"] == 240 + 2040

    full_sizes = replace(sizes, trainable=1000)
    full = memory.estimate(full_sizes, tiny_run(memory, mode="full"), "ddp", processes=4, per_node=4)
    assert full["total"] == 16 * 1000 + acts  # the classic 16 bytes per parameter
    qlora = memory.estimate(sizes, tiny_run(memory, mode="qlora"), "ddp", processes=4, per_node=4)
    assert qlora["weights"] == pytest.approx((0.5 + 1 / 64 + 4 / (64 * 256)) * 800 + 2 * 200 + 40)
    eight_bit = memory.estimate(sizes, tiny_run(memory, optimizer="paged_adamw_8bit"), "ddp", processes=4, per_node=4)
    assert eight_bit["optimizer"] == 6 * 20
    # Under optimizer offload DeepSpeed's CPU AdamW runs instead (an 8-bit optimizer is refused there).
    eight_bit_run = tiny_run(memory, optimizer="adamw_8bit")
    offload = memory.estimate(sizes, eight_bit_run, "deepspeed_zero2_offload", processes=4, per_node=4)
    assert offload["cpu_per_node"] == lora["deepspeed_zero2_offload"]["cpu_per_node"] == 240


@pytest.mark.unit
def test_model_sizes_match_the_model_mftcoder_trains(memory, tiny_config):
    """Counted on the meta device, the sizes equal those of the real demo model wrapped by mftcoder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mftcoder.models.loading import wrap_lora

    model_config = AutoConfig.from_pretrained(DEMO_MODEL)
    sizes = memory.model_sizes(model_config, tiny_run(memory, lora_rank=8, lora_alpha=16))
    model = AutoModelForCausalLM.from_config(model_config)
    assert sizes.params == sum(p.numel() for p in model.parameters())
    h, i, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    kv = model_config.num_key_value_heads * (model_config.hidden_size // model_config.num_attention_heads)
    assert sizes.linear == layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o, k, v, gate, up, down
    assert (sizes.kv, sizes.mlp, sizes.layers) == (kv, 4 * i, layers)
    wrapped = wrap_lora(tiny_config(lora_rank=8, lora_alpha=16), model)
    assert sizes.trainable == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


@pytest.mark.unit
def test_the_copied_architectures_have_the_sizes_in_their_names(memory):
    """A typo in a copied config.json field would show as a parameter count far from the model's name."""
    for model_id in memory.KNOWN_ARCHITECTURES:
        named = re.search(r"-(\d+(?:\.\d+)?)b\b", model_id.lower())
        if named is None:
            continue  # Mixtral-8x7B: 8 experts of a 7B-class MLP, 46.7B in all
        sizes = memory.model_sizes(memory.model_config(model_id), tiny_run(memory, mode="full"))
        assert sizes.params / 1e9 == pytest.approx(float(named.group(1)), rel=0.1), model_id


@pytest.mark.unit
def test_the_docs_memory_table_is_the_scripts_output(memory):
    doc = (REPO / "docs" / "memory.md").read_text()
    start = doc.index("| train config | parameters |")
    table = doc[start : doc.index("\n\n", start)]
    assert table == memory.memory_table(), (
        "docs/memory.md is stale: run `python scripts/estimate_memory.py --table` and paste its output there"
    )
