"""Router load-balancing loss of mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...).

transformers adds it to a model's loss only when labels are passed, which mftcoder never does (the
loss modes need per-token CE), and it excludes padding through the attention mask, which packed
batches do not have. So the trainer asks for the router logits (`output_router_logits=True`),
computes the loss here over the tokens of `token_mask` — the real tokens, padding excluded, in
padding and pack mode alike — with transformers' own Switch-Transformer formula, and adds
`coefficient × loss` (the model config's `router_aux_loss_coef`) to the objective. It stays out of
the per-task losses and is logged on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func


@dataclass(frozen=True)
class RouterBalance:
    num_experts: int
    top_k: int
    coefficient: float


def router_balance(model_config) -> RouterBalance | None:
    """The balance settings of an MoE model config; None for a dense model or a zero coefficient."""
    coefficient = getattr(model_config, "router_aux_loss_coef", None)
    # Mixtral calls its experts num_local_experts; the Qwen MoE families call them num_experts.
    experts = getattr(model_config, "num_local_experts", None) or getattr(model_config, "num_experts", None)
    top_k = getattr(model_config, "num_experts_per_tok", None)
    if not (coefficient and experts and top_k):
        return None
    return RouterBalance(int(experts), int(top_k), float(coefficient))


def router_balance_loss(
    router_logits: tuple[torch.Tensor, ...], balance: RouterBalance, token_mask: torch.Tensor
) -> torch.Tensor:
    """The load-balancing loss (before the coefficient) of one forward pass over the tokens where
    `token_mask` is true; each layer's logits are [tokens, experts] in the order of `token_mask`."""
    rows = router_logits[0].shape[0]
    if token_mask.numel() != rows:
        raise ValueError(f"token_mask has {token_mask.numel()} entries for router logits of {rows} tokens")
    return load_balancing_loss_func(tuple(router_logits), balance.num_experts, balance.top_k, token_mask.reshape(1, -1))
