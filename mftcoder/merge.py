"""Fold a LoRA adapter into its base model and save a plain Hugging Face model.

Refuses, before loading the base's weights, a base whose architecture or shapes don't match the adapter
and a quantised base (merging into rounded 4/8-bit weights silently changes the model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mftcoder.config.schema import DTYPE_ALIASES
from mftcoder.errors import MergeError
from mftcoder.models.loading import TORCH_DTYPES
from mftcoder.models.resolve import locate_model

_PREFIX = "base_model.model."
# Written next to an adapter by training: what the base was, since adapter_config.json does not say.
BASE_INFO = "base_model_info.json"


def _adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise MergeError(f"{adapter} is not a LoRA adapter (no adapter_config.json); give e.g. OUTPUT_DIR/final")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged")
    return config


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
    """What in the adapter does not fit `model`: missing modules, or in/out features that differ."""
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    problems = []
    for key, shape in adapter_shapes.items():
        name = key.removeprefix(_PREFIX)
        for part, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if name.endswith(part):
                base_key = name.removesuffix(part) + ".weight"
                base = params.get(base_key)
                if base is None:
                    problems.append(f"{base_key}: not in the base model")
                elif base[axis] != shape[axis]:
                    problems.append(f"{base_key}: base {list(base)} vs adapter {name} {list(shape)}")
                break
        else:
            base = params.get(name)
            if base is None:
                problems.append(f"{name}: not in the base model")
            elif base != shape:
                problems.append(f"{name}: base {list(base)} vs adapter {list(shape)}")
    return problems


def _check_architecture(adapter: Path, base: str, base_config) -> None:
    """Same-shaped models of another family would merge silently: compare what the adapter recorded."""
    info = adapter / BASE_INFO
    if not info.is_file():
        return
    trained_on = json.loads(info.read_text()).get("model_type")
    if trained_on and trained_on != base_config.model_type:
        raise MergeError(
            f"the adapter was trained on a {trained_on} model but the base {base} is {base_config.model_type}"
        )


def _resized(model: torch.nn.Module, vocab: int) -> torch.nn.Module:
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def merge_adapter(adapter: str | Path, output: str | Path, *, base: str | None = None, dtype: str | None = None) -> Path:
    adapter, output = Path(adapter), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise MergeError(f"{output} exists and is not an empty directory; give a new directory for the merged model")
    lora = _adapter_config(adapter)
    base = base or lora.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter}/adapter_config.json records no base model; pass --base")
    base_config = _base_config(base, "base")
    _check_architecture(adapter, base, base_config)
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
    model = _resized(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype), len(tokenizer))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(tmp)
    if output.exists():
        output.rmdir()
    tmp.rename(output)
    print(f"merged {adapter} into {base} ({str(torch_dtype).removeprefix('torch.')}) -> {output}")
    return output
