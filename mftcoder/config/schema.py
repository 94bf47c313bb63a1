"""The one typed train config.

Flat top-level keys for everything a user commonly overrides, MFTCoder's field names where the
concept is the same. Field-level rules live here; rules that involve several fields or the file
system live in `checks.py` so that all problems can be reported together.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WrapValidator, field_validator

DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

LossMode = Literal["case1", "case2", "case3", "case4", "focal", "self_paced", "coba"]


class RoleMarkers(BaseModel):
    """Text rendered before each turn; MFTCoder's defaults (v0.3+)."""

    model_config = ConfigDict(extra="forbid")

    system: str = "<s>system\n"
    user: str = "<s>human\n"
    assistant: str = "<s>bot\n"


DataFormat = Literal["auto", "chat_rounds", "messages", "sharegpt", "alpaca", "prompt_answer", "text"]


class DataSource(BaseModel):
    """One task given as a mapping in `data_paths`: where its records are and how to read them."""

    model_config = ConfigDict(extra="forbid")

    path: str
    name: str | None = Field(None, min_length=1, description="Defaults to the directory name or file stem.")
    format: DataFormat = Field("auto", description="`auto` detects the format of every record.")
    weight: float = Field(
        1.0, gt=0, description="Sampling weight of the train split: 2 = every sample twice per epoch, 0.5 = half."
    )


def _data_entry(value: Any, handler) -> str | DataSource:
    # Validated by hand so that an error in a mapping is reported at data_paths.<i>.<key>, not once
    # per union branch; plain strings stay strings, as they were written.
    if isinstance(value, str):
        return handler(value)
    if isinstance(value, dict | DataSource):
        return DataSource.model_validate(value)
    raise ValueError("each entry is a path, or a mapping {path, name, format, weight}")


