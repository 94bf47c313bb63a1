"""`mftcoder merge`: a LoRA adapter from a real (tiny) training run folded into its base model.

One short run per module trains the adapter; every test merges it (or refuses to) into a fresh
directory. Fake bases (other shapes, another architecture, quantised) are tiny models saved from
configs with random weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO_MODEL, reset_accelerate
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mftcoder.cli import main
from mftcoder.errors import MergeError
from mftcoder.merge import merge_adapter

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    """A 3-step LoRA run of the demo model; its OUTPUT_DIR (base_model/, final/, ...)."""
    from mftcoder.run_config import validate_mapping
    from mftcoder.training.trainer import train

    config = validate_mapping(
        {
            "pretrained_model_path": str(DEMO_MODEL),
            "model_init": "from_config",
            "data_paths": small_data,
            "data_split": [0.9, 0.1],
            "seq_length": 512,
            "output_dir": str(tmp_path_factory.mktemp("merge_run") / "out"),
            "peft_type": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "per_device_train_batch_size": 4,
            "learning_rate": 2e-2,  # high, so that 3 steps move the adapter well away from B = 0
            "num_warmup_steps": 0,
            "max_train_steps": 3,
            "log_interval": 3,
            "evaluation_steps": None,
            "checkpointing_steps": None,
            "early_stopping": False,
            "seed": 7,
        }
    )
    try:
        result = train(config)
    finally:
        reset_accelerate()
    return result.output_dir


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> Path:
    """The adapter merged with the defaults (recorded base, base dtype = fp32)."""
    return merge_adapter(trained / "final", tmp_path_factory.mktemp("merged") / "model")


def _sequences(tokenizer) -> list[torch.Tensor]:
    texts = [
        "def add(a, b):\n    return a + b\n",
        "<s>human\nWrite a unit test for reverse().\n<s>bot\n",
        "for i in range(10):\n    print(i * i)",
    ]
    sequences = [torch.tensor([tokenizer(text).input_ids]) for text in texts]
    sequences.append(torch.randint(0, len(tokenizer), (1, 48), generator=torch.Generator().manual_seed(0)))
    return sequences


@torch.no_grad()
def _logits(model, sequences) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids).logits.float() for ids in sequences]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _fp32(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# --- a successful merge ---------------------------------------------------------------------


def test_merged_model_matches_adapter_on_base(trained, merged):
    final, base_dir = trained / "final", trained / "base_model"
    recorded = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded) == base_dir.resolve() and Path(recorded).is_absolute()
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as handle:
        lora_b = max(handle.get_tensor(k).abs().max().item() for k in handle.keys() if "lora_B" in k)
    assert lora_b > 1e-3, "the adapter is still ~0: the training run did not move it"

    sequences = _sequences(AutoTokenizer.from_pretrained(final))
    plain = _logits(_fp32(base_dir), sequences)
    with_adapter = _logits(PeftModel.from_pretrained(_fp32(base_dir), final), sequences)
    folded = _logits(_fp32(merged), sequences)

    assert _max_diff(folded, with_adapter) < 1e-4
    assert _max_diff(folded, plain) > 1e-2, "merged logits equal the base's: the adapter was not applied"


def test_merged_dir_is_a_plain_model_with_tokenizer_and_template(trained, merged):
    names = {p.name for p in merged.iterdir()}
    assert any(name.endswith(".safetensors") for name in names), names
    assert {"config.json", "tokenizer_config.json", "chat_template.jinja"} <= names, names
    # A plain model: no adapter files (transformers would load the dir as a PEFT adapter).
    assert not {"adapter_config.json", "adapter_model.safetensors"} & names, names
    assert not merged.with_name(merged.name + ".tmp").exists()
    assert AutoConfig.from_pretrained(merged).model_type == "llama"

    tokenizer = AutoTokenizer.from_pretrained(merged)
    trained_tokenizer = AutoTokenizer.from_pretrained(trained / "final")
    assert (merged / "chat_template.jinja").read_text() == (trained / "final" / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<s>human\nAdd 1 and 2." in text and "<s>bot\n3" in text, text
    assert text == trained_tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert len(ids) > 0 and max(ids) < len(tokenizer)


# --- --dtype ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)],
)
def test_dtype_through_cli(trained, merged, tmp_path, capsys, spelling, expected):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained / "final"), "--output", str(out), "--dtype", spelling]) == 0
    assert str(out) in capsys.readouterr().out

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        weights = {k: handle.get_tensor(k) for k in handle.keys()}
    assert {w.dtype for w in weights.values()} == {expected}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == expected

    # The weights are the merged ones, only rounded: within a couple of ulps (at the tensor's scale)
    # of the fp32 merge. Merging in 16 bits rounds W and the LoRA delta separately, so the error is
    # relative to their magnitude, not to each (possibly ~0) merged element. The LoRA delta itself
    # is ~10x larger than this bound, so an unmerged base would fail.
    with safe_open(str(merged / "model.safetensors"), framework="pt") as handle:
        for key, weight in weights.items():
            reference = handle.get_tensor(key)
            if expected == torch.float32:
                assert torch.equal(weight, reference), key
            else:
                bound = 2 * torch.finfo(expected).eps * reference.abs().max().item()
                assert (weight.float() - reference).abs().max().item() <= bound, key


# --- refusals -------------------------------------------------------------------------------


def _refused(capsys, adapter: Path, output: Path, base: Path | None = None, match: str | None = None) -> str:
    """The API raises MergeError and the CLI exits 2 with `error: ...` on stderr; returns the message."""
    with pytest.raises(MergeError, match=match) as raised:
        merge_adapter(adapter, output, base=str(base) if base else None)
    argv = ["merge", "--adapter", str(adapter), "--output", str(output)] + (["--base", str(base)] if base else [])
    capsys.readouterr()  # drop what came before (e.g. progress bars of saving a fake base)
    assert main(argv) == 2
    err = capsys.readouterr().err  # may hold transformers' "Loading weights" progress bar first
    assert f"error: {raised.value}\n" in err, err
    assert err.endswith(f"error: {raised.value}\n") and "Traceback" not in err, err
    return str(raised.value)


def _demo_shaped(**changes) -> dict:
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config.pop("transformers_version", None)
    return {**config, **changes}


def test_refuses_base_with_other_shapes(trained, tmp_path, capsys):
    base = tmp_path / "narrow_llama"
    LlamaForCausalLM(LlamaConfig(**_demo_shaped(hidden_size=64, intermediate_size=96, head_dim=16))).save_pretrained(
        base
    )
    out = tmp_path / "merged"
    message = _refused(capsys, trained / "final", out, base=base, match="does not fit")
    # Names a weight and both shapes, e.g. "model.layers.0.mlp.down_proj.weight: base [64, 96] vs adapter ..."
    assert re.search(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight: base \[\d+, \d+\] vs adapter", message)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


@pytest.mark.parametrize("architecture", ["qwen2", "gpt_neox"])
def test_refuses_base_of_other_architecture(trained, tmp_path, capsys, architecture):
    # Same sizes as the demo Llama. Qwen2 even has the same module names (q_proj, ..., down_proj)
    # and shapes, so only the architecture check can tell it apart.
    sizes = {"vocab_size": 1294, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
    if architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, num_attention_heads=4, num_key_value_heads=2))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**sizes, num_attention_heads=4))
    base = tmp_path / architecture
    model.save_pretrained(base)
    out = tmp_path / "merged"
    message = _refused(capsys, trained / "final", out, base=base)
    assert "llama" in message and architecture in message, message
    assert not out.exists()


def test_refuses_quantised_base(trained, tmp_path, capsys):
    base = tmp_path / "quantised"
    shutil.copytree(trained / "base_model", base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    }
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    message = _refused(capsys, trained / "final", out, base=base, match="quantised")
    assert "bitsandbytes" in message
    assert not out.exists()


@pytest.mark.parametrize("case", ["run_dir", "base_model", "not_lora", "no_weights"])
def test_refuses_what_is_not_a_lora_adapter(trained, tmp_path, capsys, case):
    if case == "run_dir":  # the user gave OUTPUT_DIR instead of OUTPUT_DIR/final
        adapter, match = trained, "not a LoRA adapter"
    elif case == "base_model":
        adapter, match = trained / "base_model", "not a LoRA adapter"
    else:
        adapter = tmp_path / "adapter"
        shutil.copytree(trained / "final", adapter)
        if case == "not_lora":
            config = json.loads((adapter / "adapter_config.json").read_text())
            config["peft_type"] = "IA3"
            (adapter / "adapter_config.json").write_text(json.dumps(config))
            match = "only LoRA"
        else:
            (adapter / "adapter_model.safetensors").unlink()
            match = "no adapter_model.safetensors"
    out = tmp_path / "merged"
    _refused(capsys, adapter, out, match=match)
    assert not out.exists()


def test_refuses_non_empty_output_and_leaves_it_alone(trained, tmp_path, capsys):
    out = tmp_path / "taken"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "sub" / "model.safetensors").write_bytes(b"\x00not really weights")

    def snapshot() -> dict[str, bytes | None]:
        return {str(p.relative_to(out)): (p.read_bytes() if p.is_file() else None) for p in sorted(out.rglob("*"))}

    before = snapshot()
    _refused(capsys, trained / "final", out, match="not an empty directory")
    assert snapshot() == before
    assert not out.with_name(out.name + ".tmp").exists()
    a_file = tmp_path / "merged.bin"
    a_file.write_text("keep")
    _refused(capsys, trained / "final", a_file, match="not an empty directory")
    assert a_file.read_text() == "keep"
