"""Exercises of 07_switch_glam_stmoe: MoE layer schedules and the Switch Transformer's top-1 layer."""
from __future__ import annotations

import random

import torch

from ..calculator import moe_schedule
from ..layer import MoELayer
from ..routing import softmax_topk
from .core import Case, exercise, with_weights


@exercise("07.1", function="moe_layer_schedule", title="Which layers are MoE?", points=1, reference=moe_schedule,
          hint="layer i (0-based) is MoE when i >= first_dense and (i - first_dense + 1) is a multiple of every")
def _schedule_cases(hidden: bool) -> list[Case]:
    configs = [(4, 1, 0), (6, 2, 0), (5, 1, 2)]
    if hidden:
        configs += [(61, 1, 3), (24, 2, 1), (7, 3, 1), (0, 1, 0), (3, 4, 0),
                    (random.randint(1, 64), random.randint(1, 4), random.randint(0, 3))]
    return [Case(f"n_layers={n}, every={e}, first_dense={f}", (n, e, f)) for n, e, f in configs]


def switch_route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 07.2: Switch top-1 routing, the gate is the full-softmax probability (not renormalised)."""
    _, gates, experts = softmax_topk(logits, 1, renormalize=False)
    return gates[:, 0], experts[:, 0]


@exercise("07.2", function="switch_route", title="Switch top-1 routing", points=1, reference=switch_route,
          hint="probs = softmax(logits.float(), dim=-1); gate, expert = probs.max(dim=-1); do not renormalise "
               "(a renormalised top-1 gate is always 1 and the router gets no gradient)")
def _route_cases(hidden: bool) -> list[Case]:
    shapes = [(6, 4), (1, 8)] + ([(64, 128), (5, 1), (33, 7)] if hidden else [])
    cases = [Case(f"T={t}, E={e}", (torch.randn(t, e),), grad_wrt=(0,)) for t, e in shapes]
    cases.append(Case("bfloat16 logits (compute in float32)", ((3 * torch.randn(5, 4)).bfloat16(),)))
    return cases


def switch_ffn(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               capacity_factor: float) -> torch.Tensor:
    """Reference for 07.3: ``MoELayer`` with k=1, GELU experts, no renormalisation, capacity by position."""
    num_experts, d_model, d_ff = w1.shape
    layer = MoELayer(d_model, d_ff, num_experts, 1, activation="gelu", renormalize=False, dispatch="loop",
                     capacity_factor=capacity_factor)
    with_weights(layer, router__weight=router_weight, experts__w1=w1, experts__w2=w2)
    return layer(x)[0]


@exercise("07.3", function="switch_ffn", title="A Switch layer with expert capacity", points=3, reference=switch_ffn,
          rtol=1e-4, atol=1e-5,
          hint="route with switch_route; capacity = ceil(T * capacity_factor / E); a token is kept if fewer than "
               "capacity earlier tokens chose the same expert; kept tokens get gate * w2(gelu(x w1)), dropped "
               "tokens exactly 0")
def _switch_cases(hidden: bool) -> list[Case]:
    configs = [(12, 8, 16, 4, 1.0), (6, 4, 8, 2, 4.0)]
    if hidden:
        configs += [(40, 8, 12, 8, 1.25), (9, 4, 4, 3, 0.5), (1, 4, 8, 1, 1.0), (64, 16, 8, 16, 2.0)]
    cases = []
    for t, d, f, e, cf in configs:
        x = torch.randn(t, d)
        x[: t // 2] += 2 * torch.randn(d)  # a common direction: the router favours a few experts, some overflow
        args = (x, torch.randn(e, d), torch.randn(e, d, f) / d**0.5, torch.randn(e, f, d) / f**0.5, cf)
        cases.append(Case(f"T={t}, d={d}, d_ff={f}, E={e}, capacity_factor={cf}", args, grad_wrt=(0, 1, 2)))
    return cases
