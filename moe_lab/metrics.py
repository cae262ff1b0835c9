"""Routing metrics: how many tokens each expert gets and how balanced that is.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
"""
from __future__ import annotations

import torch

from .routing import check_experts
from .validation import check_finite, check_int, check_tensor, reads_values


def tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count token-slots per expert. experts: ``[T, k]`` int -> ``[E]`` int64 (sums to ``T*k``).

    A scatter-add of ones rather than ``torch.bincount``, which waits for the GPU to size its output."""
    check_experts(experts, num_experts)
    return _tokens_per_expert(experts.long(), num_experts)


def _tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """:func:`tokens_per_expert` without its checks, for int64 ids (the layer's path: they come from its top-k)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _check_load(load: torch.Tensor, dims: int | None) -> None:
    """``load: [E]`` (or ``[..., E]`` for ``dims=None``) finite, non-negative, ``E >= 1``."""
    check_tensor("load", load, "[num_experts]" if dims else "[..., num_experts]", dims, kind="real")
    if load.dim() == 0 or load.shape[-1] == 0:
        raise ValueError(f"load must have shape [..., num_experts >= 1], got shape {tuple(load.shape)}")
    check_finite("load", load)
    if reads_values(load) and bool((load < 0).any()):
        raise ValueError(f"load must be >= 0 (token-slots per expert), got a minimum of {float(load.min()):.3g}")


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024). 0 is perfect balance.
    load: ``[E]`` token-slots per expert (counts or floats, >= 0)."""
    _check_load(load, 1)
    load = load.float()
    mean = load.mean()
    if mean == 0:
        raise ValueError("load must have at least one routed token (its mean is 0)")
    return float((load.max() - mean) / mean)


def max_violation_tensor(load: torch.Tensor) -> torch.Tensor:
    """MaxVio of every row of ``load: [..., E]`` -> float32 ``[...]`` (e.g. ``[steps, layers]`` of a training run:
    Wang et al.'s MaxVio_batch per step). Rows with no routed token give NaN."""
    _check_load(load, None)
    load = load.float()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean


def check_groups(num_experts: int, n_groups: int, name: str = "n_groups") -> None:
    """Raise ``ValueError`` unless ``n_groups`` (called ``name`` in the message) is an integer >= 1 dividing
    ``num_experts``."""
    check_int("num_experts", num_experts, 1)
    check_int(name, n_groups, 1)
    if num_experts % n_groups:
        raise ValueError(f"{name} must be an integer >= 1 dividing num_experts={num_experts}, got {n_groups!r}")


def expert_groups(num_experts: int, n_groups: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[E]`` int64 group (device) of each expert: ``n_groups`` contiguous groups of ``E / n_groups``."""
    check_groups(num_experts, n_groups)
    return torch.arange(num_experts, device=device) // (num_experts // n_groups)


def devices_per_token(experts: torch.Tensor, num_experts: int, n_devices: int) -> torch.Tensor:
    """How many distinct devices each token's experts live on, with the experts split into ``n_devices``
    contiguous groups (expert parallelism; DeepSeek-V2's device-limited routing bounds it by M).

    experts: ``[T, k]`` -> ``[T]`` int64 in ``1 .. min(k, n_devices)``. A token is sent to each of these
    devices once, so its dispatch all-to-all moves ``devices * d_model`` values instead of ``k * d_model``
    when the copies for one device are deduplicated (DeepSeek-V2/V3 do).
    """
    check_experts(experts, num_experts)
    check_groups(num_experts, n_devices, "n_devices")
    device = expert_groups(num_experts, n_devices, experts.device)[experts.long()]  # [T, k]
    hit = torch.zeros(experts.shape[0], n_devices, dtype=torch.bool, device=experts.device)
    return hit.scatter(1, device, True).sum(dim=-1)


def routing_entropy(probs: torch.Tensor) -> float:
    """Mean over tokens of the router distribution's entropy, in nats (max ``log E``: uniform router).

    probs: ``[T, E]`` probabilities (``T, E >= 1``).
    """
    check_tensor("probs", probs, "[tokens, num_experts]", 2)
    if 0 in probs.shape:
        raise ValueError(f"probs must have shape [tokens >= 1, num_experts >= 1], got shape {tuple(probs.shape)}")
    check_finite("probs", probs)
    if reads_values(probs) and bool((probs < 0).any()):
        raise ValueError(f"probs must be >= 0 (probabilities), got a minimum of {float(probs.min()):.3g}")
    p = probs.float()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean())


def max_over_mean(load: torch.Tensor) -> float:
    """max_i load_i / mean load (Shazeer et al. 2017, Table 6: 17.80 without balancing). 1 is perfect balance."""
    return 1.0 + max_violation(load)


def drop_rate(dropped: torch.Tensor) -> float:
    """Fraction of token-slots dropped by expert capacity. dropped: ``[T, k]`` bool -> float in [0, 1]."""
    check_tensor("dropped", dropped, "[tokens, k]", 2, kind="bool")
    if dropped.numel() == 0:
        return 0.0
    return float(dropped.float().mean())


def unrouted_fraction(dropped: torch.Tensor) -> float:
    """Fraction of tokens that lost *all* their k slots (only the residual carries them). dropped: ``[T, k]`` bool."""
    check_tensor("dropped", dropped, "[tokens, k]", 2, kind="bool")
    if dropped.numel() == 0:
        return 0.0
    return float(dropped.all(dim=-1).float().mean())
