"""Per-task loss and perplexity of a trained run's weights on the run's own validation or test split.

Everything goes through the trainer's own code paths, so the numbers are those training would log
for the same weights: the run's resolved `config.yaml` (`mftcoder.run_config.load_config`), its data
built as training builds it (`mftcoder.data.dataset.build_datasets`: same tokenizer, template,
length policy, seeded split and packing), the model built as training builds it (base, LoRA
wrapping, the checkpoint's weights via `mftcoder.training.checkpoint.load_weights`), an Accelerator
made from the config (`build_accelerator`: same mixed precision; under `accelerate launch` the
split is shared across processes), and `mftcoder.training.evaluation.evaluate`.

The validation split is not held out: training evaluates on it and picks best/, stops early and
balances task weights by it. The test split (a third `data_split` fraction) is never read by
training. `--checkpoint base` evaluates the weights the run started from (the base model without
the adapter, or the model a full fine-tuning started from), the reference for what training changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mftcoder.data.dataset import build_datasets
from mftcoder.data.template import chat_format
from mftcoder.data.tokenizer import load_tokenizer
from mftcoder.errors import EvalError
from mftcoder.models.attention import FLAT_LAYOUT, resolve_attention
from mftcoder.models.loading import cast_trainable, load_model, wrap_lora
from mftcoder.run_config import load_config
from mftcoder.training.checkpoint import load_weights
from mftcoder.training.evaluation import evaluate
from mftcoder.training.launch import COMPUTE_DTYPE, build_accelerator

SPLITS = ("valid", "test")
# --checkpoint base: the run's starting weights rather than a directory it wrote.
BASE = "base"


@dataclass(frozen=True)
class RunLoss:
    run: Path
    checkpoint: str  # as given: final, best, step-N, base or a directory
    weights: Path
    split: str
    loss: float
    task_mean: float
    task_loss: dict[str, float]
    units: int

    def to_dict(self) -> dict:
        return {
            "run": str(self.run),
            "checkpoint": self.checkpoint,
            "weights": str(self.weights),
            "split": self.split,
            "loss": self.loss,
            "perplexity": _ppl(self.loss),
            "task_mean": self.task_mean,
            "task_loss": self.task_loss,
            "task_perplexity": {task: _ppl(loss) for task, loss in self.task_loss.items()},
            f"{self.split}_units": self.units,
        }


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def weights_dir(run: Path, which: str) -> Path:
    """final/, best/, checkpoints/step-N (given as `step-N` or `N`), or a directory path."""
    if which in ("final", "best"):
        path = run / which
    elif which.removeprefix("step-").isdigit():
        path = run / "checkpoints" / f"step-{int(which.removeprefix('step-'))}"
    else:
        path = Path(which).expanduser()
    if not path.is_dir():
        hint = {
            "final": "the run has not finished; pass --checkpoint best or --checkpoint step-N",
            "best": "best/ is written when the run evaluates (evaluation_steps) and finishes",
        }.get(
            which, f"checkpoints: {', '.join(sorted(p.name for p in (run / 'checkpoints').glob('step-*'))) or 'none'}"
        )
        raise EvalError(f"{path}: no such directory ({hint})")
    return path


def check_run(run_dir: str | Path) -> Path:
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise EvalError(f"--run {run}: no such directory; give a training run's output_dir")
    if not (run / "config.yaml").is_file():
        raise EvalError(f"--run {run}: no config.yaml, so not a training run's output_dir (written by mftcoder train)")
    return run


def check_split(run: Path, config, split: str) -> None:
    if split not in SPLITS:
        raise EvalError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    if split == "test" and config.held_out_fraction == 0:
        raise EvalError(
            f"{run}/config.yaml: data_split {config.data_split} holds out no test split, so there is nothing to "
            "evaluate with --split test; train with a third fraction, data_split: [train, valid, test] "
            "(e.g. [0.8, 0.1, 0.1]), or evaluate the validation split (--split valid)"
        )


def run_loss(run_dir: str | Path, which: str = "final", split: str = "valid", notice=print) -> RunLoss:
    """The loss of the run's `which` weights (final, best, step-N, a directory, or `base`: its starting
    weights) on its `split` (valid or test)."""
    run = check_run(run_dir)
    weights = None if which == BASE else weights_dir(run, which)
    config = load_config(run / "config.yaml", notice=notice)
    check_split(run, config, split)
    peft = bool(config.peft_type)
    if weights is not None and peft and not (weights / "adapter_model.safetensors").is_file():
        raise EvalError(f"{weights}: no adapter_model.safetensors (the run trains a {config.peft_type} adapter)")
    if weights is not None and not peft and not any(weights.glob("model*.safetensors")):
        raise EvalError(f"{weights}: no model*.safetensors (the run fine-tunes the full model)")
    base = None
    if config.model_init == "from_config":
        base = run / "base_model"
        if not base.is_dir():
            raise EvalError(
                f"{base}: no such directory; the run initialised its model from a config and saves it there"
            )
    accelerator = build_accelerator(config)
    attention = resolve_attention(config, accelerator.device)
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer, chat_format(config, tokenizer), flat=attention in FLAT_LAYOUT)
    evaluated = data.valid if split == "valid" else data.test
    if not evaluated or evaluated.units == 0:
        raise EvalError(f"{run}/config.yaml: the run has no {split} split (data_split gives it no samples)")
    for task, rep in data.report.items():
        if not getattr(rep, f"{split}_samples"):
            records = getattr(rep, f"{split}_records")
            notice(f"task '{task}' has no {split} sample ({records} records, all bad or dropped): left out")
    compute = COMPUTE_DTYPE[accelerator.mixed_precision]
    if weights is None:  # the starting point: the base as training loaded it, no adapter
        model = load_model(config, tokenizer, compute if peft else torch.float32, attention, source=base)
        weights = base or Path(config.pretrained_model_path)
    elif peft:
        model = load_model(config, tokenizer, compute, attention, source=base)
        model = wrap_lora(config, model)
        cast_trainable(model, torch.float32)
        load_weights(model, weights, peft=True)
    else:
        model = load_model(config, tokenizer, torch.float32, attention, source=weights)
    model = accelerator.prepare(model)
    result = evaluate(
        model, accelerator, evaluated, data.tasks, config.per_device_eval_batch_size, tokenizer.pad_token_id
    )
    accelerator.end_training()
    return RunLoss(run, which, weights, split, result.loss, result.task_mean, result.task_loss, evaluated.units)


def loss_table(result: RunLoss) -> str:
    width = max(len("all tasks"), *(len(t) for t in result.task_loss))
    what = {"valid": "validation", "test": "held-out test"}[result.split]
    weights = f"the base model {result.weights} (before training)" if result.checkpoint == BASE else result.weights
    lines = [
        f"{what} loss of {weights} ({result.units} units)",
        f"  {'task':<{width}} {'loss':>8} {'ppl':>10}",
    ]
    for task, loss in result.task_loss.items():
        lines.append(f"  {task:<{width}} {loss:>8.4f} {_ppl(loss):>10.3f}")
    lines.append(f"  {'all tasks':<{width}} {result.loss:>8.4f} {_ppl(result.loss):>10.3f}")
    lines.append(f"  {'task_mean':<{width}} {result.task_mean:>8.4f}")
    return "\n".join(lines)
