"""Which attention a run uses, and packed rows attending per sample on the CPU.

In pack mode sdpa gets the block-diagonal causal mask transformers derives from the restarting position
ids, so it computes the whole L x L square of every packed row and throws most of it away: with samples
of a quarter of the row that is about 8 times the causal work of the samples themselves. On the CPU
`sdpa_per_sample` runs sdpa once per sample with `is_causal` instead, on the flat layout flash-attention-2
uses (the micro-batch as one row with its cumulative sequence lengths), so no mask is built at all and
each sample costs its own causal triangle. The result is the same attention; it is registered with
transformers' `AttentionInterface` under `PER_SAMPLE_SDPA`.

Not on CUDA: the boundaries are read on the host, which there would wait for the device in every layer.
A CUDA run packs with flash-attention-2 (the varlen kernel does the same) or with sdpa and its mask.
"""

from __future__ import annotations

import importlib.util
from itertools import pairwise

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig

from mftcoder.config.schema import TrainConfig
from mftcoder.errors import TrainingError
from mftcoder.models.families import family

PER_SAMPLE_SDPA = "mftcoder_sdpa_per_sample"
# The layouts with every sample of a micro-batch in one row, delimited by `cu_seq_lens_q/k`.
FLAT_LAYOUT = ("flash_attention_2", PER_SAMPLE_SDPA)


def attention_implementation(model_type: str, device: torch.device) -> str:
    """What `attn_implementation: auto` picks for a model type on `device`: flash-attention-2 where it is
    installed and can run (CUDA), else sdpa, or eager for families whose sdpa path misbehaves."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    fam = family(model_type)
    return "eager" if fam and fam.no_sdpa else "sdpa"


def resolve_attention(config: TrainConfig, device: torch.device) -> str:
    """The run's attention implementation, decided once at launch: the model loads with it and the data takes
    the batch layout it needs (`FLAT_LAYOUT`). sdpa on packed rows on the CPU becomes `PER_SAMPLE_SDPA`."""
    chosen = config.attn_implementation
    if chosen == "auto":
        model_config = AutoConfig.from_pretrained(
            config.pretrained_model_path, trust_remote_code=config.trust_remote_code
        )
        chosen = attention_implementation(model_config.model_type, device)
    packed = config.padding_mode == "pack" and config.training_stage == "sft"
    if chosen == "sdpa" and packed and device.type == "cpu" and not config.trust_remote_code:
        return PER_SAMPLE_SDPA
    return chosen


def _sliding_causal_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Query i sees keys i - window < j <= i, transformers' sliding-window causal mask."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (distance >= 0) & (distance < window)


# Not traced by torch.compile: the sample lengths are data, and a graph specialised on them would be
# recompiled for every batch (until the recompile limit, then left uncompiled).
@torch.compiler.disable
def sdpa_per_sample(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa over each sample of a flat packed row. `query` is [1, heads, tokens, dim], `key`/`value`
    may have fewer heads (grouped-query attention); returns [1, tokens, heads, value dim] like transformers'
    own attention functions."""
    refused = [name for name in ("softcap", "s_aux", "position_bias") if kwargs.get(name) is not None]
    if refused or not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        what = ", ".join(refused) or "bidirectional attention"
        raise TrainingError(
            f"{type(module).__name__} needs {what}, which per-sample sdpa does not compute; set "
            "attn_implementation: eager (or padding_mode: padding)"
        )
    if cu_seq_lens_q is None or attention_mask is not None or query.shape[0] != 1:
        raise TrainingError(
            "per-sample sdpa takes the flat packed layout only (one row, cumulative sequence lengths, no "
            f"attention mask); got {query.shape[0]} rows{', a mask' if attention_mask is not None else ''}"
            f"{'' if cu_seq_lens_q is not None else ', no sequence lengths'}"
        )
    # Some families (Qwen2-MoE) keep the window on their sliding layers instead of passing it.
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    gqa = key.shape[1] != query.shape[1]
    bounds = cu_seq_lens_q.tolist()  # on the CPU: no device to wait for
    lengths = [end - start for start, end in pairwise(bounds)]
    # split, not slicing: the backward of a split is one concatenation, that of each slice a zero-filled
    # tensor of the whole row.
    outputs = []
    for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True):
        length = q.shape[2]
        mask = None
        if sliding_window is not None and length > sliding_window:
            mask = _sliding_causal_mask(length, sliding_window, query.device)
        outputs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None, enable_gqa=gqa
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PER_SAMPLE_SDPA, sdpa_per_sample)
