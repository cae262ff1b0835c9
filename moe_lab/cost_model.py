"""Cost models of distributed MoE training: the bytes expert parallelism moves, how long that takes on a given
interconnect (the alpha-beta model), what a rank's dispatch sends, and what each rank holds in memory.

Conventions: ``P`` ranks in the expert-parallel group; rank ``r`` owns experts ``r * E/P ... (r+1) * E/P - 1``
(as :class:`moe_lab.parallel.ExpertParallelMoELayer`); bytes are per rank; times in seconds; bandwidths in
bytes per second (1 GB/s = 1e9 B/s).

Traffic. Per MoE layer and training step each rank takes part in four all-to-alls: dispatch and combine in
the forward pass, the same two again (on the gradients) in the backward pass. Dropless, each sends
``tokens * k * d_model * bytes`` (:func:`moe_lab.parallel.all_to_all_bytes`, exact), of which the rows for the
rank's own experts stay put: with routing spread evenly over the ranks, ``(P - 1) / P`` of it leaves the rank
(an expectation, exact only when every rank's experts get the same share of this rank's slots).

Time (Hockney's alpha-beta model): a message of ``n`` bytes takes ``alpha + n / beta``. An all-to-all in which
each rank holds ``n`` bytes spread evenly over ``P`` ranks is ``P - 1`` messages of ``n / P`` bytes:
``(P - 1) * alpha + (P - 1) / P * n / beta`` (pairwise exchange; collectives on a shared switch or with
contention do worse). The step estimate adds communication to compute with no overlap: an upper bound on what
overlapping (DeepSeek-V3's DualPipe, Megatron's a2a overlap) can hide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .calculator import Arch, count_params, training_memory
from .dispatch import expert_capacity
from .metrics import check_groups, devices_per_token, expert_groups
from .parallel import all_to_all_bytes
from .routing import check_experts
from .validation import check_bool, check_int, check_number, check_type

ALL_TO_ALLS_PER_STEP = 4  # dispatch + combine, forward and backward


def ep_bytes_per_step(tokens: int, k: int, d_model: int, bytes_per_element: int, world_size: int,
                      layers: int = 1, off_rank: bool = True) -> float:
    """Bytes one rank sends per training step through expert-parallel all-to-alls, dropless:
    ``4 * layers * tokens * k * d_model * bytes``, times ``(P - 1) / P`` (the expected share leaving the rank)
    when ``off_rank``."""
    check_int("world_size", world_size, 1)
    check_int("layers", layers, 0)
    check_bool("off_rank", off_rank)
    total = ALL_TO_ALLS_PER_STEP * layers * all_to_all_bytes(tokens, k, d_model, bytes_per_element)
    return total * (world_size - 1) / world_size if off_rank else float(total)


def all_to_all_time(bytes_per_rank: float, world_size: int, latency_s: float, bandwidth: float) -> float:
    """Alpha-beta time of one all-to-all where each rank holds ``bytes_per_rank`` bytes for all ``P`` ranks
    (its own share included): ``(P - 1) * latency + (P - 1) / P * bytes / bandwidth``; 0 for one rank."""
    check_int("world_size", world_size, 1)
    check_number("bytes_per_rank", bytes_per_rank, 0)
    check_number("latency_s", latency_s, 0)
    check_number("bandwidth (bytes/s)", bandwidth, 0, low_open=True)
    return (world_size - 1) * latency_s + (world_size - 1) / world_size * bytes_per_rank / bandwidth


@dataclass(frozen=True)
class StepEstimate:
    """A predicted training step: ``compute_s`` + ``comm_s`` (no overlap) = ``total_s``; ``comm_share``."""

    compute_s: float
    comm_s: float
    total_s: float
    comm_share: float


def ep_step_time(compute_s: float, bytes_per_rank: float, world_size: int, latency_s: float, bandwidth: float,
                 all_to_alls: int = ALL_TO_ALLS_PER_STEP) -> StepEstimate:
    """Step time of ``compute_s`` of computation plus ``all_to_alls`` all-to-alls of ``bytes_per_rank`` each
    (:func:`all_to_all_time`), not overlapped."""
    check_number("compute_s", compute_s, 0)
    check_int("all_to_alls", all_to_alls, 0)
    comm = all_to_alls * all_to_all_time(bytes_per_rank, world_size, latency_s, bandwidth)
    total = compute_s + comm
    return StepEstimate(compute_s, comm, total, comm / total if total else 0.0)


def _measurements(name: str, values: Any) -> np.ndarray:
    """``values`` as a 1-D float array of finite numbers (else a ``ValueError`` naming ``name``)."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1 or not np.isfinite(array).all() or isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a 1-D sequence of finite numbers, got {values!r}")
    return array


