"""Auxiliary losses on the router: load balancing and stability.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token. All losses are float32 scalars.
"""
from __future__ import annotations

import torch

from .metrics import tokens_per_expert


def switch_aux_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``N * sum_i f_i * P_i`` (without the coefficient alpha).

    ``f_i`` is the fraction of token-slots dispatched to expert ``i`` (counts, not differentiable) and
    ``P_i`` the mean full-softmax probability of expert ``i`` (differentiable). Equals 1 at perfectly
    uniform routing; multiply by alpha (Switch: 1e-2) in the training loss.

    Args:
        probs: ``[T, E]`` softmax over all experts (not the renormalised top-k gates).
        experts: ``[T, k]`` selected expert indices.
    """
    num_experts = probs.shape[-1]
    f = tokens_per_expert(experts, num_experts).float() / experts.numel()
    p = probs.float().mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (without the coefficient; ST-MoE: 1e-3).

    Args:
        logits: ``[T, E]`` router logits.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
