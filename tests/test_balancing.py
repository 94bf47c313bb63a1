"""Loss balancing beyond case1..case4 (focal, self-paced, CoBa, MoE router balance) against hand-computed values.

The batch is test_losses' ROWS: three samples with mean target CE 1.5 (task 0), 4 (task 1) and
6 (task 0); per task, mean CE 3 (task 0: 1, 2, 6) and 4 (task 1: 3, 4, 5).
"""

import io
import math

import pytest
import torch
from conftest import DEMO_MODEL
from test_losses import ROWS, make_batch
from transformers import LlamaConfig, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mftcoder.errors import ConfigError
from mftcoder.losses.balancing import StaticWeights, loss_vector
from mftcoder.losses.coba import CoBa, absolute_convergence, divergence_factor, relative_convergence
from mftcoder.losses.focal import FocalBalancing
from mftcoder.losses.history import LossHistory, slopes, validation_sample
from mftcoder.losses.modes import batch_counts, token_coefficients
from mftcoder.losses.moe import router_balance, router_balance_loss
from mftcoder.losses.self_paced import SelfPaced, self_paced_weights
from mftcoder.losses.weighting import balancing_warnings, build_balancing
from mftcoder.run_config import validate_mapping

pytestmark = pytest.mark.unit

UNIFORM = torch.ones(2)


def step_objective(balancing, micro_batches, num_tasks=2, grad=False):
    """Σ over micro-batches of Σ c_t CE_t with the counts of the whole step; with `grad`, also d/dCE."""
    batches = [make_batch(rows) for rows in micro_batches]
    counts = sum(batch_counts(b, num_tasks) for b, _ in batches)
    total, grads = 0.0, []
    for batch, ce in batches:
        ce = ce.clone().requires_grad_(grad)
        value = (balancing.coefficients(batch, ce, counts) * ce).sum()
        if grad:
            value.backward()
            grads.append(ce.grad)
        total += value.item()
    return (total, grads) if grad else total


def focal(x, gamma):
    """Lin et al.'s FL at probability exp(-x), written as a function of the mean CE x."""
    return (1 - math.exp(-x)) ** gamma * x


# --- static weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["case1", "case2", "case3", "case4"])
def test_static_weights_are_the_case_modes(mode):
    batch, ce = make_batch(ROWS)
    counts = batch_counts(batch, 2)
    static = StaticWeights(mode, [3.0, 1.0], 2)
    expected = token_coefficients(mode, batch, counts, torch.tensor([3.0, 1.0]))
    assert torch.equal(static.coefficients(batch, ce, counts), expected)
    # Reported (logged as task_weight) only where they apply and only when given.
    assert (static.weights is not None) == (mode in ("case3", "case4"))
    assert StaticWeights(mode, None, 2).weights is None


# --- focal, sample level -----------------------------------------------------------------------


def test_focal_sample_level_is_the_token_focal_loss_averaged_per_sample():
    """(1/S) Σ_s mean over the sample's targets of FL: samples [1, 2], [3, 4, 5], [6]."""
    value = step_objective(FocalBalancing("sample", 2.0, UNIFORM), [ROWS])
    per_sample = [
        (focal(1, 2.0) + focal(2, 2.0)) / 2,
        (focal(3, 2.0) + focal(4, 2.0) + focal(5, 2.0)) / 3,
        focal(6, 2.0),
    ]
    assert value == pytest.approx(sum(per_sample) / 3)


def test_focal_sample_level_gradient_includes_the_factor():
    """Not detached: d/dCE_t = (1/S)(1/n_s) FL'(CE_t), FL'(x) = γ(1-e^-x)^(γ-1) e^-x x + (1-e^-x)^γ."""
    gamma = 2.0
    _, [grad] = step_objective(FocalBalancing("sample", gamma, UNIFORM), [ROWS], grad=True)

    def derivative(x):
        return gamma * (1 - math.exp(-x)) ** (gamma - 1) * math.exp(-x) * x + (1 - math.exp(-x)) ** gamma

    assert grad[0, 0].item() == pytest.approx(derivative(1.0) / 3 / 2)  # sample 0 has 2 targets
    assert grad[0, 1].item() == pytest.approx(derivative(2.0) / 3 / 2)
    assert grad[1, 2].item() == pytest.approx(derivative(5.0) / 3 / 3)
    assert grad[2, 0].item() == pytest.approx(derivative(6.0) / 3 / 1)
    assert grad[0, 2].item() == 0.0 and grad[2, 1].item() == 0.0  # not targets


