"""Dispatch: send each token to its k experts and combine the results, ``y_t = sum_j gates[t,j] * E_{experts[t,j]}(x_t)``.

Three implementations with one signature ``fn(x, experts, gates, expert_ffns) -> y``:

- ``"loop"``: a readable loop over experts (the reference; the eager style of popular model code).
- ``"sorted"``: sort token-slots by expert, run every expert with grouped GEMMs, un-sort, weight and sum
  (the fast path; deterministic: no atomics).
- ``"onehot"``: GShard's one-hot dispatch / combine einsums over an ``[T, E, C]`` tensor (for teaching; its
  memory grows as ``T * E * C``).

Shapes: ``x: [T, d_model]``, ``experts: [T, k]`` int64, ``gates: [T, k]`` -> ``y: [T, d_model]``.
"""
from __future__ import annotations

import torch

from .experts import Experts
from .utils import compute_dtype


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token-slots by expert ("expert batching").

    experts: ``[T, k]`` -> ``order: [T*k]`` slot ids sorted by expert (stable: token order kept within an
    expert; slot ``s`` is token ``s // k``), and ``counts: [E]`` slots per expert.
    """
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def dispatch_loop(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run it, add the gated outputs back."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(ffns.num_experts):
        token_idx, slot = torch.where(experts == e)
        if token_idx.numel() == 0:
            continue
        out = ffns.forward_one(e, x[token_idx])
        y = y.index_add(0, token_idx, out.float() * gates[token_idx, slot, None].float())
    return y.to(compute_dtype(x))


def dispatch_sorted(
    x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts, *, fused: bool | None = None
) -> torch.Tensor:
    """Fast path: one permutation, grouped GEMMs, one inverse permutation, a weighted sum over k."""
    num_tokens, k = experts.shape
    order, counts = sort_by_expert(experts, ffns.num_experts)
    h = ffns.forward_grouped(x[order // k], counts, fused=fused)  # [T*k, d] in expert order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    slots = h[inverse].view(num_tokens, k, -1)  # back to token order
    return (slots.float() * gates.unsqueeze(-1).float()).sum(dim=1).to(h.dtype)  # sum over k in float32


def dispatch_onehot(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, ffns: Experts) -> torch.Tensor:
    """GShard-style: build ``combine[T, E, C]`` (gate weight of token t in slot c of expert e), dispatch with
    an einsum into ``[E, C, d]`` buffers, run experts with a batched matmul, combine with a second einsum.
    ``C`` is the largest expert load here (dropless)."""
    num_tokens, k = experts.shape
    num_experts = ffns.num_experts
    mask = torch.nn.functional.one_hot(experts, num_experts)  # [T, k, E]
    # position of each slot in its expert's buffer: slots counted in (token, k) order
    position = (mask.reshape(-1, num_experts).cumsum(0).reshape(mask.shape) - 1) * mask
    capacity = int(mask.sum(dim=(0, 1)).max())
    pos_onehot = torch.nn.functional.one_hot(position.sum(-1), capacity)  # [T, k, C]
    dtype = compute_dtype(x)
    dispatch = torch.einsum("tke,tkc->tec", mask.to(dtype), pos_onehot.to(dtype))  # 0/1
    combine = torch.einsum("tke,tkc,tk->tec", mask.to(dtype), pos_onehot.to(dtype), gates.to(dtype))
    expert_in = torch.einsum("tec,td->ecd", dispatch, x.to(dtype))
    expert_out = ffns.forward_batched(expert_in)
    return torch.einsum("tec,ecd->td", combine, expert_out)


DISPATCH = {"loop": dispatch_loop, "sorted": dispatch_sorted, "onehot": dispatch_onehot}
