"""Packing: bins (best-fit decreasing, nothing split or lost), concat windows, the packed layouts,
and isolation: a packed sample's logits and loss equal those of the sample run alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DEMO_MODEL, read_metrics
from test_families import TINY
from transformers import AutoConfig, AutoModelForCausalLM

from mftcoder.data.batching import Split, collate, collate_flat, collate_packed
from mftcoder.data.dataset import MultiTaskData, build_datasets
from mftcoder.data.packing import ISOLATION_VERIFIED, best_fit_decreasing, fill_rates, pack, windows
from mftcoder.data.sample import Sample
from mftcoder.data.template import chat_format
from mftcoder.errors import ConfigError, DataError
from mftcoder.losses.modes import batch_counts, task_sums, token_coefficients
from mftcoder.models.attention import PER_SAMPLE_SDPA
from mftcoder.models.packing_check import ROWS_TOLERANCE, check_packed_isolation, measure_isolation, rounding_tolerance
from mftcoder.run_config import load_config
from mftcoder.training.evaluation import MODEL_INPUTS, forward_token_losses
from mftcoder.training.trainer import Trainer

pytestmark = pytest.mark.unit


def sample(ids, mask=None, task=0):
    ids = np.asarray(ids, dtype=np.int32)
    return Sample(ids, np.ones(len(ids), dtype=np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8), task)


# --- bins ------------------------------------------------------------------------------------


def test_best_fit_decreasing_by_hand():
    # 6 opens bin 0 (4 left), 5 does not fit there and opens bin 1 (5 left), 3 goes to the
    # fullest bin that holds it: bin 0 (4 left), not bin 1.
    assert best_fit_decreasing(np.array([6, 3, 5]), 10) == [[0, 1], [2]]
    assert sorted(map(sorted, best_fit_decreasing(np.array([4, 4, 4]), 4))) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing(np.array([11]), 10)


def test_bins_split_nothing_lose_nothing_and_fill_well():
    lengths = np.random.default_rng(0).integers(20, 700, size=2000)
    bins = best_fit_decreasing(lengths, 2048, [3])
    members = sorted(i for b in bins for i in b)
    assert members == list(range(len(lengths)))  # every sample in exactly one bin: no split, tail kept
    assert max(lengths[b].sum() for b in bins) <= 2048
    assert lengths.sum() / (len(bins) * 2048) > 0.99
    assert best_fit_decreasing(lengths, 2048, [3]) == bins  # seeded, deterministic
    assert best_fit_decreasing(lengths, 2048, [4]) != bins  # the seed orders samples of equal length


def test_groups_never_share_a_bin():
    lengths = np.array([3, 3, 3, 3, 2, 2])
    groups = np.array([0, 1, 0, 1, 0, 1])
    bins = pack(lengths, groups, 8, [0])
    assert sorted(bins.members.tolist()) == list(range(6))
    for b in range(len(bins)):
        assert len(set(groups[bins[b]])) == 1 and groups[bins[b]][0] == bins.groups[b]
        assert lengths[bins[b]].sum() <= 8


def test_fill_rate_by_hand():
    # bins [6 (task 0), 3 (task 1)] and [5 (task 1)] of capacity 10: 9/10 and 5/10 full. Task 0 is
    # charged 6/9 of bin 0, task 1 the rest of bin 0 and all of bin 1.
    bins = pack(np.array([6, 3, 5]), np.zeros(3), 10, [0])
    rates = fill_rates(bins, np.array([6, 3, 5]), np.array([0, 1, 1]), 3, 10)
    assert rates[:2] == pytest.approx([6 / (10 * 6 / 9), 8 / (10 * 3 / 9 + 10)])
    assert np.isnan(rates[2])
    assert 14 / 20 == pytest.approx((6 + 8) / (10 * 6 / 9 + 10 * 3 / 9 + 10))  # the overall fill


@pytest.mark.parametrize("total", [2, 3, 4, 5, 10, 11, 12, 50])
def test_concat_windows_keep_the_tail_and_target_every_token_once(total):
    spans = windows(total, 4)
    assert all(2 <= stop - start <= 4 for start, stop in spans)
    targets = [t for start, stop in spans for t in range(start + 1, stop)]
    assert targets == list(range(1, total))  # the stream's last token is the last window's target


def test_concat_windows_by_hand():
    assert windows(10, 4) == [(0, 4), (3, 7), (6, 10)]
    assert windows(11, 4) == [(0, 4), (3, 7), (6, 10), (9, 11)]


# --- layouts ---------------------------------------------------------------------------------


def test_packed_rows_restart_positions_and_mask_boundaries():
    a, b, c = sample([11, 12, 13], task=0), sample([21, 22], [0, 1], task=1), sample([31, 32, 33, 34], task=0)
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # padding: a segment of its own
    assert batch["targets"].tolist() == [[12, 13, 0, 22, 0], [32, 33, 34, 0, 0]]
    # the last token of a sample predicts nothing: 13 is never trained to predict 21
    assert batch["loss_mask"].tolist() == [[True, True, False, True, False], [True, True, True, False, False]]
    assert batch["task_ids"].tolist()[0][:4] == [0, 0, 0, 1]
    assert batch["sample_ids"].tolist() == [[0, 0, -1, 1, -1], [2, 2, 2, -1, -1]]  # unique in the micro-batch
    assert batch["tokens"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]  # the row's padding is not a token


def test_flat_layout_carries_the_sequence_lengths():
    a, b, c = sample([11, 12, 13]), sample([21, 22]), sample([31, 32, 33, 34])
    batch = collate_flat([a, b, c], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert batch["loss_mask"].sum() == 2 + 1 + 3


def test_empty_packed_micro_batch_is_a_dummy_without_targets():
    for batch in (collate_packed([], pad_id=3), collate_flat([], pad_id=3)):
        assert batch["input_ids"].tolist() == [[3]] and not batch["loss_mask"].any()


def test_a_split_of_bins_batches_its_rows():
    samples = [sample([1] * n, task=n % 2) for n in (5, 3, 4, 2)]
    split = Split(samples, pack(np.array([5, 3, 4, 2]), np.zeros(4), 8, [0]))
    assert split.units == 2 and len(split) == 4
    assert split.tokens(range(2)) == 14
    batch = split.batch([0, 1], pad_id=0)
    assert batch["input_ids"].shape == (2, 8) and "position_ids" in batch
    assert split.task_ids([0, 1]) == {0, 1}
    assert len(split + Split(samples[:1])) == 5


def test_pack_mode_weights_act_on_bins_of_one_weight():
    """Tasks 0 and 2 (weight 1) share bins; task 1 (weight 2) is packed apart and each of its bins
    comes twice per epoch."""
    samples = [sample([1] * 4, task=t) for t in (0, 0, 1, 1, 2, 2)]
    groups = np.array([0, 0, 1, 1, 0, 0])  # weight_groups([1, 2, 1]): weight 1 -> 0, weight 2 -> 1
    train = Split(samples, pack(np.full(6, 4), groups, 8, [0]))
    data = MultiTaskData(["a", "b", "c"], train, [], {}, [1.0, 2.0, 1.0])
    assert len(train.bins) == 3 and data.epoch_size == 2 + 2
    order = data.epoch_order(5, 0)
    assert sorted(train.bins.groups[order].tolist()) == [0, 0, 1, 1]
    assert data.epoch_order(5, 0).tolist() == order.tolist()


# --- the data pipeline in pack and concat modes ------------------------------------------------


def test_pack_mode_data_bins_every_sample_once_and_reports_fill(tiny_config, demo_tokenizer):
    config = tiny_config(padding_mode="pack", seq_length=512)
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    for split in (data.train, data.valid):
        assert sorted(split.bins.members.tolist()) == list(range(len(split)))
        assert all(split.tokens([b]) <= 512 for b in range(split.units))
    assert max(len(data.valid.bins[b]) for b in range(data.valid.units)) > 1
    assert data.epoch_size == data.train.units < len(data.train)
    rates = [rep.fill_rate for rep in data.report.values()]
    assert all(0.5 < rate <= 1 for rate in rates)
    tokens = sum(len(s.input_ids) for s in data.train)
    assert tokens / (data.train.units * 512) == pytest.approx(
        tokens / sum(len(s.input_ids) / rate for s, rate in ((s, rates[s.task_id]) for s in data.train)), rel=1e-3
    )


def write_text_task(path, texts):
    path.mkdir(parents=True)
    (path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_concat_mode_streams_text_into_windows_keeping_the_tail(tiny_config, demo_tokenizer, tmp_path):
    texts = [f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 4) for i in range(30)]
    config = tiny_config(data_paths=[write_text_task(tmp_path / "code", texts)], padding_mode="concat", seq_length=16)
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    plain = tiny_config(data_paths=config.data_paths, seq_length=4096)
    docs = build_datasets(plain, demo_tokenizer, chat_format(plain, demo_tokenizer))
    stream = np.concatenate([s.input_ids for s in docs.train])
    rebuilt = np.concatenate([data.train[0].input_ids] + [w.input_ids[1:] for w in data.train[1:]])
    assert rebuilt.tolist() == stream.tolist()  # the windows overlap by one token and lose no tail
    assert all(len(w.input_ids) == 16 for w in data.train[:-1]) and 2 <= len(data.train[-1].input_ids) <= 16
    rep = data.report["code"]
    assert rep.train_samples == len(data.train) and rep.dropped_overlength == 0  # nothing is too long for a stream
    assert rep.fill_rate == pytest.approx(sum(len(w.input_ids) for w in data.train) / (16 * len(data.train)), abs=1e-4)


def test_concat_mode_refuses_chat_records(tiny_config, demo_tokenizer, small_data):
    config = tiny_config(padding_mode="concat")
    with pytest.raises(DataError, match=r"code_completion: padding_mode: concat .* has 40 chat_rounds records"):
        build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))


def test_pack_and_concat_are_valid_config_values(tiny_config):
    assert tiny_config(padding_mode="pack").padding_mode == "pack"
    assert tiny_config(padding_mode="concat").padding_mode == "concat"


def test_pack_mode_refuses_a_family_whose_isolation_is_not_verified(tmp_path, small_data):
    model = tmp_path / "bloom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps({"pretrained_model_path": str(model), "data_paths": small_data, "output_dir": str(tmp_path / "o")})
    )
    load_config(config, [])  # padding mode: fine
    with pytest.raises(ConfigError, match=r"padding_mode: pack: sample isolation is verified for llama.*not for bloom"):
        load_config(config, ["padding_mode=pack"])


# --- isolation ---------------------------------------------------------------------------------


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False).logits


def worst_difference(model, rows: list[list[Sample]], batch) -> float:
    """Max |packed logits - the logits of each sample run alone| over every token of every sample."""
    packed = logits_of(model, batch)
    worst = 0.0
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s.input_ids)
            alone = logits_of(model, collate([s], 0))[0]
            worst = max(worst, float((packed[r, start : start + n] - alone).abs().max()))
            start += n
    return worst


@pytest.fixture(scope="module")
def chat_and_text_rows(demo_tokenizer, tmp_path_factory):
    """Two packed rows of demo samples: chat records of two tasks and plain text records."""
    from conftest import write_subset

    from mftcoder.run_config import validate_mapping

    root = tmp_path_factory.mktemp("isolation")
    paths = write_subset(root, 6)[:2]
    paths.append(write_text_task(root / "text", ["import os\nprint(os.getcwd())\n", "x = [i * i for i in range(9)]\n"]))
    config = validate_mapping(
        {
            "pretrained_model_path": str(DEMO_MODEL),
            "data_paths": paths,
            "data_split": [1, 0],
            "output_dir": str(root / "o"),
            "padding_mode": "pack",
            "seq_length": 600,
            "evaluation_steps": None,
            "early_stopping": False,
        }
    )
    data = build_datasets(config, demo_tokenizer, chat_format(config, demo_tokenizer))
    rows = [data.train.unit(b) for b in range(2)]
    assert all(len(row) > 2 for row in rows) and {s.task_id for row in rows for s in row} == {0, 1, 2}
    return rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_demo_samples_see_only_themselves(chat_and_text_rows, attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL), attn_implementation=attn).eval()
    rows = chat_and_text_rows
    assert worst_difference(model, rows, collate_packed(rows, 0)) < 1e-5
    flat = [s for row in rows for s in row]
    assert worst_difference(model, [flat], collate_flat(flat, 0)) < 1e-5
    # the test can fail: an all-ones attention mask turns the derived block-diagonal mask off
    leaky = collate_packed(rows, 0)
    leaky["attention_mask"] = torch.ones_like(leaky["input_ids"])
    assert worst_difference(model, rows, leaky) > 1e-2


def tiny_family_model(model_type: str, attn: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY[model_type])
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


FAMILY_CASES = [(t, a) for t in ISOLATION_VERIFIED for a in ("sdpa", "eager") if not (t == "gemma2" and a == "sdpa")]


@pytest.mark.parametrize(("model_type", "attn"), FAMILY_CASES)
def test_every_verified_family_isolates_packed_samples(model_type, attn):
    model = tiny_family_model(model_type, attn)
    rng = np.random.default_rng(1)
    rows = [[sample(rng.integers(3, 120, n), task=n % 2) for n in lengths] for lengths in ([5, 9, 3], [7, 6])]
    assert worst_difference(model, rows, collate_packed(rows, 0)) < 1e-5


def test_a_bin_of_two_tasks_gives_each_task_its_unpacked_loss(chat_and_text_rows):
    """Per-task CE sums and every loss mode's objective are the same packed and padded."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL), attn_implementation="sdpa").eval()
    row = chat_and_text_rows[0]
    assert len({s.task_id for s in row}) >= 2
    packed, padded = collate_packed([row], 0), collate(row, 0)
    with torch.no_grad():
        ce_packed, ce_padded = forward_token_losses(model, packed), forward_token_losses(model, padded)
    assert torch.allclose(task_sums(ce_packed, packed, 3), task_sums(ce_padded, padded, 3), rtol=1e-5)
    assert torch.equal(batch_counts(packed, 3), batch_counts(padded, 3))
    weights = torch.tensor([1.0, 2.0, 0.5])
    for mode in ("case1", "case2", "case3", "case4"):
        objective = [
            float((token_coefficients(mode, b, batch_counts(b, 3), weights) * ce).sum())
            for b, ce in ((packed, ce_packed), (padded, ce_padded))
        ]
        assert objective[0] == pytest.approx(objective[1], rel=1e-5), mode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention-2 needs a CUDA GPU")
