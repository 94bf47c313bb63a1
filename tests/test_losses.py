"""Loss modes against values computed by hand.

The batch: three samples (rows), per-token CE and target mask

    row 0  task 0  ce [1, 2, 9]  mask [1, 1, 0]   -> targets 1, 2      (mean 1.5)
    row 1  task 1  ce [3, 4, 5]  mask [1, 1, 1]   -> targets 3, 4, 5   (mean 4)
    row 2  task 0  ce [6, 7, 8]  mask [1, 0, 0]   -> target 6          (mean 6)

    case1 = (1+2+3+4+5+6) / 6                 = 3.5
    case2 = (1.5 + 4 + 6) / 3                 = 23/6
    case3 = (mean(1,2,6) + mean(3,4,5)) / 2   = (3 + 4) / 2 = 3.5
    case4 = (mean(1.5, 6) + 4) / 2            = (3.75 + 4) / 2 = 3.875
    with task_weights [3, 1]:  case3 = (3*3 + 4) / 4 = 3.25;  case4 = (3*3.75 + 4) / 4 = 3.8125
"""

import math

import pytest
import torch

from mftcoder.losses import modes
from mftcoder.losses.modes import batch_counts, task_sums, token_coefficients, token_losses

pytestmark = pytest.mark.unit

ROWS = [
    (0, [1.0, 2.0, 9.0], [1, 1, 0]),
    (1, [3.0, 4.0, 5.0], [1, 1, 1]),
    (0, [6.0, 7.0, 8.0], [1, 0, 0]),
]


def make_batch(rows):
    """(batch, ce) in the collator's layout: one sample per row."""
    mask = torch.tensor([m for _, _, m in rows], dtype=torch.bool)
    ce = torch.tensor([c for _, c, _ in rows])
    task_ids = torch.tensor([[t] * len(m) for t, _, m in rows])
    sample_ids = torch.arange(len(rows)).unsqueeze(1).expand_as(mask).clone()
    return {"loss_mask": mask, "task_ids": task_ids, "sample_ids": sample_ids}, ce


def objective(mode, micro_batches, num_tasks, weights):
    """Sum of the micro-batches' contributions with counts of the whole step."""
    batches = [make_batch(rows) for rows in micro_batches]
    counts = sum(batch_counts(b, num_tasks) for b, _ in batches)
    return sum(float((token_coefficients(mode, b, counts, weights) * ce).sum()) for b, ce in batches)


UNIFORM = torch.ones(2)
EXPECTED = {"case1": 3.5, "case2": 23 / 6, "case3": 3.5, "case4": 3.875}


@pytest.mark.parametrize("mode", EXPECTED)
def test_modes_match_hand_computed_values(mode):
    assert objective(mode, [ROWS], 2, UNIFORM) == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize(("mode", "expected"), [("case3", 3.25), ("case4", 3.8125), ("case1", 3.5), ("case2", 23 / 6)])
def test_task_weights_apply_to_case3_and_case4_only(mode, expected):
    assert objective(mode, [ROWS], 2, torch.tensor([3.0, 1.0])) == pytest.approx(expected)


@pytest.mark.parametrize("mode", EXPECTED)
def test_accumulation_split_does_not_change_the_objective(mode):
    """GA=3 x bs=1 (and an uneven 1+2 split) equals GA=1 x bs=3."""
    whole = objective(mode, [ROWS], 2, UNIFORM)
    assert objective(mode, [[r] for r in ROWS], 2, UNIFORM) == pytest.approx(whole)
    assert objective(mode, [ROWS[:1], ROWS[1:]], 2, UNIFORM) == pytest.approx(whole)


@pytest.mark.parametrize("mode", EXPECTED)
def test_absent_task_contributes_nothing(mode):
    """A third task with a large weight but no sample in the step changes nothing."""
    weights = torch.tensor([1.0, 1.0, 5.0])
    assert objective(mode, [ROWS], 3, weights) == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", EXPECTED)
def test_task_with_zero_targets_gives_no_nan(mode):
    rows = ROWS + [(2, [50.0, 60.0, 70.0], [0, 0, 0])]
    value = objective(mode, [rows], 3, torch.tensor([1.0, 1.0, 5.0]))
    assert math.isfinite(value) and value == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", EXPECTED)