def test_focal_at_gamma_zero_is_case2_and_case3_exactly():
    batch, ce = make_batch(ROWS)
    counts = batch_counts(batch, 2)
    weights = torch.tensor([3.0, 1.0])
    sample = FocalBalancing("sample", 0.0, weights).coefficients(batch, ce, counts)
    assert torch.equal(sample, token_coefficients("case2", batch, counts, weights))
    task = FocalBalancing("task", 0.0, weights)
    task.observe(torch.tensor([9.0, 12.0]), torch.tensor([3.0, 3.0]))  # a known difficulty changes nothing at γ=0
    assert torch.equal(task.coefficients(batch, ce, counts), token_coefficients("case3", batch, counts, weights))


# --- focal, task level -------------------------------------------------------------------------


def test_focal_task_level_weights_case3_by_the_previous_steps_difficulty():
    balancing = FocalBalancing("task", 2.0, torch.tensor([3.0, 1.0]))
    assert step_objective(balancing, [ROWS]) == pytest.approx(3.25)  # nothing seen yet: case3
    balancing.observe(torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0]))  # task means 1 and 2
    phi = [(1 - math.exp(-1.0)) ** 2, (1 - math.exp(-2.0)) ** 2]
    assert balancing.factors.tolist() == pytest.approx(phi)
    assert balancing.weights.tolist() == pytest.approx([3 * phi[0], phi[1]])
    # Σ_k w_k φ_k ℓ_k / Σ_k w_k, task means 3 and 4; not renormalised by φ: focal shrinks easy tasks.
    assert step_objective(balancing, [ROWS]) == pytest.approx((3 * phi[0] * 3 + phi[1] * 4) / 4)


def test_focal_task_level_keeps_the_difficulty_of_a_task_absent_from_a_step():
    balancing = FocalBalancing("task", 1.0, UNIFORM)
    balancing.observe(torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0]))
    balancing.observe(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0]))  # task 1 absent
    assert balancing.difficulty.tolist() == pytest.approx([3.0, 2.0])


def test_focal_task_level_coefficients_are_detached():
    batch, ce = make_batch(ROWS)
    balancing = FocalBalancing("task", 2.0, UNIFORM)
    balancing.observe(torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0]))
    assert not balancing.coefficients(batch, ce.requires_grad_(), batch_counts(batch, 2)).requires_grad


@pytest.mark.parametrize("level", ["task", "sample"])
def test_focal_accumulation_split_does_not_change_the_objective(level):
    balancing = FocalBalancing(level, 2.0, UNIFORM)
    balancing.observe(torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0]))
    whole = step_objective(balancing, [ROWS])
    assert step_objective(balancing, [[r] for r in ROWS]) == pytest.approx(whole)
    assert step_objective(balancing, [ROWS[:1], ROWS[1:]]) == pytest.approx(whole)


@pytest.mark.parametrize("level", ["task", "sample"])
def test_focal_absent_and_zero_target_tasks_give_no_nan(level):
    balancing = FocalBalancing(level, 2.0, torch.tensor([1.0, 1.0, 5.0]))
    rows = ROWS + [(2, [0.0, 0.0, 0.0], [0, 0, 0])]  # task 2: a sample without targets, CE 0
    value, grads = step_objective(balancing, [rows], num_tasks=3, grad=True)
    assert value == pytest.approx(step_objective(FocalBalancing(level, 2.0, UNIFORM), [ROWS]))
    assert torch.isfinite(grads[0]).all()


def test_focal_level_is_checked():
    with pytest.raises(ValueError, match="unknown focal level"):
        FocalBalancing("token", 2.0, UNIFORM)


# --- histories and slopes ----------------------------------------------------------------------


