import math

import pytest
import torch

from mftcoder.training.optim import build_optimizer, build_scheduler, lr_at, warmup_steps

pytestmark = pytest.mark.unit


def test_warmup_rises_linearly_to_the_peak():
    rates = [lr_at(s, peak=1.0, min_lr=0.0, warmup=4, total=10, kind="constant") for s in range(6)]
    assert rates == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_the_floor():
    # after 2 warm-up steps, 8 decay steps: progress p = (s - 2) / 8
    lr = [lr_at(s, peak=1.0, min_lr=0.1, warmup=2, total=10, kind="cosine") for s in range(10)]
    assert lr[2] == pytest.approx(1.0)
    assert lr[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert lr[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert min(lr[2:]) > 0.1


def test_linear_decay():
    assert lr_at(5, peak=2.0, min_lr=0.0, warmup=0, total=10, kind="linear") == pytest.approx(1.0)


@pytest.mark.parametrize(("setting", "total", "steps", "warned"), [(0.1, 50, 5, False), (30, 50, 30, False), (80, 50, 50, True), (0, 50, 0, False)])
def test_warmup_steps(setting, total, steps, warned):
    got, warning = warmup_steps(setting, total)
    assert got == steps and bool(warning) == warned


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(True)

    class Cfg:
        weight_decay, learning_rate, adam_beta1, adam_beta2, adam_epsilon = 0.1, 1e-3, 0.8, 0.9, 1e-6

    optimizer = build_optimizer(model, Cfg)
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.8, 0.9) and decayed["eps"] == 1e-6


def test_scheduler_steps_in_optimizer_steps_and_allows_zero_lr():
    class Cfg:
        learning_rate, min_lr, lr_scheduler_type = 0.0, 0.0, "cosine"

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.0)
    scheduler = build_scheduler(optimizer, Cfg, total_steps=5, warmup=2)
    for _ in range(5):
        assert optimizer.param_groups[0]["lr"] == 0.0
        optimizer.step()
        scheduler.step()

    Cfg.learning_rate = 1.0
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, Cfg, total_steps=4, warmup=2)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.5])
