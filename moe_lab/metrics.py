"""Routing metrics: how many tokens each expert gets and how balanced that is.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
"""
from __future__ import annotations

import torch


def tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count token-slots per expert. experts: ``[T, k]`` int -> ``[E]`` int64 (sums to ``T*k``).

    A scatter-add of ones rather than ``torch.bincount``, which waits for the GPU to size its output."""
    flat = experts.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024). 0 is perfect balance."""
    load = load.float()
    mean = load.mean()
    if mean == 0:
        raise ValueError("load must have at least one routed token (its mean is 0)")
    return float((load.max() - mean) / mean)


def max_violation_tensor(load: torch.Tensor) -> torch.Tensor:
    """MaxVio of every row of ``load: [..., E]`` -> float32 ``[...]`` (e.g. ``[steps, layers]`` of a training run:
    Wang et al.'s MaxVio_batch per step). Rows with no routed token give NaN."""
    load = load.float()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean


def expert_groups(num_experts: int, n_groups: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[E]`` int64 group (device) of each expert: ``n_groups`` contiguous groups of ``E / n_groups``."""
    if not isinstance(n_groups, int) or isinstance(n_groups, bool) or n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"n_groups must be an integer >= 1 dividing num_experts={num_experts}, got {n_groups!r}")
    return torch.arange(num_experts, device=device) // (num_experts // n_groups)


def devices_per_token(experts: torch.Tensor, num_experts: int, n_devices: int) -> torch.Tensor:
    """How many distinct devices each token's experts live on, with the experts split into ``n_devices``
    contiguous groups (expert parallelism; DeepSeek-V2's device-limited routing bounds it by M).

    experts: ``[T, k]`` -> ``[T]`` int64 in ``1 .. min(k, n_devices)``. A token is sent to each of these
    devices once, so its dispatch all-to-all moves ``devices * d_model`` values instead of ``k * d_model``
    when the copies for one device are deduplicated (DeepSeek-V2/V3 do).
    """
    device = expert_groups(num_experts, n_devices, experts.device)[experts.long()]  # [T, k]
    hit = torch.zeros(experts.shape[0], n_devices, dtype=torch.bool, device=experts.device)
    return hit.scatter(1, device, True).sum(dim=-1)


def routing_entropy(probs: torch.Tensor) -> float:
    """Mean over tokens of the router distribution's entropy, in nats (max ``log E``: uniform router).

    probs: ``[T, E]`` probabilities.
    """
    p = probs.float()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean())


def max_over_mean(load: torch.Tensor) -> float:
    """max_i load_i / mean load (Shazeer et al. 2017, Table 6: 17.80 without balancing). 1 is perfect balance."""
    return 1.0 + max_violation(load)


def drop_rate(dropped: torch.Tensor) -> float:
    """Fraction of token-slots dropped by expert capacity. dropped: ``[T, k]`` bool -> float in [0, 1]."""
    if dropped.numel() == 0:
        return 0.0
    return float(dropped.float().mean())


def unrouted_fraction(dropped: torch.Tensor) -> float:
    """Fraction of tokens that lost *all* their k slots (only the residual carries them). dropped: ``[T, k]``."""
    if dropped.numel() == 0:
        return 0.0
    return float(dropped.all(dim=-1).float().mean())