def test_flash_attention_flat_layout_isolates_samples():
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flash_attention_2", dtype=torch.bfloat16)
    model = model.cuda().eval()
    rng = np.random.default_rng(1)
    rows = [[sample(rng.integers(3, 1000, n)) for n in lengths] for lengths in ([50, 90, 30], [70, 60])]
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in collate_flat([s for r in rows for s in r], 0).items()
    }
    packed = logits_of(model, batch).float()
    start = 0
    for s in (s for r in rows for s in r):
        n = len(s.input_ids)
        alone = logits_of(model, {"input_ids": torch.as_tensor(s.input_ids, dtype=torch.long, device="cuda")[None]})
        assert float((packed[0, start : start + n] - alone[0].float()).abs().max()) < 5e-2  # bf16
        start += n


# --- the start-up check on the loaded model ------------------------------------------------------


@pytest.mark.parametrize(("attn", "flat"), [("sdpa", False), ("sdpa", True), ("eager", False), ("eager", True),
                                           (PER_SAMPLE_SDPA, True)])  # fmt: skip
def test_start_up_check_passes_the_demo_model_and_keeps_its_mode(attn, flat):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL), attn_implementation=attn)
    model.train()
    # The same kernels on a CPU, and the other sample's terms masked to exact zeros: not even rounding differs.
    assert check_packed_isolation(model, flat, torch.float32, torch.device("cpu")) == 0.0
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    check_packed_isolation(model, flat, torch.float32, torch.device("cpu"))
    assert not model.training


