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
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p(target=1) = 3/4
    assert float(token_losses(logits, torch.tensor([[1]]))) == pytest.approx(-math.log(0.75))


def test_unknown_mode_is_rejected():
    batch, _ = make_batch(ROWS)
    with pytest.raises(ValueError, match="unknown loss mode"):
        token_coefficients("case9", batch, batch_counts(batch, 2), UNIFORM)