def test_step_without_any_target_is_zero_not_nan(mode):
    rows = [(0, [1.0, 2.0], [0, 0])]
    assert objective(mode, [rows], 2, UNIFORM) == 0.0


def test_batch_counts_are_tokens_and_samples_per_task():
    batch, _ = make_batch(ROWS + [(1, [0.0, 0.0, 0.0], [0, 0, 0])])
    counts = batch_counts(batch, 2)
    # task 0: 3 targets in 2 samples; task 1: 3 targets in 1 sample (its empty sample is not counted)
    assert counts.tolist() == [[3.0, 3.0], [2.0, 1.0]]


def test_task_sums_and_token_losses():
    batch, ce = make_batch(ROWS)
    assert task_sums(ce, batch, 2).tolist() == [9.0, 12.0]
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 0.0]]])  # position 0: p(target=1) = 3/4
    one = {"target_ids": torch.tensor([1]), "loss_mask": torch.tensor([[True, False]])}
    assert token_losses(logits, one)[0].tolist() == pytest.approx([-math.log(0.75), 0.0])
    # The same from the target rows alone, as a model computing logits at the targets returns them.
    assert token_losses(logits[0, :1], one)[0].tolist() == pytest.approx([-math.log(0.75), 0.0])


def test_task_sums_leave_out_what_is_off_the_targets_even_nan():
    batch, ce = make_batch(ROWS)
    poisoned = torch.where(batch["loss_mask"], ce, float("nan"))
    assert task_sums(poisoned, batch, 2).tolist() == [9.0, 12.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chunked_cross_entropy_equals_torch_in_value_and_gradient(monkeypatch, dtype):
    """Chunked (3 rows of 7 per chunk, the last one short) against F.cross_entropy on the upcast logits."""
    monkeypatch.setattr(modes, "CHUNK_ELEMENTS", 21)
    torch.manual_seed(0)
    logits = (torch.randn(8, 7) * 4).to(dtype)
    targets = torch.randint(0, 7, (8,))
    weights = torch.rand(8)  # a non-uniform upstream gradient, as the loss coefficients are
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    ce = modes.cross_entropy(ours, targets)
    expected = torch.nn.functional.cross_entropy(theirs.float(), targets, reduction="none")
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, expected)
    (ce * weights).sum().backward()
    (expected * weights).sum().backward()
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_chunked_cross_entropy_writes_its_gradient_over_computed_logits_only(monkeypatch):
    """Logits an op computed (as the output head does) hold their gradient afterwards; a leaf keeps its values."""
    monkeypatch.setattr(modes, "CHUNK_ELEMENTS", 12)
    torch.manual_seed(0)
    weight = torch.randn(3, 6, requires_grad=True)
    hidden = torch.randn(5, 3)
    targets = torch.tensor([0, 5, 2, 2, 1])
    logits = hidden @ weight
    modes.cross_entropy(logits, targets).sum().backward()
    reference = weight.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(hidden @ reference, targets, reduction="sum").backward()
    torch.testing.assert_close(weight.grad, reference.grad)
    leaf = torch.randn(5, 6, requires_grad=True)
    kept = leaf.detach().clone()
    modes.cross_entropy(leaf, targets).sum().backward()
    assert torch.equal(leaf.detach(), kept)


def test_chunked_cross_entropy_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(modes, "CHUNK_ELEMENTS", 10)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 1, 1, 2])
    # The CE is computed in fp32; gradcheck's finite differences need float64 all through, so compare the
    # analytic gradient of the float64 input against torch's float64 CE instead.
    grad = torch.autograd.grad(modes.cross_entropy(logits, targets).sum(), logits)[0]
    reference = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), logits)[0]
    torch.testing.assert_close(grad, reference.float().double(), rtol=1e-5, atol=1e-6)


def test_unknown_mode_is_rejected():
    batch, _ = make_batch(ROWS)
    with pytest.raises(ValueError, match="unknown loss mode"):
        token_coefficients("case9", batch, batch_counts(batch, 2), UNIFORM)