def test_rounding_tolerance_is_16_units_in_the_last_place_of_the_matmuls():
    assert rounding_tolerance(torch.bfloat16) == 16 * 2**-7
    assert rounding_tolerance(torch.float16) == 16 * 2**-10
    assert rounding_tolerance(torch.float32) == 1e-3  # 16 * 2**-23 is below the floor
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 on a GPU
        assert rounding_tolerance(torch.float32) == 16 * 2**-10
    finally:
        torch.set_float32_matmul_precision(precision)


# transformers' own classes whose attention ignores the position ids' packing, each with a compute dtype whose
# rounding allowance its leak exceeds. Measured on these tiny random models: OPT's probe logits move by 37% of their
# size (bf16 allows 12.5%), BLOOM's (ALiBi, small random weights) by 0.82% (fp32 allows 0.1%, bf16 would not see it).
LEAKY = {
    "opt": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 64,
             "word_embed_proj_dim": 32}, "sdpa", torch.bfloat16),
    "bloom": ({"hidden_size": 32, "n_layer": 2, "n_head": 4}, "eager", torch.float32),  # it has no sdpa
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_leak_below_half_precision_rounding_shows_between_the_rows(dtype):
    """BLOOM's small leak (under 1% of the logits) passes the packed-against-alone comparison that bf16 and
    fp16 rounding must allow; C after two different samples in one batch, computed alike, still shows it."""
    options, attn, _ = LEAKY["bloom"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("bloom", vocab_size=128, **options), attn_implementation=attn
    )
    isolation = measure_isolation(model, False, torch.device("cpu"))
    assert isolation.alone < rounding_tolerance(dtype) and isolation.rows > 2 * ROWS_TOLERANCE
    with pytest.raises(ConfigError, match=r"between two rows where it follows different samples"):
        check_packed_isolation(model, False, dtype, torch.device("cpu"))


