"""Generate with a trained model: a batch of prompts from a data file, or a chat on stdin.

The model is a merged or fully fine-tuned model directory, an adapter directory (OUTPUT_DIR/final,
OUTPUT_DIR/best, a checkpoint) on its recorded base or on `base`, or a run's OUTPUT_DIR (its final/).
Prompts are rendered by the tokenizer saved with the model, whose chat template is the one training
rendered with, so `apply_chat_template(messages, add_generation_prompt=True)` gives exactly the
token ids training put before the assistant's answer.

Batch mode reads records in any format training reads (the last assistant turn, if any, is dropped
and kept as `reference`), generates `n` completions per record with left padding, and writes one
JSON line per record and completion, to a temporary file renamed at the end: a failed run leaves no
output file. The finish reason of a completion is `eos` (the model ended its turn), `stop` (cut at
the first of the stop strings) or `length` (max_new_tokens reached).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from peft import PeftModel
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria
from transformers import set_seed as set_all_seeds

from mftcoder.config.schema import DTYPE_ALIASES
from mftcoder.data.formats import Message
from mftcoder.data.records import read_task
from mftcoder.errors import DataError, GenerateError
from mftcoder.merge import shape_mismatches
from mftcoder.models.loading import TORCH_DTYPES, expert_rank_patterns
from mftcoder.models.provenance import BASE_INFO
from mftcoder.models.resolve import locate_model

FINISH_REASONS = ("eos", "stop", "length")
_PROBE = "\x1fmftcoder-probe\x1f"


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def sample(self) -> bool:
        return self.temperature > 0

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            problems.append(f"--n must be at least 1, got {self.n}")
        elif self.n > 1 and not self.sample:
            problems.append(f"--n {self.n} needs sampling (--temperature > 0): greedy completions are all the same")
        if any(not s for s in self.stop):
            problems.append("--stop: a stop string may not be empty")
        if problems:
            raise GenerateError("; ".join(problems))


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # eos | stop | length
    tokens: int  # generated tokens, up to and including the EOS
    token_ids: tuple[int, ...] = ()  # the generated ids (without padding after the EOS)


@dataclass(frozen=True)
class Prompt:
    messages: list[Message]
    reference: str | None = None
    source: str = ""


@dataclass
class Generator:
    """A model ready to generate, with the tokenizer (and chat template) it was trained with."""

    model: torch.nn.Module
    tokenizer: object
    description: str
    eos_ids: tuple[int, ...]
    turn_suffix: str = ""  # what the template writes between an answer's content and the EOS
    notes: list[str] = field(default_factory=list)
    source: Source | None = None  # where the model was loaded from

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=False))

    def generate(self, prompts: Sequence[Sequence[Message]], settings: Settings) -> list[list[Completion]]:
        """`settings.n` completions of each conversation, generated together as one left-padded batch."""
        return self.generate_ids([self.prompt_ids(m) for m in prompts], settings)

    def generate_text(self, texts: Sequence[str], settings: Settings) -> list[list[Completion]]:
        """`settings.n` continuations of each raw text (no chat template: a base model completing code),
        tokenized as the tokenizer does by default (with its BOS, if it adds one)."""
        return self.generate_ids([list(self.tokenizer(text)["input_ids"]) for text in texts], settings)

    def generate_ids(self, ids: Sequence[Sequence[int]], settings: Settings) -> list[list[Completion]]:
        """`settings.n` completions of each prompt given as token ids, generated as one left-padded batch."""
        prompts = [list(row) for row in ids]
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.device)
        width = batch["input_ids"].shape[1]
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.sample,
            temperature=settings.temperature if settings.sample else None,
            top_p=settings.top_p if settings.sample else None,
            top_k=None,
            num_return_sequences=settings.n,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        criteria = [_StopStrings(self.tokenizer, settings.stop, width)] if settings.stop else None
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=config, stopping_criteria=criteria)
        rows = [self._completion(row[width:].tolist(), settings) for row in out.cpu()]
        return [rows[i * settings.n : (i + 1) * settings.n] for i in range(len(prompts))]

    def _completion(self, new_ids: list[int], settings: Settings) -> Completion:
        cut = next((i for i, t in enumerate(new_ids) if t in self.eos_ids), None)
        kept = new_ids if cut is None else new_ids[:cut]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        generated = tuple(new_ids if cut is None else new_ids[: cut + 1])
        stopped = cut_at_stop(text, settings.stop)
        if stopped is not None:
            # A row that stopped is padded while the others go on.
            pad = self.tokenizer.pad_token_id
            while generated and generated[-1] == pad:
                generated = generated[:-1]
            return Completion(stopped, "stop", len(generated), generated)
        if cut is not None:
            text = text.removesuffix(self.turn_suffix) if self.turn_suffix else text
            return Completion(text, "eos", len(generated), generated)
        return Completion(text, "length", len(generated), generated)


def cut_at_stop(text: str, stops: Iterable[str]) -> str | None:
    """`text` up to the earliest stop string, or None when none occurs."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else None


