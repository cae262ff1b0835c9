"""Exercises of 05_capacity: expert capacity, a position-priority dispatch mask, combine with drops, drop rate."""
from __future__ import annotations

import random

import torch

from ..dispatch import capacity_mask, expert_capacity
from ..metrics import drop_rate
from .core import Case, exercise


@exercise("05.1", function="expert_capacity", title="Expert capacity", points=1, reference=expert_capacity,
          hint="capacity = ceil(num_tokens * k / num_experts * capacity_factor); round the product to 9 decimals "
               "before math.ceil so float noise (1.1 * 100 / 10 = 11.000000000000002) does not add a slot")
def _capacity_cases(hidden: bool) -> list[Case]:
    configs = [(100, 10, 1.0, 1), (100, 10, 1.25, 1), (64, 8, 1.0, 2), (100, 10, 1.1, 1)]
    if hidden:
        configs += [(4096, 128, 1.25, 2), (10, 4, 1.0, 1), (1, 64, 2.0, 1), (0, 4, 1.0, 2),
                    (random.randint(1, 5000), 16, 1.5, 2)]
    return [Case(f"T={t}, E={e}, capacity_factor={cf}, k={k}", (t, e, cf, k)) for t, e, cf, k in configs]


def position_priority_mask(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Reference for 05.2: keep ``[T, k]`` bool, first choices of all tokens (token order) before second choices."""
    return capacity_mask(experts, num_experts, capacity, policy="position")


@exercise("05.2", function="position_priority_mask", title="Dispatch mask with position priority", points=3,
          reference=position_priority_mask,
          hint="walk the slots column by column (all tokens' 1st choices, then all 2nd choices), each in token "
               "order; count how many slots each expert has taken; a slot is kept while its expert's count < capacity")
def _mask_cases(hidden: bool) -> list[Case]:
    configs = [(8, 4, 1, 2), (6, 3, 2, 3), (5, 4, 2, 0)]
    if hidden:
        configs += [(64, 8, 2, 10), (33, 16, 4, 5), (1, 2, 2, 1), (40, 4, 1, 40)]
    cases = []
    for t, e, k, c in configs:
        skew = torch.zeros(e)
        skew[0] = 1.5  # expert 0 is popular, so it overflows
        experts = (torch.randn(t, e) + skew).topk(k, dim=-1).indices
        cases.append(Case(f"T={t}, E={e}, k={k}, capacity={c}", (experts, e, c)))
    return cases


def combine_with_drops(expert_out: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Reference for 05.3: ``y_t = sum_j keep[t, j] * gates[t, j] * expert_out[t, j]``, exactly zero for drops."""
    return (expert_out * torch.where(keep, gates, torch.zeros_like(gates)).unsqueeze(-1)).sum(dim=1)


@exercise("05.3", function="combine_with_drops", title="Combine the kept slots (dropped ones add zero)", points=2,
          reference=combine_with_drops,
          hint="a dropped slot must add exactly 0 and pass no gradient to its gate or output: select with "
               "torch.where(keep, ...) (multiplying by keep still works, but never add x or the gate itself); "
               "sum over the k slots")
def _combine_cases(hidden: bool) -> list[Case]:
    shapes = [(5, 2, 3), (4, 1, 2)] + ([(32, 4, 8), (1, 2, 1)] if hidden else [])
    cases = []
    for t, k, d in shapes:
        keep = torch.rand(t, k) > 0.4
        keep[0] = False  # a token that lost every slot
        cases.append(Case(f"T={t}, k={k}, d={d}", (torch.randn(t, k, d), torch.rand(t, k), keep), grad_wrt=(0, 1)))
    return cases


@exercise("05.4", function="drop_rate", title="Drop rate", points=1, reference=drop_rate,
          hint="the fraction of token-slots dropped: dropped.float().mean() as a Python float (0.0 for no slots)")
def _rate_cases(hidden: bool) -> list[Case]:
    shapes = [(10, 2), (7, 1)] + ([(100, 4), (0, 2)] if hidden else [])
    return [Case(f"dropped {tuple(s)}", (torch.rand(s) > 0.7,)) for s in shapes]