def test_slopes_keep_the_time_axis_aligned_across_missing_values():
    steps = torch.tensor([0.0, 1.0, 2.0, 3.0])
    values = torch.tensor(
        [
            [1.0, 0.9, 0.8, 0.7],  # slope -0.1
            [1.0, math.nan, math.nan, 0.4],  # -0.2: (3, 0.4) stays at step 3, not shifted onto step 1
            [math.nan, 2.0, math.nan, math.nan],  # one point: no trend
        ],
        dtype=torch.float64,
    )
    assert slopes(steps, values).tolist() == pytest.approx([-0.1, -0.2, 0.0])


def test_history_memory_is_bounded_by_its_length():
    history = LossHistory(2, 3)
    for step in range(10):
        history.append(step, torch.tensor([float(step), -float(step)]))
    assert history.steps.tolist() == [7.0, 8.0, 9.0] and history.values.shape == (2, 3)
    assert history.slopes().tolist() == pytest.approx([1.0, -1.0])


def test_validation_draws_are_a_pure_function_of_seed_and_draw():
    draws = [validation_sample(10, 4, 1234, d) for d in range(4)]
    assert draws[0] == validation_sample(10, 4, 1234, 0)
    # Two draws per permutation of the 10 samples: disjoint, the 2 left over differ between permutations.
    assert len(set(draws[0] + draws[1])) == 8 and len(set(draws[2] + draws[3])) == 8
    assert set(range(10)) - set(draws[0] + draws[1]) != set(range(10)) - set(draws[2] + draws[3])
    assert sorted(validation_sample(10, 64, 1234, 3)) == list(range(10))  # more than the split: all of it
    assert validation_sample(10, 4, 1, 0) != validation_sample(10, 4, 2, 0)


# --- self-paced --------------------------------------------------------------------------------


def test_self_paced_weights_follow_their_formula():
    """α = [-1, -0.25]: n = 2α/1.25 = [-1.6, -0.4], score = softmax(n)·(-n), w = softmax(50·score)."""
    n = [-1.6, -0.4]
    soft = [math.exp(v) / (math.exp(n[0]) + math.exp(n[1])) for v in n]
    score = [s * -v for s, v in zip(soft, n, strict=True)]
    w0 = 1 / (1 + math.exp(50 * (score[1] - score[0])))
    assert self_paced_weights(torch.tensor([-1.0, -0.25], dtype=torch.float64), 50).tolist() == pytest.approx(
        [w0, 1 - w0]
    )
    assert self_paced_weights(torch.zeros(3, dtype=torch.float64), 50).tolist() == pytest.approx([1 / 3] * 3)


def test_self_paced_starts_when_the_history_is_full_with_aligned_slopes():
    balancing = SelfPaced(2, interval=1, history_length=3, scale_factor=50, sample_count=8, seed=0)
    assert balancing.update(0, torch.tensor([3.0, 2.0])).tolist() == [0.5, 0.5]
    assert balancing.update(1, torch.tensor([2.0, math.nan])).tolist() == [0.5, 0.5]  # task 1 not sampled
    weights = balancing.update(2, torch.tensor([1.0, 1.5]))
    # task 1's slope is (1.5 - 2) / 2 = -0.25 on steps 0 and 2 (MFTCoder's shifted axis gave -0.5)
    expected = self_paced_weights(torch.tensor([-1.0, -0.25], dtype=torch.float64), 50)
    assert weights.tolist() == pytest.approx(expected.tolist())
    assert balancing.update(3, None).tolist() == pytest.approx(expected.tolist())  # no sample: unchanged
    assert balancing.draws == 3


# --- CoBa --------------------------------------------------------------------------------------


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_coba_scores_against_their_formulas():
    alpha = torch.tensor([-0.075, -0.25], dtype=torch.float64)
    assert relative_convergence(alpha).tolist() == pytest.approx(softmax([2 * -0.075 / 0.325, 2 * -0.25 / 0.325]))
    history = torch.tensor([[-0.1, -0.075], [-0.125, -0.25]], dtype=torch.float64)
    assert absolute_convergence(alpha, history).tolist() == pytest.approx(
        softmax([-2 * -0.075 / 0.175, -2 * -0.25 / 0.375])
    )
    # A flat history has no trend to scale: uniform scores, DF 1 (RCS).
    assert relative_convergence(torch.zeros(2, dtype=torch.float64)).tolist() == [0.5, 0.5]
    assert float(divergence_factor(torch.zeros(3, dtype=torch.float64), 5.0)) == 1.0


