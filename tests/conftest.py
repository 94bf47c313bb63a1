"""Shared fixtures. Nothing may reach the network: the hub is offline for every test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remote modelling code that a test loads (trust_remote_code) is copied here, not into ~/.cache/huggingface.
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "mftcoder-tests-hf-modules"))
# Two cores: one thread per process keeps in-process runs and 2-process launches from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# For tests that compare two runs which should make the same updates (other micro-batching, other
# world size): Adam's update is ~lr * sign(g) for any |g| >> eps, so float noise in a near-zero
# gradient (other padding shapes, other reduction order) would move a weight by ~lr; with eps
# above the gradients' size the update stays proportional to the gradient, and the final weights
# compare the gradients of every step.
EQUIVALENCE_ADAM_EPSILON = 1e-3
DEMO = REPO / "assets" / "demo"
DEMO_MODEL = DEMO / "model"
DEMO_TASKS = ("code_completion", "text_to_code", "unit_test_generation")


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Tokenized data is cached in a directory of the session (also for subprocess runs), never in
    the user's ~/.cache/mftcoder."""
    os.environ["MFTCODER_CACHE"] = str(tmp_path_factory.mktemp("mftcoder_cache"))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def write_subset(target: Path, records_per_task: int) -> list[str]:
    """The first records of each demo task, one directory per task; returns the data_paths."""
    paths = []
    for task in DEMO_TASKS:
        source = DEMO / "data" / task / f"{task}.jsonl"
        lines = source.read_text(encoding="utf-8").splitlines()[:records_per_task]
        directory = target / task
        directory.mkdir(parents=True)
        (directory / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(str(directory))
    return paths


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> list[str]:
    """40 records per demo task (36 train / 4 valid with the tiny config's split)."""
    return write_subset(tmp_path_factory.mktemp("data"), 40)


@pytest.fixture
def tiny_config(small_data, tmp_path):
    """A factory of validated configs for short in-process runs of the demo model."""
    from mftcoder.run_config import validate_mapping

    def make(**overrides):
        raw = {
            "pretrained_model_path": str(DEMO_MODEL),
            "model_init": "from_config",
            "data_paths": small_data,
            "data_split": [0.9, 0.1],
            "seq_length": 512,
            "output_dir": str(tmp_path / "out"),
            "peft_type": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "learning_rate": 5e-3,
            "num_warmup_steps": 0,
            "num_train_epochs": 1,
            "log_interval": 1,
            "evaluation_steps": None,
            "checkpointing_steps": None,
            "early_stopping": False,
            "seed": 7,
        }
        raw.update(overrides)
        return validate_mapping(raw)

    return make


def reset_accelerate() -> None:
    """accelerate keeps process-global state that a second in-process run would inherit; tests that
    train several times in one process reset it (a fixture may touch library internals, the product
    never does)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


def launch_env() -> dict[str, str]:
    """The environment of a subprocess `accelerate launch`: offline, one thread per process, and
    nothing from an outer launcher (the product must pick the CPU, gloo and world size itself)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for name in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    return env


def read_metrics(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


# Accelerate 1.15 sets DistributedType.FSDP only for GPU-like process groups, so on CPU an FSDP launch
# silently trains as DDP, and the product refuses it (tests/test_launch.py). To still run mftcoder's FSDP2
# path on CPU, this entry point, confined to the tests, builds the Accelerator as launch.build_accelerator
# and accelerate do on a GPU machine (the launcher checks, the plugin from the environment fsdp2.yaml
# exports, FSDP2's mixed-precision policy from the run's precision), on gloo and the CPU, then sets the
# distributed type by hand; accelerate's FSDP2 preparation, training steps and state dicts then run as
# they would on GPUs. After `prepare` it prints the modules fully_shard wrapped and the parameters it left
# whole (not sharded DTensors).
FSDP_ON_CPU = """
import sys

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from mftcoder.cli import main
from mftcoder.training import launch, trainer


def fsdp_on_cpu(config):
    launcher = launch.Launcher.from_env()
    launch.check_launcher(launcher, config, cuda=True)
    mixed = launch.resolve_mixed_precision(config, launcher.mixed_precision, cuda=False)
    plugin = FullyShardedDataParallelPlugin()
    if mixed != "no":
        # As accelerate does for FSDP on GPUs; it applies no autocast under FSDP2, so this policy is the
        # only thing that makes the model compute in the run's precision.
        plugin.set_mixed_precision(mixed)
    accelerator = Accelerator(
        mixed_precision=mixed, gradient_accumulation_steps=config.gradient_accumulation_steps, cpu=True,
        fsdp_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        step_scheduler_with_optimizer=False,
    )
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    launch.check_accelerator(accelerator, launcher, mixed)
    prepare = accelerator.prepare

    def prepare_and_report(*objects):
        prepared = prepare(*objects)
        for model in prepared if isinstance(prepared, (tuple, list)) else (prepared,):
            if isinstance(model, torch.nn.Module):
                sharded = sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)})
                accelerator.print(f"fully_shard: {sharded}")
                whole = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
                accelerator.print(f"not sharded: {whole}")
        return prepared

    accelerator.prepare = prepare_and_report
    return accelerator


trainer.build_accelerator = fsdp_on_cpu
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def fsdp_entry(tmp_path_factory) -> tuple[str, ...]:
    """The arguments that run FSDP_ON_CPU in place of `-m mftcoder` after `accelerate launch`."""
    path = tmp_path_factory.mktemp("fsdp_entry") / "fsdp_on_cpu.py"
    path.write_text(FSDP_ON_CPU)
    return (str(path),)


def poison_forward(monkeypatch, calls: set[int], factor: float) -> None:
    """Multiply the token losses of the given forward calls (one micro-batch per step) by `factor`."""
    import mftcoder.training.step as step_module

    real = step_module.forward_token_losses
    count = {"n": 0}

    def poisoned(model, batch):
        count["n"] += 1
        ce = real(model, batch)
        return ce * factor if count["n"] in calls else ce

    monkeypatch.setattr(step_module, "forward_token_losses", poisoned)