DataEntry = Annotated[str | DataSource, WrapValidator(_data_entry)]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    # --- model -----------------------------------------------------------------------------
    pretrained_model_path: str = Field(
        description="Local directory or hub id (resolved from the local Hugging Face cache)."
    )
    model_init: Literal["pretrained", "from_config"] = Field(
        "pretrained",
        description="`from_config` builds random weights from the model's config.json (demo, tests).",
    )
    tokenizer_path: str | None = Field(None, description="Defaults to pretrained_model_path.")
    trust_remote_code: bool = False
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="`auto`: flash_attention_2 on CUDA when installed, else sdpa."
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute dtype. `auto` follows the launcher's mixed precision; fp32 on a CPU "
        "without a launcher setting.",
    )
    gradient_checkpointing: bool = False
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (inductor).")
    new_special_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens added to the tokenizer (e.g. role markers); embeddings are resized and "
        "trained (modules_to_save under LoRA).",
    )

    # --- parameter-efficient fine-tuning ----------------------------------------------------
    peft_type: Literal["lora", "qlora"] | None = Field("lora", description="null = full fine-tuning.")
    quantization_bits: Literal[4, 8] | None = Field(
        None, description="QLoRA only: 4 (NF4 with double quantisation; the default) or 8 (LLM.int8)."
    )
    lora_rank: int = Field(32, gt=0)
    lora_alpha: float = Field(64, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    lora_modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapter (e.g. embed_tokens, lm_head).",
    )

    # --- data ------------------------------------------------------------------------------
    data_paths: list[DataEntry] = Field(
        min_length=1,
        description="One task per entry: a directory, a file or a saved `datasets` dataset; or a mapping "
        "{path, name, format, weight}.",
    )
    data_split: list[float] = Field(
        default_factory=lambda: [0.98, 0.02],
        description="Fractions train, valid[, test] per task; they must sum to 1.",
    )
    padding_mode: Literal["padding", "pack", "concat"] = Field(
        "padding",
        description="`padding`: one sample per row; `pack`: whole samples in rows of seq_length tokens, isolated; "
        "`concat`: text records streamed into seq_length windows.",
    )
    seq_length: int = Field(2048, gt=1)
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached; null: $MFTCODER_CACHE, else ~/.cache/mftcoder."
    )
    num_proc: int | None = Field(
        None, gt=0, description="Tokenizing processes; null: one per 1,000 records, at most one per CPU core."
    )
    role_markers: RoleMarkers = Field(default_factory=RoleMarkers)
    template: Literal["mftcoder", "tokenizer"] = Field(
        "mftcoder",
        description="`mftcoder`: MFTCoder's layout with role_markers; `tokenizer`: the tokenizer's own chat template.",
    )
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with a sample longer than seq_length; always counted per task."
    )
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="`skip` counts bad records per task and reports the first few instead of stopping."
    )
    task_weights: list[float] | None = Field(
        None, description="Static per-task loss weights (case3/case4), one per data_paths entry."
    )

    # --- optimisation ----------------------------------------------------------------------
    output_dir: str
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | None = Field(
        None, description="auto (the newest complete checkpoint in output_dir, or a fresh start) | a path | null."
    )
    allow_inexact_resume: bool = Field(
        False, description="Resume on a different number of processes (the data order then differs)."
    )
    weighted_loss_mode: LossMode = "case3"
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="torch AdamW, or bitsandbytes' 8-bit AdamW (paged: state pages to CPU under memory pressure).",
    )
    learning_rate: float = Field(5e-5, ge=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, description="null or 0 disables clipping.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    num_warmup_steps: float = Field(
        0.05, ge=0, description="A whole number of optimizer steps, or a fraction (< 1) of the run."
    )
    num_train_epochs: int = Field(4, gt=0)
    max_train_steps: int | None = Field(None, gt=0, description="Overrides num_train_epochs when set.")
    seed: int = 1234

    # --- loss balancing: weighted_loss_mode focal, self_paced, coba (mftcoder.losses) --------
    focal_level: Literal["task", "sample"] = Field(
        "task", description="focal: down-weight easy tasks (task, on case3) or easy samples (sample, on case2)."
    )
    focal_gamma: float = Field(2.0, ge=0, description="focal: γ of the factor (1 - p)^γ; 0 gives case3 / case2.")
    selfpaced_interval: int = Field(1, gt=0, description="self_paced: optimizer steps between weight updates.")
    selfpaced_history_length: int = Field(
        100, ge=2, description="self_paced: validation samples the slopes are fitted on; uniform weights until full."
    )
    selfpaced_sample_valid_num: int = Field(
        1, gt=0, description="self_paced: validation batches per update, on all processes together."
    )
    selfpaced_scale_factor: float = Field(50.0, gt=0, description="self_paced: s in w = softmax(s · score).")
    coba_warmup_steps: int = Field(100, ge=0, description="coba: optimizer steps with uniform weights.")
    coba_history_length: int = Field(
        200, ge=2, description="coba: validation samples the slopes are fitted on; updates in the ACS and DF windows."
    )
    coba_tau: float = Field(5.0, gt=0, description="coba: temperature τ of the divergence factor.")
    coba_update_interval: int = Field(1, gt=0, description="coba: optimizer steps between weight updates.")
    coba_sample_valid_num: int = Field(
        1, gt=0, description="coba: validation batches per update, on all processes together."
    )

    # --- logging, evaluation, checkpoints ---------------------------------------------------
    log_interval: int = Field(10, gt=0)
    evaluation_steps: int | None = Field(100, gt=0, description="null: evaluate only at the end.")
    checkpointing_steps: int | None = Field(100, gt=0, description="null: only the final save.")
    epoch_checkpointing: bool = False
    saving_limit: int | None = Field(None, gt=0, description="Most step checkpoints kept.")
    early_stopping: bool = True
    early_stopping_stall_num: int = Field(5, gt=0)
    metric_for_best: str | None = Field(
        None,
        description="What early stopping and best/ follow: `task_mean` (the mean of the per-task validation "
        "losses), `loss` (over all validation tokens, so mostly the largest task) or a task name. Default: "
        "task_mean where the loss mode balances tasks, loss where it balances tokens or samples.",
    )
    on_nan: Literal["skip", "stop"] = Field(
        "skip", description="A non-finite loss or gradient norm skips the update, or stops the run."
    )
    max_consecutive_nan: int = Field(3, gt=0, description="With on_nan: skip, stop after this many in a row.")
    init_timeout_seconds: int = Field(3600, gt=0)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_aliases(cls, value):
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("weighted_loss_mode", mode="before")
    @classmethod
    def _loss_mode_spellings(cls, value):
        # MFTCoder v0.3/v0.4 spelled it `selfpaced`.
        return "self_paced" if value in ("selfpaced", "self-paced") else value

    @field_validator("metric_for_best")
    @classmethod
    def _metric_follows_the_objective(cls, value, info: ValidationInfo):
        # The best model is judged by what the loss mode optimises: with tasks weighted equally, a token-weighted
        # validation loss would mostly follow the largest task.
        if value is not None:
            return value
        mode, level = info.data.get("weighted_loss_mode"), info.data.get("focal_level")
        per_token_or_sample = mode in ("case1", "case2") or (mode == "focal" and level == "sample")
        return "loss" if per_token_or_sample else "task_mean"

    @field_validator("max_grad_norm")
    @classmethod
    def _no_clipping(cls, value):
        if value is not None and value < 0:
            raise ValueError("must be >= 0 (0 or null disables clipping)")
        return value or None

    @field_validator("num_warmup_steps")
    @classmethod
    def _warmup_steps_or_fraction(cls, value):
        if value >= 1 and value != int(value):
            raise ValueError("give a whole number of steps (e.g. 100) or a fraction of the run below 1 (e.g. 0.05)")
        return value

    @field_validator("data_split")
    @classmethod
    def _split_fractions(cls, value):
        if len(value) not in (2, 3):
            raise ValueError("give 2 or 3 fractions: [train, valid] or [train, valid, test]")
        if any(v < 0 for v in value):
            raise ValueError("fractions must be >= 0")
        if abs(sum(value) - 1) > 1e-6:
            hint = " (these look like percentages: divide by 100)" if abs(sum(value) - 100) < 1e-3 else ""
            raise ValueError(f"fractions must sum to 1, got {sum(value):g}{hint}")
        if value[0] <= 0:
            raise ValueError("the train fraction must be > 0")
        return value

    @field_validator("task_weights")
    @classmethod
    def _weights_positive(cls, value):
        if value is not None:
            if any(w < 0 for w in value):
                raise ValueError("weights must be >= 0")
            if not any(w > 0 for w in value):
                raise ValueError("at least one weight must be > 0")
        return value

    @field_validator("target_modules")
    @classmethod
    def _targets_nonempty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError('give at least one module name, or "all-linear"')
        return value

    @property
    def valid_fraction(self) -> float:
        return self.data_split[1]

    @property
    def validation_users(self) -> dict[str, str]:
        """The settings that evaluate on the validation split, each with how to do without it.

        A feature that needs validation (CoBa) adds itself here; config checks and the data layer
        then demand a validation split and validation samples in every task.
        """
        users = {}
        if self.evaluation_steps is not None:
            users["evaluation_steps"] = "evaluation_steps: null"
        if self.early_stopping:
            users["early_stopping"] = "early_stopping: false"
        if self.weighted_loss_mode in ("self_paced", "coba"):
            users["weighted_loss_mode"] = (
                "a weighted_loss_mode that does not learn from validation losses (case1..case4, focal)"
            )
        return users