def test_coba_divergence_factor_is_clipped_to_one():
    # MFTCoder's example: max slopes -1 then -3, τ = 5: 2 · softmax([2.5, 7.5])[-1] = 1.987, clipped to 1.
    unclipped = 2 * softmax([-5 * 2 * -1 / 4, -5 * 2 * -3 / 4])[-1]
    assert unclipped == pytest.approx(1.9866, abs=1e-4)
    assert float(divergence_factor(torch.tensor([-1.0, -3.0], dtype=torch.float64), 5.0)) == 1.0
    # The worst task turned upward: 2 · softmax([5, -5])[-1], ACS takes over.
    diverging = float(divergence_factor(torch.tensor([-1.0, 1.0], dtype=torch.float64), 5.0))
    assert diverging == pytest.approx(2 / (1 + math.exp(10)))


def make_coba(**overrides):
    settings = dict(warmup_steps=2, history_length=3, tau=5.0, update_interval=1, sample_count=4, seed=0)
    return CoBa(2, **(settings | overrides))


def test_coba_on_a_hand_made_history():
    """Losses [2, 4] at step 0 are the initial ones; task 1 is missing from the sample of step 1."""
    coba = make_coba()
    assert coba.update(0, torch.tensor([2.0, 4.0])).tolist() == [0.5, 0.5]
    assert coba.slope_history.shape == (2, 0)  # one sample: no slope yet
    # Step 1, warm-up: uniform, but the slopes are recorded. Task 1 has one value: slope 0, and it is
    # no candidate for α_max (a 0 there would hide that task 0 falls).
    assert coba.update(1, torch.tensor([1.8, math.nan])).tolist() == [0.5, 0.5]
    assert coba.slope_history.flatten().tolist() == pytest.approx([-0.1, 0.0])
    assert coba.max_slopes.tolist() == pytest.approx([-0.1])

    # Step 2, ratios so far: task 0 [1, 0.9, 0.8], task 1 [1, -, 0.75] on steps 0..2.
    weights = coba.update(2, torch.tensor([1.6, 3.0]))
    # α = [-0.1, -0.125] (task 1 on steps 0 and 2; a shifted axis would give -0.25).
    # DF = 2 · softmax over two equal α_max [-0.1, -0.1] = 1, so ω = RCS.
    rcs = softmax([2 * -0.1 / 0.225, 2 * -0.125 / 0.225])
    assert coba.scores["acs"].tolist() == pytest.approx(softmax([-2 * -0.1 / 0.2, -2 * -0.125 / 0.125]))
    assert float(coba.scores["df"]) == pytest.approx(1.0)
    assert weights.tolist() == pytest.approx(rcs, rel=1e-6)
    assert weights[0] > weights[1]  # task 0 converges slower: RCS gives it more

    # Step 3: the window is steps 1..3; α = [-0.075, -0.25]; slope history [[-0.1, -0.1, -0.075],
    # [0, -0.125, -0.25]], α_max history [-0.1, -0.1, -0.075].
    weights = coba.update(3, torch.tensor([1.5, 2.0]))
    rcs = softmax([2 * -0.075 / 0.325, 2 * -0.25 / 0.325])
    acs = softmax([-3 * -0.075 / 0.275, -3 * -0.25 / 0.375])
    df = 3 * softmax([-5 * 3 * -0.1 / 0.275, -5 * 3 * -0.1 / 0.275, -5 * 3 * -0.075 / 0.275])[-1]
    assert df == pytest.approx(0.3402, abs=1e-4)  # the worst slope rose: DF leaves RCS for ACS
    assert float(coba.scores["df"]) == pytest.approx(df)
    assert weights.tolist() == pytest.approx([df * r + (1 - df) * a for r, a in zip(rcs, acs, strict=True)], rel=1e-6)
    assert float(coba.exact_weights.sum()) == pytest.approx(1.0)


