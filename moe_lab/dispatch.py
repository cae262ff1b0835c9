"""Dispatch: send each token to its k experts and combine the results, ``y_t = sum_j gates[t,j] * E_{experts[t,j]}(x_t)``.

Three implementations with one signature ``fn(x, experts, gates, expert_ffns, keep=None) -> y`` (``onehot`` also
takes its buffer size, ``capacity=``):

- ``"loop"``: a readable loop over experts (the reference; the eager style of popular model code).
- ``"sorted"``: sort token-slots by expert, run every expert with grouped GEMMs, un-sort, weight and sum
  (the fast path; deterministic: no atomics).
- ``"onehot"``: GShard's one-hot dispatch / combine einsums over an ``[T, E, C]`` tensor (for teaching; its
  memory grows as ``T * E * C``).

Expert capacity (Switch / GShard): :func:`expert_capacity` gives the slots per expert and :func:`capacity_mask`
decides which token-slots fit (``keep``). A dropped slot (``keep == False``) is never computed: it contributes
exactly zero to ``y`` and receives zero gradient, in every path; the residual connection around the MoE layer
carries the token. ``keep=None`` is dropless (every slot is computed).

Shapes: ``x: [T, d_model]``, ``experts: [T, k]`` int64, ``gates: [T, k]``, ``keep: [T, k]`` bool -> ``y: [T, d_model]``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from .experts import Experts
from .metrics import _tokens_per_expert
from .permute import gather_slots, sum_slots
from .routing import check_experts, check_k
from .utils import compute_dtype
from .validation import check_finite, check_int, check_number, check_tensor

DropPolicy = Literal["position", "probability", "batch_priority"]
DROP_POLICIES = ("position", "probability", "batch_priority")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1) -> int:
    """Slots per expert: ``ceil(num_tokens * k / num_experts * capacity_factor)``.

    Switch Transformer eq. (3) (tokens per batch / experts x capacity factor), times ``k`` for top-k as in
    GShard (top-2: ``2N/E``). We round *up*, so capacity factor 1.0 with perfectly even routing drops nothing;
    some implementations truncate with ``int()`` instead (at most one slot less). A product within a relative
    ``1e-9`` of an integer counts as that integer, so that float noise (``1.1 * 100 / 10 = 11.000000000000002``)
    does not add a slot; any other positive product gives at least one slot.
    """
    check_number("capacity_factor", capacity_factor, 0, low_open=True)
    check_int("num_tokens", num_tokens, 0)
    check_int("num_experts", num_experts, 1)
    check_k(k, num_experts)
    slots = num_tokens * k * capacity_factor / num_experts
    nearest = round(slots)
    return nearest if nearest > 0 and abs(slots - nearest) <= 1e-9 * nearest else math.ceil(slots)


def _priority_order(experts: torch.Tensor, probs: torch.Tensor | None, policy: str) -> torch.Tensor:
    """Slots in the order they claim capacity, as indices into the choice-major flattening ``experts.T``.

    ``"position"``: every token's first choice (in token order) before any second choice (Switch/GShard).
    ``"probability"``: highest router probability first; ties keep the position order.
    ``"batch_priority"`` (V-MoE's batch prioritized routing, Riquelme et al. 2021): tokens sorted by their top-1
    probability (highest first, ties in token order), then every first choice before any second choice.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")
    if probs is None and policy != "position":
        raise ValueError(f"drop_policy={policy!r} needs probs of shape {tuple(experts.shape)} (one per slot)")
    if probs is not None:
        check_tensor("probs", probs, f"{list(experts.shape)} (one per slot)", kind="float")
        if probs.shape != experts.shape:
            raise ValueError(f"probs must have the shape of experts, {tuple(experts.shape)} (one per slot), got "
                             f"{tuple(probs.shape)}")
        check_finite("probs", probs)
    n = experts.numel()
    if policy == "position":
        return torch.arange(n, device=experts.device)
    if policy == "batch_priority":
        num_tokens, k = experts.shape
        tokens = torch.sort(probs.detach().float().amax(dim=1), descending=True, stable=True).indices
        return (torch.arange(k, device=experts.device)[:, None] * num_tokens + tokens).reshape(-1)
    return torch.sort(probs.detach().float().T.reshape(-1), descending=True, stable=True).indices


def queue_positions(
    experts: torch.Tensor, num_experts: int, probs: torch.Tensor | None = None, policy: DropPolicy = "position"
) -> torch.Tensor:
    """Where each token-slot stands in its expert's queue (0 = served first) under a priority policy.

    experts: ``[T, k]``; probs: ``[T, k]`` router probability of each selected slot (for ``"probability"``
    and ``"batch_priority"``)
    -> ``[T, k]`` int64. A slot is kept under capacity ``C`` iff its position is ``< C``.
    """
    check_experts(experts, num_experts)
    experts = experts.long()
    num_tokens, k = experts.shape
    order = _priority_order(experts, probs, policy)  # priority rank -> choice-major slot id
    by_rank = experts.T.reshape(-1)[order]  # expert of each slot, in priority order
    grouped = torch.argsort(by_rank, stable=True)  # grouped by expert, priority order inside a group
    counts = torch.bincount(by_rank, minlength=num_experts)
    starts = counts.cumsum(0) - counts
    pos_by_rank = torch.empty_like(by_rank)
    pos_by_rank[grouped] = torch.arange(by_rank.numel(), device=by_rank.device) - starts[by_rank[grouped]]
    pos = torch.empty_like(by_rank)
    pos[order] = pos_by_rank
    return pos.view(k, num_tokens).T.contiguous()


def capacity_mask(
    experts: torch.Tensor,
    num_experts: int,
    capacity: int,
    probs: torch.Tensor | None = None,
    policy: DropPolicy = "position",
) -> torch.Tensor:
    """Which token-slots fit into ``capacity`` slots per expert. -> ``keep: [T, k]`` bool.

    Priority ``"position"`` (Switch, GShard): first choices of all tokens, in token order, then second
    choices, ...; ``"probability"``: slots with the highest router probability ``probs: [T, k]`` first;
    ``"batch_priority"`` (V-MoE): as ``"position"``, with tokens ordered by their top-1 probability.
    No expert ever keeps more than ``capacity`` slots.
    """
    check_int("capacity", capacity, 0)
    return queue_positions(experts, num_experts, probs, policy) < capacity


def sort_by_expert(
    experts: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token-slots by expert ("expert batching").

    experts: ``[T, k]`` -> ``order: [S]`` slot ids sorted by expert (stable: token order kept within an
    expert; slot ``s`` is token ``s // k``), and ``counts: [E]`` slots per expert. With ``keep: [T, k]``
    only the kept slots appear (``S = keep.sum()``); without it ``S = T * k``.
    """
    check_experts(experts, num_experts)
    return _sort_by_expert(experts, num_experts, keep)


def _sort_by_expert(experts: torch.Tensor, num_experts: int, keep: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    flat = experts.reshape(-1)
    if keep is None:
        return _stable_order(flat, num_experts), _tokens_per_expert(flat.long(), num_experts)
    flat = torch.where(keep.reshape(-1), flat, num_experts)  # dropped slots sort last, into a bin we cut off
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    return _stable_order(flat, num_experts)[: int(counts.sum())], counts


def _stable_order(keys: torch.Tensor, largest: int) -> torch.Tensor:
    """``argsort(keys, stable=True)`` of keys in ``0 .. largest``, sorted as the narrowest integer type that holds
    them: a radix sort makes a pass per byte (8x faster for 32768 slots of 128 experts as uint8 than as int64)."""
    if keys.device.type == "cpu":
        keys = keys.to(torch.uint8 if largest < 256 else torch.int16 if largest < 2**15 else torch.int32)
    return torch.argsort(keys, stable=True)


def dispatch_loop(
    x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: for each expert that got tokens, gather its (kept) tokens, run it, add the gated outputs back
    (Hugging Face's eager Mixtral loop; the sum is in float32)."""
    check_experts(experts, ffns.num_experts)
    return _dispatch_loop(x, experts, gates, ffns, keep)


def _dispatch_loop(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts,
                   keep: torch.Tensor | None, capacity: int | None = None) -> torch.Tensor:
    chosen = experts if keep is None else torch.where(keep, experts, ffns.num_experts)  # dropped: no expert
    dtype = compute_dtype(x)
    weights = ffns.expert_weights(dtype)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(chosen).tolist():
        if e == ffns.num_experts:
            continue
        token_idx, slot = torch.where(chosen == e)
        out = ffns.mlp(x[token_idx].to(dtype), *weights[e])
        y.index_add_(0, token_idx, out.float() * gates[token_idx, slot, None].float())
    return y.to(dtype)


def dispatch_sorted(
    x: torch.Tensor,
    experts: torch.Tensor,
    gates: torch.Tensor,
    ffns: Experts,
    keep: torch.Tensor | None = None,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """Fast path: one permutation, grouped GEMMs with the gate multiply folded in, one inverse permutation and
    a sum over k.

    Dropped slots are left out of the GEMMs and their rows stay exactly zero.
    """
    check_experts(experts, ffns.num_experts)
    return _dispatch_sorted(x, experts, gates, ffns, keep, fused=fused)


def _dispatch_sorted(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts,
                     keep: torch.Tensor | None, capacity: int | None = None, *, fused: bool | None = None
                     ) -> torch.Tensor:
    num_tokens, k = experts.shape
    order, counts = _sort_by_expert(experts, ffns.num_experts, keep)
    slot_gates = gates.reshape(-1).index_select(0, order)
    h = ffns.forward_grouped(gather_slots(x.to(compute_dtype(x)), order, k), counts, fused=fused,
                             scale=slot_gates)  # [S, d], gate-weighted
    return sum_slots(h, order, num_tokens, k)  # back to token order, summed over k in float32


def dispatch_onehot(
    x: torch.Tensor,
    experts: torch.Tensor,
    gates: torch.Tensor,
    ffns: Experts,
    keep: torch.Tensor | None = None,
    *,
    capacity: int | None = None,
) -> torch.Tensor:
    """GShard-style: build ``combine[T, E, C]`` (gate weight of token t in slot c of expert e), dispatch with
    an einsum into ``[E, C, d]`` buffers, run experts with a batched matmul, combine with a second einsum.

    ``C = capacity`` when given (GShard's fixed buffer; must hold every kept slot), else the largest
    expert load (dropless). Dropped slots get all-zero rows in ``dispatch`` and ``combine``.
    """
    check_experts(experts, ffns.num_experts)
    return _dispatch_onehot(x, experts, gates, ffns, keep, capacity)


def _dispatch_onehot(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts,
                     keep: torch.Tensor | None, capacity: int | None = None) -> torch.Tensor:
    num_experts = ffns.num_experts
    mask = torch.nn.functional.one_hot(experts, num_experts)  # [T, k, E]
    if keep is not None:
        mask = mask * keep.unsqueeze(-1)
    # position of each slot in its expert's buffer: slots counted in (token, k) order
    position = (mask.reshape(-1, num_experts).cumsum(0).reshape(mask.shape) - 1) * mask
    load = int(mask.sum(dim=(0, 1)).max()) if mask.numel() else 0
    if capacity is not None and capacity < load:
        raise ValueError(f"capacity={capacity} is smaller than the largest kept expert load {load}")
    buffer = max(load if capacity is None else capacity, 1)
    pos_onehot = torch.nn.functional.one_hot(position.sum(-1), buffer)  # [T, k, C]
    dtype = compute_dtype(x)
    dispatch = torch.einsum("tke,tkc->tec", mask.to(dtype), pos_onehot.to(dtype))  # 0/1
    combine = torch.einsum("tke,tkc,tk->tec", mask.to(dtype), pos_onehot.to(dtype), gates.to(dtype))
    expert_in = torch.einsum("tec,td->ecd", dispatch, x.to(dtype))
    expert_out = ffns.forward_batched(expert_in)
    return torch.einsum("tec,ecd->td", combine, expert_out)


DISPATCH = {"loop": dispatch_loop, "sorted": dispatch_sorted, "onehot": dispatch_onehot}
"""The dispatch paths by name (each checks its arguments)."""


def run_dispatch(name: str, x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts,
                 keep: torch.Tensor | None, capacity: int | None) -> torch.Tensor:
    """The dispatch path ``name`` without its argument checks: :class:`moe_lab.MoELayer`'s entry, whose routing
    comes from its own validated config and top-k (``capacity``: the one-hot path's buffer size)."""
    return _UNCHECKED[name](x, experts, gates, ffns, keep, capacity)


_UNCHECKED = {"loop": _dispatch_loop, "sorted": _dispatch_sorted, "onehot": _dispatch_onehot}
