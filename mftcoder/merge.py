"""Fold a LoRA adapter into its base model and save a plain Hugging Face model.

Refuses, before loading the base's weights, a base whose architecture or shapes don't match the adapter
and a quantised base (merging into rounded 4/8-bit weights silently changes the model).

A QLoRA adapter was fitted to the quantised base dequant(quant(W)), not to W. By default it is merged
into the 16/32-bit base W: the merged model keeps the full-precision base and differs from the model
that was trained by the quantisation error of the base weights. With `qlora_dequantized` the base is
quantised the way training did (as recorded next to the adapter) and dequantised before merging:
the merged weights are dequant(quant(W)) + BA, the QLoRA model itself, quantisation error included.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from mftcoder.config.schema import DTYPE_ALIASES
from mftcoder.errors import MergeError
from mftcoder.models.loading import TORCH_DTYPES, expert_rank_patterns, load_quantized
from mftcoder.models.provenance import BASE_INFO
from mftcoder.models.resolve import locate_model

_PREFIX = "base_model.model."


def _adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise MergeError(f"{adapter} is not a LoRA adapter (no adapter_config.json); give e.g. OUTPUT_DIR/final")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged")
    return config


def _base_info(adapter: Path) -> dict:
    path = adapter / BASE_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _base_config(name: str, label: str):
    directory, problem = locate_model(name)
    if problem:
        raise MergeError(f"{label} {name}: {problem}")
    config = AutoConfig.from_pretrained(directory or name)
    if getattr(config, "quantization_config", None):
        raise MergeError(
            f"{label} {name} is quantised ({config.quantization_config.get('quant_method', '?')}); merging into "
            "rounded weights changes the model. Merge into the 16/32-bit base model instead"
        )
    return config


def _adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        raise MergeError(f"{adapter} has no adapter_model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def shape_mismatches(model: torch.nn.Module, adapter_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What in the adapter does not fit `model`: missing modules, or in/out features that differ.

    LoRA on a parameter (fused MoE experts) is only checked for its module: PEFT nests one wrapper per
    adapted parameter of a module (`experts.base_layer.lora_A`, `experts.lora_A`), so a key does not say
    which parameter it adapts; PeftModel's loading then compares those shapes.
    """
    # Every name of a shared weight: a tied head is `lm_head.weight` in an adapter that trains it in full.
    params = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    modules = {name for name, _ in model.named_modules()}
    problems = []
    for key, shape in adapter_shapes.items():
        name = key.removeprefix(_PREFIX)
        for part, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if name.endswith(part):
                module = name.removesuffix(part)
                base = params.get(module + ".weight")
                if base is None and module.replace(".base_layer", "") not in modules:
                    problems.append(f"{module}.weight: not in the base model")
                elif base is not None and base[axis] != shape[axis]:
                    problems.append(f"{module}.weight: base {list(base)} vs adapter {name} {list(shape)}")
                break
        else:
            base = params.get(name)
            if base is None:
                problems.append(f"{name}: not in the base model")
            elif base != shape:
                problems.append(f"{name}: base {list(base)} vs adapter {list(shape)}")
    return problems


def _check_architecture(info: dict, base: str, base_config) -> None:
    """Same-shaped models of another family would merge silently: compare what the adapter recorded."""
    trained_on = info.get("model_type")
    if trained_on and trained_on != base_config.model_type:
        raise MergeError(
            f"the adapter was trained on a {trained_on} model but the base {base} is {base_config.model_type}"
        )


def _resized(model: torch.nn.Module, vocab: int) -> torch.nn.Module:
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def _dequantized_base(base: str, quantization: dict, dtype: torch.dtype) -> torch.nn.Module:
    """dequant(quant(W)) in `dtype`: the base quantised on the CPU as training recorded, then dequantised."""
    load_dtype = getattr(torch, quantization["load_dtype"])
    settings = BitsAndBytesConfig.from_dict(quantization["bitsandbytes"])
    model = load_quantized(base, settings, load_dtype, device_map={"": "cpu"})
    return model.dequantize(dtype=dtype).to(dtype)


def merge_adapter(
    adapter: str | Path,
    output: str | Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    qlora_dequantized: bool = False,
) -> Path:
    adapter, output = Path(adapter), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise MergeError(f"{output} exists and is not an empty directory; give a new directory for the merged model")
    lora = _adapter_config(adapter)
    info = _base_info(adapter)
    quantization = info.get("quantization")
    if qlora_dequantized and not quantization:
        raise MergeError(
            f"--qlora-dequantized: {adapter}/{BASE_INFO} records no quantisation, so the adapter was not trained "
            "with peft_type: qlora; merge without --qlora-dequantized"
        )
    base = base or lora.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter}/adapter_config.json records no base model; pass --base")
    base_config = _base_config(base, "base")
    _check_architecture(info, base, base_config)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base)

    # Shapes first, on a weightless copy: a mismatch is reported before the base is read from disk.
    with torch.device("meta"):
        skeleton = _resized(AutoModelForCausalLM.from_config(base_config), len(tokenizer))
    problems = shape_mismatches(skeleton, _adapter_shapes(adapter))
    if problems:
        listed = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise MergeError(f"the adapter {adapter} does not fit the base {base}:\n  {listed}")

    name = DTYPE_ALIASES.get(dtype, dtype) if dtype else None
    torch_dtype = TORCH_DTYPES[name] if name else (base_config.dtype or torch.float32)
    if qlora_dequantized:
        model = _dequantized_base(base, quantization, torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    try:
        with expert_rank_patterns():
            merged = PeftModel.from_pretrained(_resized(model, len(tokenizer)), adapter).merge_and_unload()
    except RuntimeError as err:  # shapes the key check above cannot attribute (fused MoE experts)
        if "size mismatch" not in str(err):
            raise
        raise MergeError(f"the adapter {adapter} does not fit the base {base}: {err}") from None
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(tmp)
    if output.exists():
        output.rmdir()
    tmp.rename(output)
    into = "dequant(quant(base))" if qlora_dequantized else base
    print(f"merged {adapter} into {into} ({str(torch_dtype).removeprefix('torch.')}) -> {output}")
    if quantization and not qlora_dequantized:
        print(
            "note: the adapter was trained on a quantised base and is merged into the full-precision one; the "
            "merged model differs from the trained one by the base's quantisation error (--qlora-dequantized "
            "merges into the dequantised base instead)"
        )
    return output
