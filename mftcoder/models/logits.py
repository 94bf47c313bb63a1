"""Whether a loaded model can compute its logits at chosen positions only.

transformers' own causal LMs take `logits_to_keep` as a boolean [B, L] mask and apply the output head
(and what follows it, e.g. Gemma 2's soft-cap) to the hidden states of the True positions only,
returning logits [N, V]. The loss needs logits at its targets only: prompt tokens, padding and the last
token of every packed sample carry none, and the vocabulary head is a large part of a small model's
FLOPs and the largest activation of a large-vocabulary one.
"""

from __future__ import annotations

import functools
import sys

from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from transformers.modeling_utils import slice_logits_to_keep


def base_class(model) -> type:
    """The class of the transformers model inside the DDP/DeepSpeed/FSDP/compile and PEFT wrappers."""
    model = extract_model_from_parallel(model)
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return type(model)


@functools.cache
def _slices_by_mask(cls: type) -> bool:
    # Its modeling module slices the hidden states with transformers' function, which reads a boolean 2-D
    # mask; a remote-code or older model may take the argument and slice otherwise.
    return getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None) is slice_logits_to_keep


def logits_at_mask(model) -> bool:
    """Whether `model(..., logits_to_keep=mask)` returns the logits of the mask's positions only."""
    return _slices_by_mask(base_class(model))
