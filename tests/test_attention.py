"""Per-sample sdpa on flat packed rows (mftcoder/models/attention.py): the same attention and gradients as sdpa
with the block-diagonal causal mask, which attention a run resolves to, and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_MODEL
from test_families import TINY
from test_packing import sample
from transformers import AutoConfig, AutoModelForCausalLM

from mftcoder.config import TrainConfig
from mftcoder.data.batching import MODEL_INPUTS, collate_flat, collate_packed
from mftcoder.data.packing import ISOLATION_VERIFIED
from mftcoder.errors import TrainingError
from mftcoder.models.attention import FLAT_LAYOUT, PER_SAMPLE_SDPA, resolve_attention, sdpa_per_sample

pytestmark = pytest.mark.unit

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LENGTHS = [5, 1, 9, 3]


class Attention(torch.nn.Module):
    is_causal = True


def block_mask(lengths: list[int], window: int | None = None) -> torch.Tensor:
    """The mask transformers derives for a packed row: causal within each sample (and within `window`)."""
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        for i in range(n):
            low = 0 if window is None else max(0, i - window + 1)
            mask[start + i, start + low : start + i + 1] = True
        start += n
    return mask


def qkv(heads=4, kv_heads=4, dim=8, value_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    shapes = ((1, heads, total, dim), (1, kv_heads, total, dim), (1, kv_heads, total, value_dim))
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def cu_seq_lens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "value_dim", "window"),
    [(4, 4, 8, None), (4, 2, 8, None), (4, 1, 8, None), (4, 4, 6, None), (4, 2, 8, 4)],
    ids=["mha", "gqa", "mqa", "other-value-dim", "sliding-window"],
)
def test_attention_and_gradients_equal_sdpa_with_the_block_mask(heads, kv_heads, value_dim, window):
    q, k, v = qkv(heads, kv_heads, value_dim=value_dim)
    out, weights = sdpa_per_sample(Attention(), q, k, v, None, scaling=0.3, sliding_window=window,
                                   cu_seq_lens_q=cu_seq_lens(LENGTHS))  # fmt: skip
    assert weights is None and out.shape == (1, sum(LENGTHS), heads, value_dim)
    groups = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=block_mask(LENGTHS, window),
        scale=0.3,
    ).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_a_window_longer_than_every_sample_is_plain_causal_attention():
    q, k, v = qkv()
    lens = cu_seq_lens(LENGTHS)
    windowed, _ = sdpa_per_sample(Attention(), q, k, v, None, sliding_window=max(LENGTHS), cu_seq_lens_q=lens)
    causal, _ = sdpa_per_sample(Attention(), q, k, v, None, cu_seq_lens_q=lens)
    assert torch.equal(windowed, causal)
    # the test can fail: a window shorter than a sample changes that sample's attention
    shorter, _ = sdpa_per_sample(Attention(), q, k, v, None, sliding_window=2, cu_seq_lens_q=lens)
    assert not torch.allclose(shorter, causal)


def test_demo_model_losses_and_gradients_equal_the_masked_packed_rows():
    """One optimizer step's worth: the flat layout with per-sample sdpa against the packed rows with sdpa's
    block mask, same weights."""
    torch.manual_seed(0)
    masked, per_sample = (  # a config each: a model keeps its attention implementation in its config
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL), attn_implementation=attn)
        for attn in ("sdpa", PER_SAMPLE_SDPA)
    )
    per_sample.load_state_dict(masked.state_dict())
    g = torch.Generator().manual_seed(2)
    rows = [
        [sample(torch.randint(3, 1000, (n,), generator=g).numpy()) for n in lengths] for lengths in ([40, 7, 25], [60])
    ]

    def loss_and_grads(model, batch):
        model.zero_grad()
        logits = model(**{key: batch[key] for key in MODEL_INPUTS if key in batch}, use_cache=False).logits
        loss = F.cross_entropy(logits[batch["loss_mask"]], batch["target_ids"], reduction="sum")
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss_masked, grads_masked = loss_and_grads(masked, collate_packed(rows, 0))
    loss_flat, grads_flat = loss_and_grads(per_sample, collate_flat([s for row in rows for s in row], 0))
    torch.testing.assert_close(loss_flat, loss_masked, rtol=1e-5, atol=1e-4)
    for name, grad in grads_masked.items():
        torch.testing.assert_close(grads_flat[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# Windows shorter than the samples below, on the layers that slide (Qwen2 and Qwen2-MoE: every layer).
WINDOWS = {
    "mistral": {"sliding_window": 3}, "mixtral": {"sliding_window": 3}, "starcoder2": {"sliding_window": 3},
    "phi3": {"sliding_window": 3}, "gemma3_text": {"sliding_window": 3},
    "qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0},
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2},
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": 3},
}  # fmt: skip


@pytest.mark.parametrize("model_type", [t for t in ISOLATION_VERIFIED if t != "gemma2"])  # gemma2: no sdpa
def test_every_family_attends_per_sample_as_eager_attends_its_packed_rows(model_type):
    """Against eager attention on packed rows with the same weights (its isolation is tested in
    test_packing.py), with sliding windows shorter than the samples where the family has them."""
    eager, per_sample = (
        AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **TINY[model_type], **WINDOWS.get(model_type, {})),
            attn_implementation=attn,
        ).eval()
        for attn in ("eager", PER_SAMPLE_SDPA)
    )
    per_sample.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    rows = [
        [sample(torch.randint(3, 120, (n,), generator=g).numpy()) for n in lengths] for lengths in ([5, 9, 3], [7, 6])
    ]

    def logits(model, batch):
        with torch.no_grad():
            return model(**{key: batch[key] for key in MODEL_INPUTS if key in batch}, use_cache=False).logits

    packed = logits(eager, collate_packed(rows, 0))
    flat = logits(per_sample, collate_flat([s for row in rows for s in row], 0))[0]
    expected = torch.cat([packed[r, : sum(len(s.input_ids) for s in row)] for r, row in enumerate(rows)])
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"softcap": 50.0}, "needs softcap, which per-sample sdpa does not compute; set attn_implementation: eager"),
        ({"s_aux": torch.zeros(4)}, "needs s_aux"),
        ({"cu_seq_lens_q": None}, "flat packed layout only .*no sequence lengths"),
        ({"attention_mask": torch.ones(1, 1, 18, 18, dtype=torch.bool)}, "flat packed layout only .*a mask"),
    ],
    ids=["softcap", "sinks", "no-lengths", "mask"],
)
def test_what_it_cannot_compute_is_refused(kwargs, message):
    q, k, v = qkv()
    call = {"attention_mask": None, "cu_seq_lens_q": cu_seq_lens(LENGTHS), **kwargs}
    with pytest.raises(TrainingError, match=message):
        sdpa_per_sample(Attention(), q, k, v, **call)


def test_bidirectional_attention_is_refused():
    encoder = Attention()
    encoder.is_causal = False
    q, k, v = qkv()
    with pytest.raises(TrainingError, match="bidirectional attention"):
        sdpa_per_sample(encoder, q, k, v, None, cu_seq_lens_q=cu_seq_lens(LENGTHS))
    with pytest.raises(TrainingError, match="bidirectional attention"):
        sdpa_per_sample(Attention(), q, k, v, None, cu_seq_lens_q=cu_seq_lens(LENGTHS), is_causal=False)


def run_config(**overrides) -> TrainConfig:
    raw = {"pretrained_model_path": str(DEMO_MODEL), "data_paths": ["unused"], "output_dir": "unused",
           "attn_implementation": "sdpa", "padding_mode": "pack", **overrides}  # fmt: skip
    return TrainConfig(**raw)


@pytest.mark.parametrize(
    ("overrides", "device", "expected"),
    [
        ({}, CPU, PER_SAMPLE_SDPA),
        ({"attn_implementation": "auto"}, CPU, PER_SAMPLE_SDPA),  # the demo model is a llama: sdpa
        ({"padding_mode": "padding"}, CPU, "sdpa"),
        ({}, CUDA, "sdpa"),
        ({"trust_remote_code": True}, CPU, "sdpa"),  # remote code may not pass the sequence lengths on
        ({"attn_implementation": "eager"}, CPU, "eager"),
    ],
    ids=["pack-cpu", "auto", "padding", "cuda", "remote-code", "eager"],
)
def test_sdpa_on_packed_rows_on_the_cpu_attends_per_sample(overrides, device, expected):
    attention = resolve_attention(run_config(**overrides), device)
    assert attention == expected
    assert (attention in FLAT_LAYOUT) == (expected == PER_SAMPLE_SDPA)


def test_preference_pairs_keep_their_padded_rows():
    config = run_config(training_stage="dpo")
    assert resolve_attention(config, CPU) == "sdpa"
