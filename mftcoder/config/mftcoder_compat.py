"""Read CodeFuse MFTCoder (v0.5) train configs: detect them and translate them into our schema.

`MFTCODER_FIELDS` is the single source of truth: every MFTCoder field (the 60 of `MftTrainArgs`
plus the v0.3/v0.4 self-paced ones) is either copied (`Copy`, with a conversion where MFTCoder's
encoding differs) or dropped (`Ignore`, with the reason); `XXPO_FIELDS` does the same for the fields of
its DPO/ORPO entry point (`xxpo`), some under HF TrainingArguments' names (`Rename`). Each change is reported as a note that
says what happened and why, so a user can trust that their MFTCoder config means the same here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import ConfigError, Issue

DROP = object()  # a converter's result: the key is left out of the translated mapping
NO_DEFAULT = object()  # MFTCoder requires the field, or its default must not be carried over

# (value, whole MFTCoder mapping) -> (our value or DROP, reason; "" when nothing changed)
Converter = Callable[[Any, Mapping[str, Any]], tuple[Any, str]]

AS_STRING = "MFTCoder writes lists as one string"

# Our list-valued fields that MFTCoder writes as "[a,b]" strings.
LIST_FIELDS = ("data_paths", "task_weights", "target_modules", "data_split")


def _show(value: Any) -> str:
    """Values as the user wrote them in JSON/YAML (true, null), not as Python reprs."""
    return json.dumps(value, default=str)


def _is_bracketed(value: Any) -> bool:
    return isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]")


def _split_list(text: str) -> list[str]:
    """`"[a, b]"` -> ["a", "b"]: MFTCoder strips the brackets and splits on commas."""
    inner = text.strip()
    if _is_bracketed(inner):
        inner = inner[1:-1]
    return [item.strip() for item in inner.split(",") if item.strip()]


def _mftcoder_value(raw: Mapping[str, Any], key: str) -> Any:
    """What MFTCoder itself would use: the given value, else its default."""
    return raw.get(key, MFTCODER_FIELDS[key].default)


# --- converters ----------------------------------------------------------------------------


def _unchanged(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    return value, ""


def _paths(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    items = _split_list(value) if isinstance(value, str) else value
    if not isinstance(items, list):
        return value, ""  # the validator reports the wrong type
    paths = [(p.rstrip("/") or p) if isinstance(p, str) else p for p in items]
    reasons = [AS_STRING] if isinstance(value, str) else []
    if paths != items:
        reasons.append("trailing '/' removed (a task is named after the last path component)")
    return paths, "; ".join(reasons)


def _weights(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if not isinstance(value, str):
        return value, ""
    try:
        weights = [float(item) for item in _split_list(value)]
    except ValueError:
        raise ValueError(f'{_show(value)} is not a list of numbers such as "[1, 2]"') from None
    return weights, AS_STRING


def _modules(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value is None:
        return "all-linear", "MFTCoder's null means all linear layers"
    if _is_bracketed(value):
        return _split_list(value), AS_STRING
    return value, ""


def _data_split(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if not isinstance(value, str):
        return value, ""
    try:
        percents = [float(part) for part in re.split(r"[,/]", value.strip().strip("[]"))]
    except ValueError:
        raise ValueError(f'{_show(value)} is not a percentage list such as "98,2,0"') from None
    if len(percents) > 1 and abs(sum(percents) - 1) < 1e-6:
        # Read as percentages these would train on about 1% of the data, surely not what was meant.
        raise ValueError(
            f"{_show(value)} looks like fractions, but MFTCoder's data_split holds percentages "
            '("98,2,0"); in our schema write a list of fractions instead: data_split: [0.98, 0.02]'
        )
    if not 0 < percents[0] <= 100:
        raise ValueError(f"{_show(value)}: the train percentage must be above 0 and at most 100")
    train = round(percents[0] / 100, 10)
    split = [train, round(1 - train, 10)]
    return split, (
        "MFTCoder's JSONL path uses only the first number, as the train percentage, "
        "and puts every other row of a task in validation"
    )


def _loss_mode(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value == "selfpaced":
        return "self_paced", "the same mode, spelt the way mftcoder spells it"
    return value, ""


def _attention(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value == "flash_attention_2":
        # MFTCoder's default only runs with flash-attn on an Ampere+ GPU; auto keeps the config
        # usable on any machine while still picking flash-attention where it exists.
        return "auto", (
            "flash-attention-2 when installed, else sdpa (set attn_implementation=flash_attention_2 to insist on it)"
        )
    return value, ""


def _steps_or_off(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value == 0:
        return None, "MFTCoder's 0 turns step checkpoints off; mftcoder spells that null"
    return value, ""


def _saving_limit(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    full_fine_tuning = _mftcoder_value(raw, "peft_type") is None
    unset = value is None or (isinstance(value, int) and value < 1)
    if full_fine_tuning and unset:
        return 2, "MFTCoder keeps at most 2 step checkpoints of a full fine-tuning when saving_limit is unset"
    return value, ""


def _null_is_default(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    """MFTCoder's null that means 'the default', which is also ours: leave the key out."""
    return (DROP, "") if value is None else (value, "")