@pytest.mark.parametrize("model_type", LEAKY)
def test_start_up_check_refuses_a_model_whose_attention_ignores_packing(model_type):
    options, attn, dtype = LEAKY[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=128, **options)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    assert measure_isolation(model, False, torch.device("cpu")).alone > 2 * rounding_tolerance(dtype)
    name = type(model).__name__
    with pytest.raises(
        ConfigError,
        match=rf"padding_mode: pack: packed samples see each other in {name} with attn_implementation {attn}: .*"
        rf"Use padding_mode: padding, or another attn_implementation than {attn}$",
    ):
        check_packed_isolation(model, False, dtype, torch.device("cpu"))


SELF_MASKING_CODE = """
import torch
from transformers import LlamaForCausalLM


class SelfMaskingLlamaForCausalLM(LlamaForCausalLM):
    \"\"\"Masks the whole row causally, as modelling code that builds its own mask does: without an attention
    mask it passes an all-ones one, so transformers does not derive the mask from the position ids.\"\"\"

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
"""


@pytest.mark.e2e
def test_remote_code_with_a_mask_of_its_own_is_refused_at_load(tiny_config, tmp_path):
    """The config names the llama family, so validation lets pack mode pass; the class that loads is the
    model repository's own."""
    model = tmp_path / "self_masking_llama"
    model.mkdir()
    model_config = json.loads((DEMO_MODEL / "config.json").read_text())
    model_config["auto_map"] = {"AutoModelForCausalLM": "modeling_self_masking.SelfMaskingLlamaForCausalLM"}
    (model / "config.json").write_text(json.dumps(model_config))
    (model / "modeling_self_masking.py").write_text(SELF_MASKING_CODE)
    config = tiny_config(
        pretrained_model_path=str(model), tokenizer_path=str(DEMO_MODEL), trust_remote_code=True, padding_mode="pack"
    )
    with pytest.raises(
        ConfigError,
        match=r"see each other in SelfMaskingLlamaForCausalLM \(remote code\) with attn_implementation sdpa: .*"
        r"Use padding_mode: padding, or trust_remote_code: false",
    ):
        Trainer(config).train()
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.e2e
def test_a_hub_model_validation_could_not_read_is_checked_at_load(tiny_config, tmp_path, monkeypatch):
    """Validated online before it is downloaded, a hub id is not read, so no family check refuses pack mode;
    the OPT model it names is refused when it loads. Once in the cache, validation refuses it by family."""
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads its cache and offline settings once, when imported: the test sets its own.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # eager: OPT's per-sample sdpa on the CPU (the flat layout) would isolate the samples
    settings = {"pretrained_model_path": "acme/tiny-opt", "tokenizer_path": str(DEMO_MODEL), "padding_mode": "pack",
                "attn_implementation": "eager"}  # fmt: skip
    config = tiny_config(**settings)
    repo = tmp_path / "hub" / "models--acme--tiny-opt"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    tiny_opt = {"model_type": "opt", "vocab_size": 1294, **LEAKY["opt"][0]}
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(tiny_opt))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # downloaded: nothing may reach the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ConfigError, match=r"packed samples see each other in OPTForCausalLM with attn_implementation eager"
    ):
        Trainer(config).train()
    assert not (tmp_path / "out" / "final").exists()
    with pytest.raises(ConfigError, match=r"sample isolation is verified for .* not for opt"):
        tiny_config(**settings)


# --- a run -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_pack_mode_validation_loss_equals_padding_mode_without_updates(tiny_config, tmp_path):
    losses, valid_rows = {}, None
    for mode in ("padding", "pack"):
        config = tiny_config(padding_mode=mode, learning_rate=0.0, max_train_steps=2, output_dir=str(tmp_path / mode))
        trainer = Trainer(config)
        trainer.train()
        (valid,) = [m for m in read_metrics(tmp_path / mode) if m["split"] == "valid"]
        losses[mode] = valid["task_loss"]
        if mode == "pack":
            valid = trainer.run.data.valid
            valid_rows = [len(valid.unit(b)) for b in range(valid.units)]
            report = json.loads((tmp_path / mode / "logs" / "data_report.json").read_text())
            assert all(0 < task["fill_rate"] <= 1 for task in report.values())
    assert max(valid_rows) > 1, "no packed validation row held several samples"
    assert losses["pack"].keys() == losses["padding"].keys()
    for task, loss in losses["padding"].items():
        assert losses["pack"][task] == pytest.approx(loss, rel=1e-5), task
