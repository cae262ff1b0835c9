"""Exercises of 05_capacity: expert capacity, position priority and the drop rate, combine with drops, and
GShard's one-hot dispatch / combine einsums."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..dispatch import capacity_mask, expert_capacity
from ..metrics import drop_rate, unrouted_fraction
from .core import Case, exercise


@exercise("05.1", function="expert_capacity", title="Expert capacity", points=1, reference=expert_capacity,
          hint="each expert gets its fair share of the T*k token-slots, times the capacity factor, rounded up to a "
               "whole slot",
          hints=("C = ceil(num_tokens * k / num_experts * capacity_factor), a Python int",
                 "floating point makes 1.1 * 100 / 10 equal 11.000000000000002, whose ceil is 12: round the "
                 "product to 9 decimals before math.ceil"),
          mistakes={"forgetting k (top-k routing sends k slots per token)":
                    lambda num_tokens, num_experts, capacity_factor, k=1: math.ceil(
                        round(num_tokens * capacity_factor / num_experts, 9)),
                    "rounding down (Switch's capacity rounds up)":
                    lambda num_tokens, num_experts, capacity_factor, k=1: math.floor(
                        round(num_tokens * k * capacity_factor / num_experts, 9)),
                    "float noise: the product rounded up without rounding it to 9 decimals first":
                    lambda num_tokens, num_experts, capacity_factor, k=1: math.ceil(
                        num_tokens * k * capacity_factor / num_experts)})
def _capacity_cases(hidden: bool) -> list[Case]:
    configs = [(100, 10, 1.0, 1), (100, 10, 1.25, 1), (64, 8, 1.0, 2), (100, 10, 1.1, 1)]
    if hidden:
        configs += [(4096, 128, 1.25, 2), (10, 4, 1.0, 1), (1, 64, 2.0, 1), (0, 4, 1.0, 2),
                    (random.randint(1, 5000), 16, 1.5, 2)]
    return [Case(f"T={t}, E={e}, capacity_factor={cf}, k={k}", (t, e, cf, k)) for t, e, cf, k in configs]


def position_priority(experts: torch.Tensor, num_experts: int, capacity: int) -> tuple[torch.Tensor, float]:
    """Reference for 05.2: ``keep [T, k]`` bool (first choices of all tokens, in token order, before second
    choices; at most ``capacity`` slots per expert) and the fraction of slots dropped."""
    keep = capacity_mask(experts, num_experts, capacity, policy="position")
    return keep, drop_rate(~keep)


def _queue(experts: torch.Tensor, num_experts: int, capacity: int, order: str = "choice"
           ) -> list[tuple[int, int, int, int]]:
    """The kept slots ``(token, choice, expert, place in the expert's buffer)`` by a slow loop over slots,
    choice-major (``"choice"``: all first choices in token order, then second choices, ...) or token by token
    (``"token"``)."""
    num_tokens, k = experts.shape
    slots = [(t, j) for j in range(k) for t in range(num_tokens)] if order == "choice" else \
        [(t, j) for t in range(num_tokens) for j in range(k)]
    used, kept = [0] * num_experts, []
    for t, j in slots:
        e = int(experts[t, j])
        if used[e] < capacity:
            kept.append((t, j, e, used[e]))
            used[e] += 1
    return kept


def _priority_variant(order: str = "choice", extra: int = 0, rate=drop_rate):
    def priority(experts, num_experts, capacity):
        keep = torch.zeros(experts.shape, dtype=torch.bool)
        for t, j, _, _ in _queue(experts, num_experts, capacity + extra, order):
            keep[t, j] = True
        return keep, rate(~keep)
    return priority


@exercise("05.2", function="position_priority", title="Who fits: position priority, and the drop rate", points=3,
          reference=position_priority,
          hint="slots claim places in their expert's queue in a fixed order: every token's first choice, in token "
               "order, before any token's second choice; a slot fits while its expert still has a free place",
          hints=("walk the slots column by column (all first choices, then all second choices, ...), each column "
                 "in token order, keeping a running count of the places each expert has handed out",
                 "a slot is kept when its expert's count is below capacity (then the count goes up); capacity 0 "
                 "keeps nothing; the drop rate is the fraction of all T*k slots not kept, a Python float (0.0 "
                 "when there are no slots)"),
          mistakes={"filling the queues token by token (a token's second choice is served before later tokens' "
                    "first choices)": _priority_variant(order="token"),
                    "keeping capacity + 1 slots per expert (keep while the count is < capacity, not <=)":
                    _priority_variant(extra=1),
                    "the drop rate over tokens that lost every slot (count slots, not tokens)":
                    _priority_variant(rate=unrouted_fraction)})
def _priority_cases(hidden: bool) -> list[Case]:
    configs = [(8, 4, 1, 2), (6, 3, 2, 3), (5, 4, 2, 0)]
    if hidden:
        configs += [(64, 8, 2, 10), (33, 16, 4, 5), (1, 2, 2, 1), (40, 4, 1, 40), (0, 4, 2, 3)]
    return [Case(f"T={t}, E={e}, k={k}, capacity={c}", (_skewed_experts(t, e, k), e, c)) for t, e, k, c in configs]


def _skewed_experts(num_tokens: int, num_experts: int, k: int) -> torch.Tensor:
    """``[T, k]`` distinct experts per token; expert 0 is popular, so it overflows."""
    skew = torch.zeros(num_experts)
    skew[0] = 1.5
    return (torch.randn(num_tokens, num_experts) + skew).topk(k, dim=-1).indices


def combine_with_drops(expert_out: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Reference for 05.3: ``y_t = sum_j keep[t, j] * gates[t, j] * expert_out[t, j]``, exactly zero for drops."""
    return (expert_out * torch.where(keep, gates, torch.zeros_like(gates)).unsqueeze(-1)).sum(dim=1)


@exercise("05.3", function="combine_with_drops", title="Combine the kept slots (dropped ones add zero)", points=2,
          reference=combine_with_drops,
          hint="a token's output is the gate-weighted sum of its kept slots only; a dropped slot contributes exactly "
               "nothing, not even through the gradient (the residual connection carries the token)",
          hints=("zero the gates of the dropped slots (select, do not add anything), weight each slot's expert "
                 "output by its gate and sum over the k slots",
                 "torch.where(keep, gates, 0) selects without touching the dropped values; a token that lost all "
                 "its slots gets a zero row"),
          mistakes={"ignoring keep (the dropped slots were added too)":
                    lambda expert_out, gates, keep: (expert_out * gates.unsqueeze(-1)).sum(dim=1),
                    "renormalising the kept gates to sum to 1 (the gates stay as the router gave them)":
                    lambda expert_out, gates, keep: combine_with_drops(
                        expert_out, gates / torch.where(keep, gates, 0).sum(-1, keepdim=True).clamp_min(1e-30), keep)})
def _combine_cases(hidden: bool) -> list[Case]:
    shapes = [(5, 2, 3), (4, 1, 2)] + ([(32, 4, 8), (1, 2, 1)] if hidden else [])
    cases = []
    for t, k, d in shapes:
        keep = torch.rand(t, k) > 0.4
        keep[0] = False  # a token that lost every slot
        cases.append(Case(f"T={t}, k={k}, d={d}", (torch.randn(t, k, d), torch.rand(t, k), keep), grad_wrt=(0, 1)))
    return cases


def gshard_moe(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               capacity: int, order: str = "choice", gated: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for 05.4 (slow loops): GShard's ``dispatch [T, E, C]`` (bool: slot ``c`` of expert ``e`` holds
    token ``t``) and ``combine [T, E, C]`` (its gate there), the buffer positions handed out first choices first
    (in token order, then second choices, ...), and ``y = sum over kept slots of gate * gelu(x w1[e]) w2[e]``.
    ``order="token"`` / ``gated=False`` give two known mistakes."""
    kept = _queue(experts, w1.shape[0], capacity, order)
    weight = torch.stack([gates[t, j] if gated else gates.new_ones(()) for t, j, _, _ in kept]).float() if kept \
        else torch.zeros(0)
    index = tuple(torch.tensor([slot[i] for slot in kept], dtype=torch.long) for i in (0, 2, 3))
    combine = torch.zeros(experts.shape[0], w1.shape[0], capacity).index_put(index, weight)
    dispatch = torch.zeros(combine.shape, dtype=torch.bool).index_put(index, torch.tensor(True))
    y = torch.zeros(x.shape)
    for (t, _, e, _), g in zip(kept, weight):
        y = y.index_add(0, torch.tensor([t]), (g * (F.gelu(x[t] @ w1[e]) @ w2[e])).unsqueeze(0))
    return y, combine, dispatch


@exercise("05.4", function="gshard_moe", title="GShard's one-hot dispatch and combine einsums", points=5,
          reference=gshard_moe, rtol=1e-4, atol=1e-5,
          hint="GShard never gathers or sorts: it writes which token sits in which place of which expert's buffer "
               "as a one-hot tensor dispatch[T, E, C], the same tensor holding the gates as combine[T, E, C], and "
               "moves tokens in and out of the [E, C, d] buffers with two einsums",
          hints=("the place of a slot in its expert's buffer is its position in the queue of 05.2 (first choices "
                 "first, in token order): slots at position >= C are dropped and appear nowhere",
                 "build both tensors from one-hot encodings of the expert and of the position (F.one_hot) and the "
                 "keep mask; summed over the k choices they have at most one non-zero per (t, e)",
                 "the three formulas of the text are one einsum each (the expert step is a batched matmul over "
                 "e, every expert on all its C places at once); empty places hold zeros, gelu(0) = 0 and their "
                 "combine weight is 0, so padding changes nothing"),
          mistakes={"token-major buffer places (a token's second choice queued before later tokens' first choices)":
                    lambda x, experts, gates, w1, w2, capacity: gshard_moe(x, experts, gates, w1, w2, capacity,
                                                                            order="token"),
                    "combine without the gates (combine equals dispatch)":
                    lambda x, experts, gates, w1, w2, capacity: gshard_moe(x, experts, gates, w1, w2, capacity,
                                                                            gated=False)})
def _gshard_cases(hidden: bool) -> list[Case]:
    configs = [(8, 4, 8, 4, 2, 3), (6, 4, 4, 3, 1, 2)]
    if hidden:
        configs += [(32, 8, 8, 8, 2, 6), (1, 4, 4, 2, 2, 1), (40, 8, 8, 4, 2, 25), (20, 4, 6, 6, 3, 7),
                    (random.randint(4, 24), 4, 4, 4, 2, random.randint(1, 6))]
    cases = []
    for t, d, f, e, k, c in configs:
        experts = _skewed_experts(t, e, k)
        if not hidden and k > 1:  # a visible case where the order of the queue matters
            while set(_queue(experts, e, c)) == set(_queue(experts, e, c, "token")):
                experts = _skewed_experts(t, e, k)
        gates = torch.rand(t, k).softmax(-1)
        args = (torch.randn(t, d), experts, gates, torch.randn(e, d, f) / d**0.5, torch.randn(e, f, d) / f**0.5, c)
        cases.append(Case(f"T={t}, d={d}, d_ff={f}, E={e}, k={k}, capacity={c}", args, grad_wrt=(0, 2, 3, 4)))
    if hidden:
        args = (torch.randn(5, 4), _skewed_experts(5, 4, 2), torch.rand(5, 2), torch.randn(4, 4, 4), torch.randn(4, 4, 4), 0)
        cases.append(Case("capacity 0 (everything dropped)", args))
    return cases
