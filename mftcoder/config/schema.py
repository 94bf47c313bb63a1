"""The one typed train config.

Flat top-level keys for everything a user commonly overrides, MFTCoder's field names where the
concept is the same. Field-level rules live here; rules that involve several fields live in
`checks.py`, and what the data and model layers know about a config in their own checks, so that
`mftcoder.run_config` can report all problems together.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WrapValidator, field_validator

from mftcoder.config.loss_modes import ALIASES, LOSS_MODES, LossMode, loss_mode

DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

LossModeName = Literal[tuple(LOSS_MODES)]  # a mode is added to the registry, not here


class RoleMarkers(BaseModel):
    """Text rendered before each turn; MFTCoder's defaults (v0.3+)."""

    model_config = ConfigDict(extra="forbid")

    system: str = Field("<s>system\n", description="Before the system turn.")
    user: str = Field("<s>human\n", description="Before each user turn.")
    assistant: str = Field("<s>bot\n", description="Before each assistant turn.")


DataFormat = Literal["auto", "chat_rounds", "messages", "sharegpt", "alpaca", "prompt_answer", "text"]


class DataSource(BaseModel):
    """One task given as a mapping in `data_paths`: where its records are and how to read them."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A file, a directory or a saved `datasets` dataset.")
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
        description="Local model directory, or a hub id resolved from the local Hugging Face cache; a hub id "
        "that is not cached is an error only when the hub is offline (HF_HUB_OFFLINE=1)."
    )
    model_init: Literal["pretrained", "from_config"] = Field(
        "pretrained",
        description="`from_config` builds random weights from the model's config.json, seeded by `seed`, and "
        "saves them to output_dir/base_model/, the base of the adapter (demo, tests).",
    )
    tokenizer_path: str | None = Field(None, description="Defaults to pretrained_model_path.")
    trust_remote_code: bool = Field(
        False, description="Opt-in: run the Python code that the model's or tokenizer's repository ships."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="`auto`: flash_attention_2 on CUDA when installed, else sdpa (eager for Gemma 2, whose attention "
        "logit soft-capping sdpa cannot compute; an explicit sdpa is refused there).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute dtype (also spelled bfloat16, float16, float32). `auto` follows the launcher's mixed "
        "precision; without one, bf16 on a CUDA GPU that supports it, else fp32. An explicit dtype that differs "
        "from the launcher's mixed precision is an error; fp16 needs a CUDA GPU.",
    )
    gradient_checkpointing: bool = Field(False, description="Activation checkpointing (non-reentrant).")
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (inductor).")
    new_special_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens added to the tokenizer (e.g. role markers); embeddings are resized and "
        "trained (modules_to_save under LoRA).",
    )

    # --- parameter-efficient fine-tuning ----------------------------------------------------
    peft_type: Literal["lora", "qlora"] | None = Field(
        "lora",
        description="`lora`, `qlora` (LoRA on a 4- or 8-bit base, see docs/training.md#qlora), or null "
        "for full fine-tuning.",
    )
    quantization_bits: Literal[4, 8] | None = Field(
        None, description="QLoRA only: 4 (NF4 with double quantisation; the default) or 8 (LLM.int8)."
    )
    lora_rank: int = Field(32, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(64, gt=0, description="LoRA alpha; the adapter's update is scaled by alpha / r.")
    lora_dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA input; must be 0 for MoE families (experts adapted)."
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="`all-linear`: the model family's targets (docs/models.md), else every linear layer but the "
        "head; or a list of module names.",
    )
    lora_modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapter (e.g. embed_tokens, lm_head).",
    )

    # --- data ------------------------------------------------------------------------------
    data_paths: list[DataEntry] = Field(
        min_length=1,
        description="One task per entry: a directory, a file or a saved `datasets` dataset; or a mapping "
        "{path, name, format, weight} (docs/data.md).",
    )
    data_split: list[float] = Field(
        default_factory=lambda: [0.98, 0.02],
        description="Fractions [train, valid] or [train, valid, test] per task; they must sum to 1. Drawn with seed "
        "and the task name (docs/data.md#splits).",
    )
    padding_mode: Literal["padding", "pack", "concat"] = Field(
        "padding",
        description="`padding`: one sample per row; `pack`: whole samples in rows of seq_length tokens, isolated; "
        "`concat`: text records streamed into seq_length windows (docs/data.md#rows-padding-pack-concat).",
    )
    seq_length: int = Field(
        2048, gt=1, description="Longest sample, in tokens; the row length in pack and concat modes."
    )
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached; null: $MFTCODER_CACHE, else ~/.cache/mftcoder."
    )
    num_proc: int | None = Field(
        None, gt=0, description="Tokenizing processes; null: one per 1,000 records, at most one per CPU core."
    )
    role_markers: RoleMarkers = Field(
        default_factory=RoleMarkers, description="Text before each turn under `template: mftcoder`."
    )
    template: Literal["mftcoder", "tokenizer"] = Field(
        "mftcoder",
        description="`mftcoder`: MFTCoder's layout with role_markers; `tokenizer`: the tokenizer's own chat template.",
    )
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="A sample longer than seq_length is dropped, truncated (whole leading rounds first) or stops the "
        "run; always counted per task (docs/data.md#length).",
    )
    on_bad_record: Literal["error", "skip"] = Field(
        "error",
        description="`error` stops at the first bad record with file:line and the field; `skip` counts bad records "
        "per task and quotes the first three in the data report.",
    )
    task_weights: list[float] | None = Field(
        None,
        description="Static per-task loss weights for case3, case4 and focal at task level (refused in other modes), "
        "one per data_paths entry; null: all 1.",
    )

    # --- optimisation ----------------------------------------------------------------------
    output_dir: str = Field(
        description="Where the run writes config.yaml, run.json, checkpoints/, final/, best/ and logs/."
    )
    overwrite_output_dir: bool = Field(
        False,
        description="Replace an earlier run's artefacts in output_dir (only those); without it a used output_dir "
        "is refused unless the run resumes.",
    )
    resume_from_checkpoint: str | None = Field(
        None,
        description="`auto` (the newest complete checkpoint in output_dir, or a fresh start with a notice), a "
        "checkpoint path, or null (docs/resume.md).",
    )
    allow_inexact_resume: bool = Field(
        False, description="Resume on a different number of processes (the data order then differs)."
    )
    weighted_loss_mode: LossModeName = Field(
        "case3",
        description="case1 (tokens), case2 (samples), case3 (tasks), case4 (tasks and samples), focal, self_paced "
        "(also spelled selfpaced), coba (docs/losses.md).",
    )
    per_device_train_batch_size: int = Field(8, gt=0, description="Micro-batch per process (rows in pack mode).")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Validation micro-batch per process.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="The only source of accumulation: a different launcher value is an error."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="torch AdamW, or bitsandbytes' 8-bit AdamW (paged: state pages to CPU under memory pressure).",
    )
    learning_rate: float = Field(5e-5, ge=0, description="Peak learning rate; 0 is valid (evaluation-only runs).")
    min_lr: float = Field(0.0, ge=0, description="Floor the schedule decays towards; at most learning_rate.")
    weight_decay: float = Field(0.01, ge=0, description="Not applied to biases and norms.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW β2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW ε.")
    max_grad_norm: float | None = Field(1.0, description="null or 0 disables clipping.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="After a linear warm-up, in optimizer steps; cosine and linear decay towards min_lr."
    )
    num_warmup_steps: float = Field(
        0.05,
        ge=0,
        description="A whole number of optimizer steps, or a fraction (< 1) of the run; a warm-up longer than the "
        "run is clipped with a warning.",
    )
    num_train_epochs: int = Field(4, gt=0, description="Epochs of the train split; max_train_steps overrides it.")
    max_train_steps: int | None = Field(None, gt=0, description="Overrides num_train_epochs when set.")
    seed: int = Field(
        1234, description="Seeds the splits, the epoch order, packing, validation draws and initialisation."
    )

    # --- preference training (docs/preference.md) --------------------------------------------
    training_stage: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="`sft`: supervised fine-tuning; `dpo` or `orpo`: preference training on prompt/chosen/rejected "
        "records (docs/preference.md), with weighted_loss_mode case2 (every pair counts once) or case3 (tasks).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo: β, the strength of the pull towards the reference model; orpo: λ, the weight of "
        "the odds-ratio term (MFTCoder's and TRL's `beta`).",
    )
    rpo_alpha: float | None = Field(
        None, ge=0, description="dpo: weight α of the chosen responses' NLL added to the DPO loss (RPO); null: none."
    )

    # --- loss balancing: weighted_loss_mode focal, self_paced, coba (mftcoder.losses) --------
    focal_level: Literal["task", "sample"] = Field(
        "task",
        description="focal: down-weight easy tasks (task, on case3) or easy tokens, balanced over samples (sample, "
        "on case2), by (1 - p)^γ.",
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
    log_interval: int = Field(10, gt=0, description="Optimizer steps per train log line.")
    evaluation_steps: int | None = Field(100, gt=0, description="null: evaluate only at the end.")
    checkpointing_steps: int | None = Field(100, gt=0, description="null: only the final save.")
    epoch_checkpointing: bool = Field(False, description="Also save a checkpoint at the end of every epoch.")
    saving_limit: int | None = Field(
        None,
        gt=0,
        description="Most step checkpoints kept: the oldest beyond it are deleted, never the latest or the best; "
        "null: all.",
    )
    early_stopping: bool = Field(
        True, description="Stop after early_stopping_stall_num evaluations without improvement of metric_for_best."
    )
    early_stopping_stall_num: int = Field(5, gt=0, description="Evaluations without improvement before stopping.")
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
    init_timeout_seconds: int = Field(
        3600, gt=0, description="Process-group timeout; also bounds the wait for another process's data cache."
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_aliases(cls, value):
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("weighted_loss_mode", mode="before")
    @classmethod
    def _loss_mode_spellings(cls, value):
        return ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("metric_for_best")
    @classmethod
    def _metric_follows_the_objective(cls, value, info: ValidationInfo):
        # An invalid loss mode is reported on its own field; the default then does not matter.
        if value is not None or "weighted_loss_mode" not in info.data:
            return value
        return loss_mode(info.data["weighted_loss_mode"], info.data.get("focal_level")).default_metric

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
    def held_out_fraction(self) -> float:
        """The fraction of every task's records held out as its test split (0 without one)."""
        return self.data_split[2] if len(self.data_split) > 2 else 0.0

    @property
    def loss_mode(self) -> LossMode:
        return loss_mode(self.weighted_loss_mode, self.focal_level)

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
        if self.loss_mode.needs_validation:
            users["weighted_loss_mode"] = (
                "a weighted_loss_mode that does not learn from validation losses (case1..case4, focal)"
            )
        return users