class _StopStrings(StoppingCriteria):
    """Ends a row once its generated text (never the prompt) holds a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, tuple(stops), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        done = [cut_at_stop(t, self.stops) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# ---- locating and loading the model ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    model: Path  # the model directory, or the adapter directory
    adapter: bool
    base: str | None = None  # for an adapter: the base model (directory or hub id)


def resolve_source(model: str | Path, base: str | None = None) -> Source:
    """What `model` names: a model, an adapter (and its base), or a run's output directory (its final/)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise GenerateError(f"{path}: no such directory; give a model, an adapter (OUTPUT_DIR/final) or OUTPUT_DIR")
    if not path.is_dir():
        raise GenerateError(f"{path} is a file; give the model's directory")
    if not (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        if (path / "final").is_dir():
            path = path / "final"
        elif (path / "checkpoints").is_dir() or (path / "run.json").is_file():
            raise GenerateError(
                f"{path} is a run's output directory without final/ (the run has not finished); "
                f"give {path / 'best'} or a checkpoint under {path / 'checkpoints'}"
            )
        else:
            raise GenerateError(
                f"{path} holds no model (config.json), no adapter (adapter_config.json) and no final/ directory"
            )
    if (path / "adapter_config.json").is_file():
        adapter = json.loads((path / "adapter_config.json").read_text())
        recorded = adapter.get("base_model_name_or_path")
        if base is None and not recorded:
            raise GenerateError(f"{path}/adapter_config.json records no base model; pass --base")
        return Source(path, True, base or recorded)
    if base is not None:
        raise GenerateError(f"--base is for an adapter, but {path} is a full model (config.json, no adapter)")
    return Source(path, False)


def torch_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    key = DTYPE_ALIASES.get(name, name)
    if key not in TORCH_DTYPES:
        raise GenerateError(f"--dtype {name}: expected one of fp32, bf16, fp16")
    return TORCH_DTYPES[key]


def _locate_base(source: Source) -> Path | str:
    directory, problem = locate_model(source.base)
    if problem:
        hint = "pass --base"
        own = source.model.parent / "base_model"
        if own.is_dir():
            hint += f" (the run's own base is {own})"
        raise GenerateError(f"the base model of the adapter {source.model} cannot be found: {problem}; {hint}")
    return directory or source.base


def _adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        raise GenerateError(f"{adapter} has no adapter_model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _check_fits(source: Source, base: Path | str, base_config, vocab: int) -> None:
    """The architecture the adapter recorded, and every adapter shape, against the base (before loading it)."""
    info_path = source.model / BASE_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    trained_on = info.get("model_type")
    if trained_on and trained_on != base_config.model_type:
        raise GenerateError(
            f"the adapter {source.model} was trained on a {trained_on} model but the base {base} is "
            f"{base_config.model_type}"
        )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config)
        if vocab > skeleton.get_input_embeddings().num_embeddings:
            skeleton.resize_token_embeddings(vocab, mean_resizing=False)
    problems = shape_mismatches(skeleton, _adapter_shapes(source.model))
    if problems:
        listed = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise GenerateError(f"the adapter {source.model} does not fit the base {base}:\n  {listed}")


def _tokenizer(directory: Path | str, label: str, chat_template: bool = True):
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise GenerateError(f"{label} {directory}: cannot load its tokenizer ({err})") from None
    if chat_template and not tokenizer.chat_template:
        raise GenerateError(
            f"{label} {directory}: the tokenizer has no chat template, so prompts cannot be rendered as in "
            "training; use a directory written by mftcoder (OUTPUT_DIR/final, best/ or a merged model)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as training does
    tokenizer.padding_side = "left"
    return tokenizer


def _turn_suffix(tokenizer) -> str:
    """What the chat template writes after an assistant turn's content and before the EOS
    (the mftcoder layout: a newline); removed from completions that end with the EOS."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}], tokenize=False
        )
    except Exception:  # a template that cannot render the probe: nothing to remove
        return ""
    after = text[text.find(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
    end = after.find(tokenizer.eos_token) if tokenizer.eos_token else -1
    return after[:end] if end > 0 and not after[:end].strip() else ""


def load_generator(
    model: str | Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    chat_template: bool = True,
) -> Generator:
    """The model (or adapter on its base) and its tokenizer, ready to generate. `chat_template=False` also
    accepts a tokenizer without a chat template (raw-text prompts only: `Generator.generate_text`)."""
    source = resolve_source(model, base)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights_dtype = torch_dtype(dtype, target)
    notes = []
    if source.adapter:
        base_dir = _locate_base(source)
        has_tokenizer = (source.model / "tokenizer_config.json").is_file()
        tokenizer = _tokenizer(
            source.model if has_tokenizer else base_dir, "adapter" if has_tokenizer else "base", chat_template
        )
        base_config = AutoConfig.from_pretrained(base_dir)
        _check_fits(source, base_dir, base_config, len(tokenizer))
        network = AutoModelForCausalLM.from_pretrained(base_dir, dtype=weights_dtype)
        if len(tokenizer) > network.get_input_embeddings().num_embeddings:
            network.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        try:
            with expert_rank_patterns():
                network = PeftModel.from_pretrained(network, source.model)
        except RuntimeError as err:  # shapes the check above cannot attribute (fused MoE experts)
            if "size mismatch" not in str(err):
                raise
            raise GenerateError(f"the adapter {source.model} does not fit the base {base_dir}: {err}") from None
        description = f"adapter {source.model} on {base_dir}"
        info_path = source.model / BASE_INFO
        if info_path.is_file() and json.loads(info_path.read_text()).get("quantization"):
            notes.append(
                "note: the adapter was trained on a quantised (QLoRA) base and runs here on the full-precision "
                "one; its outputs differ slightly from the trained model's"
            )
    else:
        tokenizer = _tokenizer(source.model, "model", chat_template)
        network = AutoModelForCausalLM.from_pretrained(source.model, dtype=weights_dtype)
        description = f"model {source.model}"
    network.to(target).eval()
    eos = {tokenizer.eos_token_id}
    recorded = network.generation_config.eos_token_id
    eos.update(recorded if isinstance(recorded, list) else [recorded] if recorded is not None else [])
    description += f" ({str(weights_dtype).removeprefix('torch.')}, {target})"
    suffix = _turn_suffix(tokenizer) if tokenizer.chat_template else ""
    return Generator(network, tokenizer, description, tuple(sorted(eos)), suffix, notes, source)


# ---- batch mode ------------------------------------------------------------------------------------


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """The prompts of a data file (or directory) in any format training reads; bad records name file:line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    prompts = []
    for record in read_task(path, answer_required=False).records:
        if record.text is not None:
            raise DataError(f"{record.source}: a plain-text record (text) has no user prompt to answer")
        messages = list(record.messages)
        reference = None
        if messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"]
        prompts.append(Prompt(messages, reference, record.source))
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


def check_output(output_path: str | Path, overwrite: bool = False) -> Path:
    """Where the completions go: refused before anything runs when it exists (without `overwrite`)."""
    output = Path(output_path)
    if output.is_dir():
        raise GenerateError(f"{output} is a directory; give a file for the output")
    if output.exists() and not overwrite:
        raise GenerateError(f"{output} exists; give a new file or --overwrite")
    if not output.parent.is_dir():
        raise GenerateError(f"{output.parent}: no such directory for the output file")
    return output


def generate_file(
    generator: Generator,
    prompts: str | Path | Sequence[Prompt],
    output_path: str | Path,
    settings: Settings,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Completions of every prompt (of a data file, or given), one JSON line per prompt and sample, into
    `output_path`."""
    settings.check()
    if batch_size < 1:
        raise GenerateError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise GenerateError(f"--limit must be at least 1, got {limit}")
    output = check_output(output_path, overwrite)
    prompts = read_prompts(prompts, limit) if isinstance(prompts, str | Path) else list(prompts)[:limit]
    if settings.seed is not None:
        set_all_seeds(settings.seed)
    handle, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with (
            os.fdopen(handle, "w", encoding="utf-8") as out,
            tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar,
        ):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                results = generator.generate([p.messages for p in chunk], settings)
                for offset, (prompt, completions) in enumerate(zip(chunk, results, strict=True)):
                    for n, completion in enumerate(completions):
                        line = {
                            "index": start + offset,
                            "source": prompt.source,
                            "n": n,
                            "messages": prompt.messages,
                            "reference": prompt.reference,
                            "completion": completion.text,
                            "finish_reason": completion.finish_reason,
                            "completion_tokens": completion.tokens,
                        }
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                bar.update(len(chunk))
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


# ---- interactive mode ------------------------------------------------------------------------------

CHAT_HELP = "type a message; /reset starts a new conversation, /exit (or end of input) quits"


def chat(
    generator: Generator,
    settings: Settings,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """A multi-turn chat on stdin/stdout; returns the number of answers given."""
    settings.check()
    if settings.n != 1:
        raise GenerateError("--n: the interactive chat gives one answer per message")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdin.isatty()
    if settings.seed is not None:
        set_all_seeds(settings.seed)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    answers = 0
    print(CHAT_HELP, file=sys.stderr)
    while True:
        if tty:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        command = message.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history = list(start)
            print("(new conversation)", file=stdout)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": message})
        ((completion,),) = generator.generate([history], settings)
        history.append({"role": "assistant", "content": completion.text})
        answers += 1
        suffix = "" if completion.finish_reason == "eos" else f"\n[{completion.finish_reason}]"
        print(completion.text + suffix, file=stdout, flush=True)
    return answers
