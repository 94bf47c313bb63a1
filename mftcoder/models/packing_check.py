"""Pack mode's start-up check: on the model about to train, packed samples must not see each other.

Validation judges pack mode by the family of a local model directory only: a hub id it could not read, or remote
modelling code (`trust_remote_code`) that builds its own causal mask, would reach training unchecked, and a family name
says nothing certain about the class and attention implementation that really load. Isolation is behaviour: the
attention takes the block-diagonal mask from the restarting position ids (in the flat layout of flash-attention-2
and of sdpa per sample, from the sequence lengths). So before the first step a probe sample C runs in the layout training uses, packed after a
sample A in one row and after a different sample B in another (a model may mask rows of a batch differently from a
single row), and alone. Its logits may differ by rounding only: the packed and the single forward have other shapes,
which may take other kernels. A leak moves them by a good part of their size (C attends to 32 foreign tokens, or its
positions do not restart); the demo model moves them by exactly 0 on a CPU.

Token ids are drawn from a fixed seed, so every rank runs the same forwards and reaches the same verdict (ZeRO-3 and
FSDP gather the weights layer by layer, all ranks together).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel

from mftcoder.data.batching import MODEL_INPUTS, collate_flat, collate_packed, to_device
from mftcoder.data.sample import Sample
from mftcoder.errors import ConfigError, Issue
from mftcoder.models.attention import PER_SAMPLE_SDPA

LEADING, PROBE = 32, 16  # tokens of the samples A and B, and of the probe sample C
_PROBE_SEED = 0x49534F4C
# The unit in the last place of fp32 matmuls under torch.set_float32_matmul_precision: TF32 keeps 10 bits of
# mantissa, "medium" computes in bf16.
_FP32_MATMUL_EPS = {
    "highest": torch.finfo(torch.float32).eps,
    "high": 2.0**-10,
    "medium": torch.finfo(torch.bfloat16).eps,
}


# C after A and C after B in two rows of one batch go through the very same computation when C sees only
# itself: any difference beyond float noise is a leak, whatever the compute dtype.
ROWS_TOLERANCE = 1e-3


class Isolation(NamedTuple):
    """How far the probe sample's logits move, relative to the largest of its logits alone: packed against
    alone (other shapes, so rounding may differ), and between two rows of one packed batch (padded layout)."""

    alone: float
    rows: float


def rounding_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to the largest of its logits alone, a sample's packed logits may move by rounding in the
    compute `dtype`: 16 units in the last place, at least 1e-3."""
    eps = _FP32_MATMUL_EPS[torch.get_float32_matmul_precision()] if dtype == torch.float32 else torch.finfo(dtype).eps
    return max(1e-3, 16 * eps)


def _transformers_model(model):
    """The transformers model inside the Accelerate/DeepSpeed wrapper and the PEFT one."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _logits(model, batch: dict, device: torch.device) -> torch.Tensor:
    inputs = to_device({key: batch[key] for key in MODEL_INPUTS if key in batch}, device)
    return model(**inputs, use_cache=False).logits.float()


def measure_isolation(model, flat: bool, device: torch.device) -> Isolation:
    """The probe's differences on this rank. Runs `model` as it will train (wrapped, possibly sharded; all
    ranks together), without grad and in eval mode (the mode it was in is restored)."""
    vocab = _transformers_model(model).get_input_embeddings().num_embeddings
    rng = np.random.default_rng(_PROBE_SEED)
    a, b, c = (
        Sample(rng.integers(0, vocab, n).astype(np.int32), np.ones(n, dtype=np.uint8), 0)
        for n in (LEADING, LEADING, PROBE)
    )
    if flat:
        packed, alone = collate_flat([a, c, b, c], pad_id=0), collate_flat([c], pad_id=0)
    else:
        packed, alone = collate_packed([[a, c], [b, c]], pad_id=0), collate_packed([[c]], pad_id=0)
    was_training = model.training
    model.eval()
    try:
        # A compiled model would compile for the probe's shapes (tens of seconds each); its eager forward
        # runs the same modelling code and masks.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            packed_logits = _logits(model, packed, device)
            alone_logits = _logits(model, alone, device)[0]
    finally:
        model.train(was_training)
    # C in the first row, and C in the second row or at the end of the flat row.
    placed = torch.stack([packed_logits[0, LEADING : LEADING + PROBE], packed_logits[-1, -PROBE:]])
    scale = alone_logits.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
    # The flat layout has one row: its two copies of C sit at other offsets, which may tile differently.
    rows = 0.0 if flat else float((placed[0] - placed[1]).abs().max() / scale)
    return Isolation(float((placed - alone_logits).abs().max() / scale), rows)


def _largest_over_ranks(isolation: Isolation, device: torch.device) -> Isolation:
    """The worst of every rank's measurement, so that all ranks take the same decision: one rank stopping
    alone would leave the others waiting in their next collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return isolation
    values = torch.tensor(list(isolation), dtype=torch.float64, device=device).nan_to_num(nan=torch.inf)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return Isolation(*values.tolist())


def check_packed_isolation(model, flat: bool, dtype: torch.dtype, device: torch.device) -> float:
    """The probe's difference from C alone (`measure_isolation`, worst over the ranks); a ConfigError naming
    the fix when it is more than rounding, or when C moves between rows. `flat`: the flat layout
    (models/attention.py FLAT_LAYOUT); `dtype`: the compute dtype."""
    isolation = _largest_over_ranks(measure_isolation(model, flat, device), device)
    tolerance = rounding_tolerance(dtype)
    if isolation.alone <= tolerance and isolation.rows <= ROWS_TOLERANCE:  # NaN logits fail too
        return isolation.alone
    if not isolation.alone <= tolerance:
        measured = (
            f"differ from its logits alone by {isolation.alone:.2%} of their size, where rounding in "
            f"{str(dtype).removeprefix('torch.')} allows {tolerance:.2%}"
        )
    else:
        measured = (
            f"differ by {isolation.rows:.2%} of their size between two rows where it follows different samples, "
            f"where identical computations allow {ROWS_TOLERANCE:.2%}"
        )
    base = _transformers_model(model)
    implementation = base.config._attn_implementation
    if implementation == PER_SAMPLE_SDPA:
        implementation = "sdpa"  # what the config says; it attends per sample on the CPU
    remote = type(base).__module__.startswith("transformers_modules")  # where transformers puts remote code
    fixes = ["padding_mode: padding"]
    if remote:
        fixes.append("trust_remote_code: false (transformers' own implementation of the family)")
    fixes.append(f"another attn_implementation than {implementation}")
    raise ConfigError(
        [
            Issue(
                "padding_mode",
                f"pack: packed samples see each other in {type(base).__name__}"
                f"{' (remote code)' if remote else ''} with attn_implementation {implementation}: the logits of a "
                f"{PROBE}-token sample packed after a {LEADING}-token one {measured}; its attention does not take "
                "the block-diagonal mask from the "
                f"{'sequence lengths' if flat else 'position ids'}. Use {', or '.join(fixes)}",
            )
        ]
    )
