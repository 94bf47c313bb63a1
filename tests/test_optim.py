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


@pytest.mark.parametrize(
    ("setting", "total", "steps", "warned"),
    [(0.1, 50, 5, False), (30, 50, 30, False), (80, 50, 50, True), (0, 50, 0, False)],
)
def test_warmup_steps(setting, total, steps, warned):
    got, warning = warmup_steps(setting, total)
    assert got == steps and bool(warning) == warned


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(True)

    optimizer = build_optimizer(model, OptimCfg)
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.8, 0.9) and decayed["eps"] == 1e-6


class OptimCfg:
    weight_decay, learning_rate, adam_beta1, adam_beta2, adam_epsilon = 0.1, 1e-3, 0.8, 0.9, 1e-6
    optimizer = "adamw"


def test_rank_of_a_zero3_shard_is_its_ds_shape_and_no_group_is_empty():
    # Under ZeRO-3 every parameter is a flat 1-D shard; DeepSpeed records the real shape in ds_shape.
    matrix, bias = torch.nn.Parameter(torch.zeros(16)), torch.nn.Parameter(torch.zeros(4))
    matrix.ds_shape, bias.ds_shape = torch.Size([4, 4]), torch.Size([4])
    decayed, plain = build_optimizer(torch.nn.ParameterList([matrix, bias]), OptimCfg).param_groups
    assert decayed["params"] == [matrix] and plain["params"] == [bias]
    # LoRA: matrices only, so a single group (DeepSpeed drops empty ones, which the scheduler would miss).
    [group] = build_optimizer(torch.nn.Linear(4, 4, bias=False), OptimCfg).param_groups
    assert group["weight_decay"] == 0.1


@pytest.mark.parametrize(("name", "expected"), [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_8bit_adamw_from_bitsandbytes_steps_on_cpu(name, expected):
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.LayerNorm(96))  # 6144 weights: 8-bit state
    config = type("Cfg", (OptimCfg,), {"optimizer": name})
    optimizer = build_optimizer(model, config)
    assert type(optimizer).__name__ == expected
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0 and decayed["betas"] == (0.8, 0.9)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 64)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8  # the 8-bit state


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


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_past_its_end_the_schedule_stays_at_its_final_rate(kind):
    """A resumed run made longer continues its original schedule: no rise back towards the peak."""
    rates = [lr_at(s, peak=1.0, min_lr=0.1, warmup=2, total=10, kind=kind) for s in range(10, 20)]
    assert rates == pytest.approx([0.1] * 10)
