"""Routing metrics: how many tokens each expert gets and how balanced that is.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
"""
from __future__ import annotations

import torch


def tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count token-slots per expert. experts: ``[T, k]`` int -> ``[E]`` int64 (sums to ``T*k``)."""
    return torch.bincount(experts.reshape(-1), minlength=num_experts)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024). 0 is perfect balance."""
    load = load.float()
    mean = load.mean()
    if mean == 0:
        raise ValueError("load must have at least one routed token (its mean is 0)")
    return float((load.max() - mean) / mean)


def routing_entropy(probs: torch.Tensor) -> float:
    """Mean over tokens of the router distribution's entropy, in nats (max ``log E``: uniform router).

    probs: ``[T, E]`` probabilities.
    """
    p = probs.float()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean())