def test_coba_slopes_of_the_warmup_enter_the_first_weights():
    """The paper's DF and ACS look back over the slopes before warm-up ended: a task whose loss
    turned upward during warm-up is not boosted at the first update (RCS alone would boost it)."""
    coba = make_coba(warmup_steps=4, history_length=4)
    ratios = [[1.0, 1.0], [0.8, 0.9], [0.6, 0.85], [0.45, 0.9], [0.35, 1.0]]  # task 1 turns up at step 3
    for step, r in enumerate(ratios):
        weights = coba.update(step, torch.tensor(r))
    assert float(coba.scores["df"]) < 0.5
    assert weights[1] < weights[0], weights


def same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_coba_memory_is_bounded_and_resume_is_exact():
    def losses(step):
        return torch.tensor([1 / (1 + 0.1 * step), 2 / (1 + 0.02 * step) + 0.01 * (step % 3)])

    whole = make_coba(update_interval=2)
    first = make_coba(update_interval=2)
    for step in range(0, 40, 2):
        whole.update(step, losses(step))
        if step < 20:
            first.update(step, losses(step))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_coba(update_interval=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.validation_indices(100) == first.validation_indices(100)  # the sampling position
    for step in range(20, 40, 2):
        resumed.update(step, losses(step))
    assert torch.equal(resumed.exact_weights, whole.exact_weights)
    assert same_state(resumed.state_dict(), whole.state_dict())
    assert whole.history.values.shape[-1] == whole.slope_history.shape[-1] == whole.max_slopes.numel() == 3


def test_coba_starts_after_warmup_whatever_the_interval():
    """Warm-up 5 with interval 2: uniform through step 4, CoBa from the update at step 6 (no crash)."""
    coba = make_coba(warmup_steps=5, update_interval=2)
    assert [s for s in range(9) if coba.validation_due(s)] == [2, 4, 6, 8]
    for step in (0, 2, 4):
        assert coba.update(step, torch.tensor([2.0 - 0.1 * step, 2.0 - 0.3 * step])).tolist() == [0.5, 0.5]
    assert coba.update(6, torch.tensor([1.4, 0.2])).tolist() != [0.5, 0.5]


def test_validation_indices_advance_with_each_update():
    coba = make_coba()
    first = coba.validation_indices(10)
    assert len(first) == 4
    coba.update(0, torch.tensor([1.0, 1.0]))
    assert coba.validation_indices(10) == validation_sample(10, 4, 0, 1) != first


def test_loss_vector_marks_absent_tasks():
    values = loss_vector(["a", "b", "c"], {"a": 1.5, "c": 2.0})
    assert values[0] == 1.5 and math.isnan(values[1]) and values[2] == 2.0


# --- modes from the config -----------------------------------------------------------------------


def config(**overrides):
    raw = {
        "pretrained_model_path": str(DEMO_MODEL),
        "data_paths": [str(DEMO_MODEL.parent / "data" / "code_completion")],
        "output_dir": "out",
        "data_split": [0.9, 0.1],
    }
    return validate_mapping(raw | overrides)


@pytest.mark.parametrize(
    ("mode", "kind"), [("case3", StaticWeights), ("focal", FocalBalancing), ("self_paced", SelfPaced), ("coba", CoBa)]
)
def test_build_balancing_by_mode(mode, kind, monkeypatch):
    built = build_balancing(config(weighted_loss_mode=mode, per_device_eval_batch_size=4, coba_sample_valid_num=3), 1)
    assert isinstance(built, kind)
    if mode == "coba":
        assert built.sample_count == 12  # validation batches of per_device_eval_batch_size, all processes together


def test_balancing_hyper_parameters_are_validated(monkeypatch):
    with pytest.raises(ConfigError) as caught:
        config(focal_gamma=-1, focal_level="token", coba_history_length=1, coba_tau=0, selfpaced_interval=0)
    fields = {issue.field for issue in caught.value.issues}
    assert fields == {"focal_gamma", "focal_level", "coba_history_length", "coba_tau", "selfpaced_interval"}
    with pytest.raises(ConfigError) as caught:
        config(weighted_loss_mode="coba", task_weights=[2.0])
    assert "learns the task weights" in caught.value.issues[0].message
    with pytest.raises(ConfigError) as caught:
        config(weighted_loss_mode="selfpaced", data_split=[1.0, 0.0], early_stopping=False, evaluation_steps=None)
    [issue] = caught.value.issues
    assert issue.field == "weighted_loss_mode" and "needs a validation split" in issue.message


@pytest.mark.parametrize("mode", [{"weighted_loss_mode": "case1"}, {"weighted_loss_mode": "case2"},
                                  {"weighted_loss_mode": "focal", "focal_level": "sample"}])  # fmt: skip
def test_task_weights_a_mode_would_ignore_are_refused(mode, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        config(task_weights=[2.0], **mode)
    [issue] = caught.value.issues
    assert issue.field == "task_weights" and "would ignore them" in issue.message


def test_task_weights_apply_in_case3_case4_and_focal_at_task_level(monkeypatch):
    for mode in ("case3", "case4", "focal"):  # focal at its default task level
        assert config(weighted_loss_mode=mode, task_weights=[2.0]).task_weights == [2.0]


def test_a_history_longer_than_the_run_is_a_warning(monkeypatch):
    [warning] = balancing_warnings(config(weighted_loss_mode="self_paced", selfpaced_history_length=11), 10)
    assert "fills at step 10" in warning
    assert balancing_warnings(config(weighted_loss_mode="self_paced", selfpaced_history_length=10), 10) == []
    [warning] = balancing_warnings(config(weighted_loss_mode="coba", coba_warmup_steps=9, coba_update_interval=2), 10)
    assert "first CoBa update comes at step 10" in warning
    assert balancing_warnings(config(weighted_loss_mode="coba", coba_warmup_steps=9), 10) == []
    # No warm-up, but the first draw (the second sample, the first slope) only comes at the interval.
    [warning] = balancing_warnings(config(weighted_loss_mode="coba", coba_warmup_steps=0, coba_update_interval=10), 10)
    assert "first CoBa update comes at step 10" in warning


# --- MoE router balance --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral():
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
    )  # fmt: skip
    return MixtralForCausalLM(config)


IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def test_router_balance_settings_from_the_model_config(mixtral):
    assert router_balance(mixtral.config).__dict__ == {"num_experts": 4, "top_k": 2, "coefficient": 0.02}
    qwen = router_balance(Qwen2MoeConfig(num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01))
    assert (qwen.num_experts, qwen.top_k, qwen.coefficient) == (8, 2, 0.01)
    assert router_balance(LlamaConfig()) is None


def test_router_balance_loss_equals_transformers_with_padding_excluded(mixtral):
    out = mixtral(input_ids=IDS, attention_mask=MASK, output_router_logits=True, use_cache=False)
    balance = router_balance(mixtral.config)
    ours = router_balance_loss(out.router_logits, balance, MASK.bool())
    assert torch.allclose(ours, load_balancing_loss_func(out.router_logits, 4, 2, MASK))
    assert torch.allclose(ours, out.aux_loss)  # what the model computes itself from its attention mask
    # Padding excluded: the same as the loss over the real tokens' router logits alone, and not the all-token one.
    real = tuple(layer[MASK.reshape(-1).bool()] for layer in out.router_logits)
    assert torch.allclose(ours, load_balancing_loss_func(real, 4, 2))
    assert not torch.allclose(ours, router_balance_loss(out.router_logits, balance, torch.ones(10, dtype=torch.bool)))
    with pytest.raises(ValueError, match="token_mask has 4 entries for router logits of 10 tokens"):
        router_balance_loss(out.router_logits, balance, MASK[:, :2])


def test_router_balance_loss_changes_the_gradient(mixtral):
    def gate_grad(with_aux):
        mixtral.zero_grad()
        out = mixtral(input_ids=IDS, attention_mask=MASK, output_router_logits=True, use_cache=False)
        loss = out.logits.float().logsumexp(-1).mean()
        if with_aux:
            balance = router_balance(mixtral.config)
            loss = loss + balance.coefficient * router_balance_loss(out.router_logits, balance, MASK.bool())
        loss.backward()
        return mixtral.model.layers[0].mlp.gate.weight.grad.clone()

    assert not torch.allclose(gate_grad(False), gate_grad(True))
