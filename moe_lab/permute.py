"""Moving token-slots into expert order and back, with deterministic backward passes (no atomics).

A token-slot ``s`` (``0 <= s < T*k``) is token ``s // k``'s ``(s % k)``-th choice; ``order: [S]`` lists the
slots to compute in expert order (``S = T*k`` dropless, fewer when capacity drops some).
Two adjoint operations, each the other's backward:

- :func:`gather_slots`: ``x[order // k]``, token rows copied to their slots;
- :func:`sum_slots`: each token's slot rows added up (absent slots add zero), accumulated in float32 in a fixed
  order: no atomic scatter-add, so results are bit-reproducible on CUDA too.

:func:`combine_slots` (``y_t = sum_j gates[t, j] * h[slot (t, j)]``) is ``sum_slots`` of gate-weighted rows.
"""
from __future__ import annotations

import torch


def _to_slots(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return x.index_select(0, order // k)


def _to_tokens(rows: torch.Tensor, order: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    if order.numel() == num_tokens * k:  # every slot present: gather with the inverse permutation (fast)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        slots = rows.index_select(0, inverse)
    else:
        slots = rows.new_zeros(num_tokens * k, rows.shape[-1]).index_copy_(0, order, rows)
    slots = slots.view(num_tokens, k, -1)
    acc = torch.promote_types(rows.dtype, torch.float32)  # at least float32
    if slots.device.type == "cuda":
        return slots.sum(dim=1, dtype=acc).to(rows.dtype)
    total = slots[:, 0].to(acc)  # on CPU k vectorised adds beat a reduction over a short middle dimension
    for j in range(1, k):
        total = total + slots[:, j]
    return total.to(rows.dtype)


class _GatherSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, k):
        ctx.save_for_backward(order)
        ctx.num_tokens, ctx.k = x.shape[0], k
        return _to_slots(x, order, k)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _to_tokens(grad, order, ctx.num_tokens, ctx.k), None, None


class _SumSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, order, num_tokens, k):
        ctx.save_for_backward(order)
        ctx.k = k
        return _to_tokens(rows, order, num_tokens, k)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _to_slots(grad, order, ctx.k), None, None, None


def gather_slots(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Token rows copied to the slots in ``order``. x: ``[T, d]``, order: ``[S]`` slot ids -> ``[S, d]``."""
    return _GatherSlots.apply(x, order, k)


def sum_slots(rows: torch.Tensor, order: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """Per token, the sum of its slot rows. rows: ``[S, d]`` for the slots in ``order: [S]`` -> ``[T, d]``
    in ``rows.dtype`` (added in float32; slots not in ``order`` add zero)."""
    return _SumSlots.apply(rows, order, num_tokens, k)


def combine_slots(h: torch.Tensor, order: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum over each token's slots: ``y_t = sum_j gates[t, j] * h[slot (t, j)]``.

    h: ``[S, d]`` expert outputs of the slots in ``order: [S]``; gates: ``[T, k]`` -> ``[T, d]`` in ``h.dtype``
    (each product rounded to ``h.dtype``, the k products added in float32).
    """
    num_tokens, k = gates.shape
    slot_gates = gates.reshape(-1).index_select(0, order).to(h.dtype)
    return sum_slots(h * slot_gates.unsqueeze(-1), order, num_tokens, k)
