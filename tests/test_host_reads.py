"""An optimizer step reads the device once: mftcoder's own code makes one host read of tensor values per
step (whether the step was finite, its gradient norm, whether any process was told to stop), whatever
the loss mode, layout or accumulation. On a GPU every other read would stall the host until the queued
work is done.

Counted: reads of tensor values to Python (`item`, `tolist`, `float()`, `int()`, `bool()`) and selections
by a boolean mask (their size depends on the data) whose caller is a file of mftcoder. Not counted: those
inside the libraries, e.g. transformers selecting the hidden states at the targets with the same mask
(one per forward) or torch's Adam reading its step counters (kept on the host); and the per-sample sdpa
reading a packed batch's sequence lengths, a host tensor from the collator: that attention runs on the
CPU only, where there is no device to wait for (mftcoder/models/attention.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mftcoder.training import step as step_module
from mftcoder.training.trainer import Trainer

pytestmark = pytest.mark.e2e

PACKAGE = str(Path(step_module.__file__).resolve().parents[1])
ATTENTION = str(Path(PACKAGE) / "models" / "attention.py")
READS = ("item", "tolist", "__float__", "__int__", "__bool__")
SELECTIONS = ("__getitem__", "masked_select", "nonzero")


@contextlib.contextmanager
def product_host_reads(monkeypatch):
    """Counts, by caller, the reads and mask selections made from mftcoder's files. The Tensor methods are
    wrapped for the test only: torch has no hook that sees every read."""
    counts: Counter[str] = Counter()

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            by_mask = name != "__getitem__" or (isinstance(args[0], torch.Tensor) and args[0].dtype == torch.bool)
            lengths = caller == ATTENTION and self.dtype == torch.int32 and self.device.type == "cpu"
            if by_mask and caller.startswith(PACKAGE) and not lengths:
                counts[f"{name} in {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return real(self, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in READS + SELECTIONS:
            patch.setattr(torch.Tensor, name, counting(name))
        yield counts


@pytest.mark.parametrize(
    ("mode", "layout"),
    [("case3", "pack"), ("case4", "padding"), ("focal", "padding"), ("coba", "pack")],  # fmt: skip
)
def test_an_optimizer_step_reads_the_device_once(tiny_config, monkeypatch, mode, layout):
    config = tiny_config(
        weighted_loss_mode=mode, padding_mode=layout, gradient_accumulation_steps=2, per_device_train_batch_size=2,
        max_train_steps=2,
    )  # fmt: skip
    trainer = Trainer(config)
    run = trainer.setup()
    first, second = trainer.epoch_steps(0)[:2]
    step_module.optimizer_step(trainer.accelerator, config, run, first)  # warm-up: lazy inits may read
    with product_host_reads(monkeypatch) as counts:
        result = step_module.optimizer_step(trainer.accelerator, config, run, second, lambda: False)
    assert result.outcome.name == "APPLIED"
    assert sum(counts.values()) == 1, dict(counts)