def fit_alpha_beta(bytes_per_rank: list[float], seconds: list[float], world_size: int) -> tuple[float, float]:
    """``(latency_s, bandwidth)`` of :func:`all_to_all_time` fitted to measured all-to-alls of several sizes
    (``world_size >= 2``, at least two distinct sizes): least squares on the *relative* error, so small (latency
    bound) and large (bandwidth bound) sizes count alike, with the latency constrained to ``>= 0``."""
    check_int("world_size (>= 2: one rank sends nothing)", world_size, 2)
    n, t = _measurements("bytes_per_rank", bytes_per_rank), _measurements("seconds", seconds)
    if n.shape != t.shape:
        raise ValueError(f"seconds must have one entry per entry of bytes_per_rank ({n.size}), got {t.size}")
    if (n < 0).any() or len(set(n.tolist())) < 2:
        raise ValueError(f"bytes_per_rank must hold sizes >= 0, at least 2 distinct sizes, got {n.tolist()}")
    if not (t > 0).all():
        raise ValueError(f"seconds must all be > 0, got {t.tolist()}")
    p = world_size
    # t = (P-1) alpha + (P-1)/P n / beta, each row divided by its own t (relative residuals)
    design = np.stack([np.full_like(n, p - 1), (p - 1) / p * n], axis=1) / t[:, None]
    (alpha, inv_beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if alpha < 0:  # noise can push the intercept below 0: fit the bandwidth alone, with no latency
        alpha, inv_beta = 0.0, float(design[:, 1] @ np.ones_like(t) / (design[:, 1] @ design[:, 1]))
    if inv_beta <= 0:
        raise ValueError("the measured times do not grow with the size: no positive bandwidth fits them")
    return float(alpha), float(1 / inv_beta)


@dataclass(frozen=True)
class Link:
    """An interconnect's bandwidth for the alpha-beta model: ``bandwidth`` in B/s and where it comes from."""

    name: str
    bandwidth: float
    source: str


LINKS = {
    "nvlink_deepep": Link("NVLink, DeepEP EP8 (H800)", 153e9,
                          "DeepEP README: intranode EP8 dispatch 153 GB/s, combine 158 GB/s (H800, 4096 tokens, "
                          "hidden 7168, top-8)"),
    "rdma_deepep_high": Link("RDMA, DeepEP high (H800)", 58e9, "DeepEP README: internode 43-58 GB/s"),
    "rdma_deepep_low": Link("RDMA, DeepEP low (H800)", 43e9, "DeepEP README: internode 43-58 GB/s"),
    "ethernet_100g": Link("100 GbE line rate", 12.5e9, "nominal: 100 Gb/s / 8 bits, no overhead"),
    "ethernet_10g": Link("10 GbE line rate", 1.25e9, "nominal: 10 Gb/s / 8 bits, no overhead"),
}
"""Published (DeepEP, measured effective bandwidth) and nominal (Ethernet line rate) figures."""


def dispatch_bytes(experts: torch.Tensor, num_experts: int, world_size: int, rank: int, d_model: int,
                   bytes_per_element: int, dedup: bool = False) -> int:
    """Bytes rank ``rank`` sends to *other* ranks in one dispatch of its tokens ``experts: [T, k]``.

    ``dedup=False``: one row per token-slot (as :class:`moe_lab.parallel.ExpertParallelMoELayer` sends);
    ``dedup=True``: one row per token and destination rank, shared there by the token's experts (DeepSeek's
    device-limited routing pays off only with such a dispatch; the number of destination ranks of each token
    is :func:`moe_lab.metrics.devices_per_token`)."""
    check_experts(experts, num_experts)
    check_groups(num_experts, world_size, "world_size")
    check_int("rank", rank, 0, world_size - 1)
    check_int("d_model", d_model, 1)
    check_number("bytes_per_element", bytes_per_element, 0, low_open=True)
    check_bool("dedup", dedup)
    owners = expert_groups(num_experts, world_size, experts.device)[experts]  # [T, k] rank of each chosen expert
    if dedup:  # each token's destination ranks, less this rank itself
        rows = int(devices_per_token(experts, num_experts, world_size).sum()) - int((owners == rank).any(dim=1).sum())
    else:
        rows = int((owners != rank).sum())
    return rows * d_model * bytes_per_element


def capacity_buffer_bytes(tokens: int, num_experts: int, k: int, capacity_factor: float, d_model: int,
                          bytes_per_element: int) -> int:
    """Bytes one rank sends per all-to-all with fixed-capacity buffers (GShard): ``E x C x d_model`` rows of
    ``C = expert_capacity(tokens, E, capacity_factor, k)`` slots per expert, padding included (its own share too)."""
    check_int("d_model", d_model, 1)
    check_number("bytes_per_element", bytes_per_element, 0, low_open=True)
    return num_experts * expert_capacity(tokens, num_experts, capacity_factor, k) * d_model * bytes_per_element


def rank_state_bytes(replicated_params: int, expert_params: int, world_size: int, ep_size: int,
                     dtype: str = "bf16", zero: bool = False) -> dict[str, float]:
    """Training state one rank holds (bytes) when the experts are sharded over ``ep_size`` ranks and replicated
    over the ``world_size / ep_size`` expert-parallel groups; everything else is replicated on every rank.

    ``ep_size = 1``: data parallelism; ``ep_size = world_size``: expert parallelism (plus data parallelism of
    the rest); in between: hybrid. Per parameter (:func:`moe_lab.calculator.training_memory`): weights and
    gradients in ``dtype``, an fp32 master copy unless fp32, Adam's two fp32 moments. ``zero=True`` (ZeRO
    stage 1) shards the master copy and the moments over the ranks holding the same parameter: replicated
    ones over all ``world_size`` ranks, expert ones over the ``world_size / ep_size`` copies.
    """
    check_int("world_size", world_size, 1)
    check_int("ep_size", ep_size, 1, world_size)
    if world_size % ep_size:
        raise ValueError(f"ep_size must be a positive divisor of world_size={world_size}, got {ep_size!r}")
    check_number("replicated_params", replicated_params, 0)
    check_number("expert_params", expert_params, 0)
    check_bool("zero", zero)
    experts = expert_params / ep_size
    per = training_memory(1, dtype)
    copies = world_size // ep_size
    optimizer_per_param = per["master_weights"] + per["adam_states"]
    optimizer = (replicated_params / world_size + experts / copies if zero else replicated_params + experts)
    parts = {
        "weights": (replicated_params + experts) * per["weights"],
        "gradients": (replicated_params + experts) * per["gradients"],
        "optimizer": optimizer * optimizer_per_param,
    }
    parts["total"] = sum(parts.values())
    return parts


def moe_activation_bytes(arch: Arch, tokens_per_rank: int, dtype: str = "bf16") -> float:
    """An estimate of the MoE FFN activations one rank keeps for backward: per MoE layer and token-slot the
    dispatched row (``d_model``) and the expert's hidden tensors (SwiGLU: gate, up and their product, ``3 *
    d_expert``; GELU: pre- and post-activation, ``2 * d_expert``). The same under data and (balanced) expert
    parallelism: each rank computes ``tokens_per_rank * k`` slots on average; imbalance raises the busiest
    rank's share."""
    check_type("arch", arch, Arch, "a moe_lab.calculator.Arch")
    check_int("tokens_per_rank", tokens_per_rank, 0)
    hidden = (3 if arch.activation == "swiglu" else 2) * arch.d_expert
    per_slot = (arch.d_model + hidden) * training_memory(1, dtype)["weights"]
    return sum(arch.moe_layers) * tokens_per_rank * arch.k * per_slot


def rank_memory(arch: Arch, world_size: int, ep_size: int, dtype: str = "bf16", zero: bool = False,
                tokens_per_rank: int = 0) -> dict[str, float]:
    """:func:`rank_state_bytes` for a whole model (routed experts sharded, everything else replicated, shared
    experts included) plus ``"activations"`` from :func:`moe_activation_bytes`; bytes per rank."""
    c = count_params(arch)
    check_int("tokens_per_rank", tokens_per_rank, 0)
    expert_params = c.components["routed_experts"][0]
    parts = rank_state_bytes(c.total - expert_params, expert_params, world_size, ep_size, dtype, zero)
    activations = moe_activation_bytes(arch, tokens_per_rank, dtype) if arch.num_experts else 0.0
    return {**{k: v for k, v in parts.items() if k != "total"}, "activations": activations,
            "total": parts["total"] + activations}