def _timeout(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value is None:
        return DROP, "mftcoder always sets a process-group timeout; its default of 3600 s applies"
    return value, ""


def _batches_on_all_processes(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    return value, (
        "MFTCoder evaluates this many validation batches on every process, mftcoder on all processes "
        "together, so that the weights do not depend on the number of processes (the same on one process)"
    )


def _only(accepted: Any, message: str) -> Callable[[Any], None]:
    """A check for an ignored field whose other values mftcoder cannot honour."""

    def check(value: Any) -> None:
        if value != accepted:
            raise ValueError(message)

    return check


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """Same name and meaning as our field, through `convert` where MFTCoder encodes it differently.

    `default` is MFTCoder's default; it is filled in when a config omits the field and it differs
    from ours, so the translated config trains like MFTCoder would have.
    """

    convert: Converter = _unchanged
    default: Any = NO_DEFAULT
    lora_only: bool = False  # LoRA defaults are noise in a full fine-tuning config

    def translate(self, value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
        new, reason = self.convert(value, raw)
        if not reason:
            return new, ""
        if new is DROP:
            return DROP, f"{_show(value)} dropped: {reason}"
        return new, f"{_show(value)} -> {_show(new)}: {reason}"

    def omitted(self, key: str, raw: Mapping[str, Any]) -> tuple[Any, str]:
        if self.default is NO_DEFAULT or (self.lora_only and _mftcoder_value(raw, "peft_type") is None):
            return DROP, ""
        new, reason = self.convert(self.default, raw)
        if new is DROP or new == TrainConfig.model_fields[key].get_default(call_default_factory=True):
            return DROP, ""
        return new, f"not set; MFTCoder's default {_show(new)} applied" + (f" ({reason})" if reason else "")


@dataclass(frozen=True)
class Ignore:
    """Not carried over, for `reason`; `check` rejects values whose behaviour mftcoder lacks.

    `default` is given only where MFTCoder's default does something mftcoder will not do, so that
    omitting the field still gets a note.
    """

    reason: str
    check: Callable[[Any], None] | None = None
    default: Any = NO_DEFAULT

    def translate(self, value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
        if self.check is not None:
            self.check(value)
        return DROP, f"{_show(value)} ignored: {self.reason}"

    def omitted(self, key: str, raw: Mapping[str, Any]) -> tuple[Any, str]:
        if self.default is NO_DEFAULT:
            return DROP, ""
        return DROP, f"not set; MFTCoder's default {_show(self.default)} ignored: {self.reason}"


BINARY_PATH_ONLY = "MFTCoder reads it only on its Megatron binary data path, which mftcoder does not have"
LEGACY = "a legacy field MFTCoder no longer reads"
FROM_LAUNCHER = "it comes from the launcher (accelerate config / command line), as in MFTCoder, which overwrote it"

# Order and defaults follow the MFTCoder v0.5 `MftTrainArgs` table, then the v0.3/v0.4 self-paced fields.
MFTCODER_FIELDS: dict[str, Copy | Ignore] = {
    "data_paths": Copy(_paths),
    "output_dir": Copy(),
    "tb_dir": Ignore("TensorBoard logs go to <output_dir>/logs"),
    "pretrained_model_path": Copy(),
    "model_type": Ignore("mftcoder reads the architecture from the model's config.json"),
    "load_raw_dataset": Ignore(
        "JSONL tokenized on the fly is mftcoder's only data path",
        _only(
            True,
            "the Megatron binary data path (load_raw_dataset: false) is not supported; give JSONL "
            "task directories or files in data_paths and set load_raw_dataset: true",
        ),
    ),
    "task_weights": Copy(_weights, None),
    "data_weights": Ignore(
        "MFTCoder overwrites it with 1.0 for every task, so it never had an effect; mftcoder's per-task "
        "sampling weight is `weight` in a data_paths entry ({path: ..., weight: 2.0}), and per-task loss "
        "weights are task_weights"
    ),
    "low_cpu_mem_usage": Ignore("MFTCoder never passed it to from_pretrained"),
    "data_split": Copy(_data_split, "98,2,0"),
    "padding_mode": Copy(default="padding"),
    "tokenize_mode": Ignore(
        "sft (loss on the assistant turns only) is what mftcoder does",
        _only(
            "sft",
            "tokenize_mode pretrain/sst (loss on every token of chat records, markers removed) has no "
            "mftcoder equivalent; for continued pre-training give `text` records (format: text)",
        ),
    ),
    "weighted_loss_mode": Copy(_loss_mode, "case3"),
    "peft_type": Copy(default="qlora"),
    "quantization": Ignore(
        "MFTCoder derives it from peft_type and ignores the value given: qlora means 4-bit, as mftcoder's "
        "quantization_bits defaults to (set quantization_bits: 8 for 8-bit)"
    ),
    "lora_rank": Copy(default=96, lora_only=True),
    "lora_alpha": Copy(default=32, lora_only=True),
    "lora_dropout": Copy(default=0.05, lora_only=True),
    "target_modules": Copy(_modules, None, lora_only=True),
    "per_device_train_batch_size": Copy(default=8),
    "per_device_eval_batch_size": Copy(default=8),
    "tokenizer_type": Ignore("mftcoder always loads the tokenizer with AutoTokenizer, MFTCoder's only accepted value"),
    "learning_rate": Copy(default=5e-5),
    "min_lr": Copy(default=5e-6),
    "weight_decay": Copy(default=0.01),
    "gradient_accumulation_steps": Copy(default=1),
    "lr_scheduler_type": Copy(default="cosine"),
    "num_warmup_steps": Copy(default=0.05),
    "num_train_epochs": Copy(default=4),
    "seed": Copy(default=1234),
    "seq_length": Copy(default=4096),
    # null is also our default; a path or `auto` is kept and judged by the validator.
    "resume_from_checkpoint": Copy(_null_is_default, None),
    "auto_resume": Ignore(
        "mftcoder never resumes silently; ask for a resume explicitly with "
        "resume_from_checkpoint: auto (the latest checkpoint in output_dir) or a checkpoint path",
        default=True,
    ),
    "log_interval": Copy(default=10),
    "checkpointing_steps": Copy(_steps_or_off, 100),
    "evaluation_steps": Copy(default=100),
    "max_train_steps": Copy(default=None),
    "epoch_checkpointing": Copy(default=False),
    "shuffle_before_split": Ignore(BINARY_PATH_ONLY),
    "use_random_sampler": Ignore(LEGACY),
    "early_stopping": Copy(default=True),
    "early_stopping_stall_num": Copy(default=5),
    "saving_limit": Copy(_saving_limit, None),
    "use_dynamic_padding": Ignore("mftcoder always pads a batch to its longest sample"),
    "coba_warmup_steps": Copy(default=100),
    "coba_history_length": Copy(default=200),
    "coba_tau": Copy(default=5),
    "coba_update_interval": Copy(default=1),
    "coba_sample_valid_num": Copy(_batches_on_all_processes, 1),
    "attn_implementation": Copy(_attention, "flash_attention_2"),
    "role_markers": Copy(_null_is_default, None),  # MFTCoder's null markers are our defaults
    "distributed_type": Ignore(FROM_LAUNCHER),
    "init_timeout_seconds": Copy(_timeout, 3600),
    "use_xformers": Ignore(LEGACY + "; attention is chosen by attn_implementation"),
    # MFTCoder's default true is not carried over: running a model repository's code stays opt-in.
    "trust_remote_code": Copy(),
    "weight_by_num_documents": Ignore(BINARY_PATH_ONLY),
    "make_vocab_size_divisible_by": Ignore("MFTCoder only computed a padded vocabulary size from it that nothing used"),
    "model_parallel_size": Ignore("MFTCoder only computed a padded vocabulary size from it that nothing used"),
    "use_slow_tokenizer": Ignore(LEGACY),
    "world_size": Ignore(FROM_LAUNCHER),
    "selfpaced_interval": Copy(default=1),
    "selfpaced_history_length": Copy(default=100),
    "selfpaced_sample_valid_num": Copy(_batches_on_all_processes, 1),
    "selfpaced_scale_factor": Copy(default=50),
}


# --- MFTCoder's preference-training entry point (xxpo: DPO/ORPO through TRL) ----------------


def _stage(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value not in ("dpo", "orpo"):
        raise ValueError(f"{_show(value)}: MFTCoder's xxpo is dpo or orpo")
    return value, "trained in mftcoder's own loop, docs/preference.md"


def _rpo_alpha(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value is not None and raw.get("xxpo") == "orpo":
        raise ValueError("MFTCoder hands rpo_alpha to TRL's ORPOConfig, which has no such field; remove it")
    return _null_is_default(value, raw)


def _hf_warmup(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if isinstance(value, int | float) and 0 < value < 1:
        return 0, "the HF Trainer of MFTCoder's xxpo reads it as a number of steps: a fraction meant no warm-up"
    return value, ""


def _max_steps(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    return (DROP, "") if value is None or value < 0 else (value, "")


HF_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"}
HF_OPTIMIZERS |= {"adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def _optimizer(value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
    if value not in HF_OPTIMIZERS:
        raise ValueError(
            f"{_show(value)} has no mftcoder equivalent; set optimizer: adamw, adamw_8bit or paged_adamw_8bit"
        )
    new = HF_OPTIMIZERS[value]
    return new, ("" if new == value else "the same optimizer under mftcoder's name")


@dataclass(frozen=True)
class Rename:
    """An xxpo field (HF TrainingArguments' spelling) that is our field `target`."""

    target: str
    convert: Converter = _unchanged
    default: Any = NO_DEFAULT

    def translate(self, value: Any, raw: Mapping[str, Any]) -> tuple[Any, str]:
        new, reason = self.convert(value, raw)
        if new is DROP:
            return DROP, ""
        return new, f"{_show(value)} -> {self.target}: {_show(new)}" + (f" ({reason})" if reason else "")

    def omitted(self, key: str, raw: Mapping[str, Any]) -> tuple[Any, str]:
        if self.default is NO_DEFAULT:
            return DROP, ""
        new, reason = self.convert(self.default, raw)
        if new is DROP or new == TrainConfig.model_fields[self.target].get_default(call_default_factory=True):
            return DROP, ""
        return new, f"not set; xxpo's default {_show(self.default)} applied as {self.target}: {_show(new)}" + (
            f" ({reason})" if reason else ""
        )


# The fields MFTCoder's `XXPOTrainArgs` has beyond `MftTrainArgs`; the shared ones follow the
# table above, except those whose HF spelling xxpo reads instead (XXPO_REPLACES).
XXPO_FIELDS: dict[str, Copy | Ignore | Rename] = {
    "xxpo": Rename("training_stage", _stage),
    "beta": Copy(default=0.1),
    # TRL averages the pair losses of a batch: every pair counts once.
    "weighted_loss_mode": Copy(_loss_mode, "case2"),
    # xxpo's schedule decays to 0: MFTCoder's default min_lr does not apply (a given one is honoured).
    "min_lr": Copy(),
    "rpo_alpha": Copy(_rpo_alpha, None),
    "optimizer_type": Rename("optimizer", _optimizer, "adamw_torch"),
    "gradient_checkpointing": Copy(default=True),
    "gradient_checkpointing_use_reentrant": Ignore(
        "mftcoder's activation checkpointing is always non-reentrant",
        _only(False, "reentrant activation checkpointing is not supported; remove the field or set it to false"),
    ),
    "warmup_steps": Rename("num_warmup_steps", _hf_warmup, 0.05),
    "save_only_model": Ignore("mftcoder's checkpoints always hold what an exact resume needs"),
    "logging_steps": Rename("log_interval", default=10),
    "save_steps": Rename("checkpointing_steps", _steps_or_off, 100),
    "eval_steps": Rename("evaluation_steps", default=100),
    "max_steps": Rename("max_train_steps", _max_steps, -1),
    "chat_template": Ignore("MFTCoder's xxpo never read it; the layout is `template` and role_markers"),
    "max_prompt_length": Ignore(
        "mftcoder keeps whole prompts; a pair longer than seq_length follows overlength (truncate cuts the "
        "shared prompt from the left)"
    ),
    "max_length": Rename("seq_length", default=4096),
    "dataset_num_proc": Rename("num_proc"),
    "dtype": Ignore("MFTCoder's xxpo never read it (it trains in bf16); the compute dtype comes from the launcher"),
    "disable_tqdm": Ignore("the progress bar is shown on the main process"),
    "sanity_check": Ignore(
        "it trained on the first 100 rows only",
        _only(False, "sanity_check has no mftcoder equivalent; use max_train_steps for a short run"),
    ),
    "ignore_bias_buffers": Ignore("a DDP workaround for boolean buffers that mftcoder does not need"),
}
# MFTCoder fields its xxpo entry point does not read, and the xxpo field it reads instead.
XXPO_REPLACES = {
    "seq_length": "max_length",
    "num_warmup_steps": "warmup_steps",
    "log_interval": "logging_steps",
    "checkpointing_steps": "save_steps",
    "evaluation_steps": "eval_steps",
    "max_train_steps": "max_steps",
}

# Keys that only an MFTCoder config has; derived so that a field our schema adopts stops counting.
MFTCODER_ONLY_FIELDS = (frozenset(MFTCODER_FIELDS) | frozenset(XXPO_FIELDS)) - frozenset(TrainConfig.model_fields)


# --- public API -----------------------------------------------------------------------------


def looks_like_mftcoder(raw: Mapping[str, Any]) -> bool:
    """An MFTCoder-only key, or a list written as a string (`data_paths: "[a,b]"`, `data_split: "98,2,0"`)."""
    if MFTCODER_ONLY_FIELDS & raw.keys():
        return True
    return isinstance(raw.get("data_split"), str) or any(_is_bracketed(raw.get(key)) for key in LIST_FIELDS)


def translate_mftcoder(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The mapping in our schema and one note per field that was changed, defaulted or ignored.

    Keys the table does not know are passed through, so that the validator reports them with a
    did-you-mean hint. Every value mftcoder cannot honour is collected into one ConfigError.
    """
    translated: dict[str, Any] = {}
    notes: list[str] = []
    issues: list[Issue] = []
    for key, rule in _rules(raw).items():
        try:
            value, note = rule.translate(raw[key], raw) if key in raw else rule.omitted(key, raw)
        except ValueError as err:
            issues.append(Issue(key, str(err)))
            continue
        if value is not DROP:
            translated[getattr(rule, "target", key)] = value
        if note:
            notes.append(f"{key}: {note}")
    if issues:
        raise ConfigError(issues)
    translated.update({key: value for key, value in raw.items() if key not in _rules(raw)})
    return translated, notes


def _rules(raw: Mapping[str, Any]) -> dict[str, Copy | Ignore | Rename]:
    """The MFTCoder table; for an xxpo (DPO/ORPO) config, with its own fields and spellings."""
    if "xxpo" not in raw:
        return MFTCODER_FIELDS
    replaced = {key: Ignore(f"MFTCoder's xxpo reads {xxpo} instead") for key, xxpo in XXPO_REPLACES.items()}
    return MFTCODER_FIELDS | replaced | XXPO_FIELDS
