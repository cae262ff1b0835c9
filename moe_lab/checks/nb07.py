"""Exercises of 07_switch_glam_stmoe: MoE layer schedules and the Switch Transformer's top-1 layer."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..calculator import moe_schedule
from ..layer import MoELayer
from ..routing import softmax_topk
from .core import Case, exercise, with_weights
from .nb02 import untied


@exercise("07.1", function="moe_layer_schedule", title="Which layers are MoE?", points=1, reference=moe_schedule,
          hint="after the dense prefix, MoE layers repeat with period every, and the first MoE layer is the last "
               "layer of the first period (every=2: dense, MoE, dense, MoE, ...)",
          hints=("number the layers after the prefix from 1: layer i (0-based) has position i - first_dense + 1 "
                 "there; it is MoE when that position is a positive multiple of every",
                 "[i >= first_dense and (i - first_dense + 1) % every == 0 for i in range(n_layers)]"),
          mistakes={"MoE on the first layer of each period (i % every == 0): every=2 gives MoE, dense, MoE, ...":
                    lambda n_layers, every, first_dense: [i >= first_dense and (i - first_dense) % every == 0
                                                          for i in range(n_layers)],
                    "the period counted from layer 0, not from the end of the dense prefix":
                    lambda n_layers, every, first_dense: [i >= first_dense and (i + 1) % every == 0
                                                          for i in range(n_layers)]})
def _schedule_cases(hidden: bool) -> list[Case]:
    configs = [(4, 1, 0), (6, 2, 0), (5, 1, 2), (7, 3, 1)]
    if hidden:
        configs += [(61, 1, 3), (24, 2, 1), (7, 3, 1), (0, 1, 0), (3, 4, 0),
                    (random.randint(1, 64), random.randint(1, 4), random.randint(0, 3))]
    return [Case(f"n_layers={n}, every={e}, first_dense={f}", (n, e, f)) for n, e, f in configs]


def switch_route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 07.2: Switch top-1 routing: the expert with the largest logit, and as its gate the
    full-softmax probability in float32 (not renormalised)."""
    _, gates, experts = softmax_topk(logits, 1, renormalize=False)
    return gates[:, 0], experts[:, 0]


@exercise("07.2", function="switch_route", title="Switch top-1 routing", points=1, reference=switch_route,
          hint="one expert per token: the router's favourite, weighted by the probability the router gives it "
               "among all experts, in float32",
          hints=("choose the expert from the float32 logits (the softmax keeps their order; in low precision "
                 "probabilities can round to equal values, logits keep it); the gate is the softmax probability "
                 "at that expert, not renormalised: a renormalised top-1 gate is always 1 and gives the router no "
                 "gradient",
                 "probs = logits.float().softmax(-1); expert = logits.float().argmax(-1); "
                 "gate = probs.gather(-1, expert[:, None])[:, 0]"),
          mistakes={"a renormalised top-1 gate (always 1: the router would get no gradient from the task)":
                    lambda logits: (torch.ones(logits.shape[0]) + 0 * logits.float().sum(-1),
                                    logits.float().argmax(-1)),
                    "the softmax in the logits' dtype (the gate must be float32)":
                    lambda logits: tuple(logits.softmax(-1).max(-1))})
def _route_cases(hidden: bool) -> list[Case]:
    shapes = [(6, 4), (1, 8)] + ([(64, 128), (5, 1), (33, 7)] if hidden else [])
    cases = [Case(f"T={t}, E={e}", (untied((t, e), 1.0),), grad_wrt=(0,)) for t, e in shapes]
    cases.append(Case("bfloat16 logits (compute in float32)", (untied((5, 4), 3.0, torch.bfloat16),)))
    return cases


def switch_ffn(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               capacity_factor: float) -> torch.Tensor:
    """Reference for 07.3: ``MoELayer`` with k=1, GELU experts, no renormalisation, capacity by position."""
    num_experts, d_model, d_ff = w1.shape
    layer = MoELayer(d_model, d_ff, num_experts, 1, activation="gelu", renormalize=False, dispatch="loop",
                     capacity_factor=capacity_factor)
    with_weights(layer, router__weight=router_weight, experts__w1=w1, experts__w2=w2)
    return layer(x)[0]


def _switch_variant(*, renormalized=False, capacity=math.ceil, drop="zero"):
    """A slow Switch layer with one known mistake: gate 1, another rounding of the capacity, or dropped tokens
    passed through (``"identity"``: the token itself times its gate, a bug in published code)."""
    def layer(x, router_weight, w1, w2, capacity_factor):
        num_tokens, num_experts = x.shape[0], w1.shape[0]
        probs = (x.float() @ router_weight.float().T).softmax(-1)
        gate, expert = probs.max(-1)
        if renormalized:
            gate = gate / gate
        limit, used, rows = capacity(round(num_tokens * capacity_factor / num_experts, 9)), [0] * num_experts, []
        for t in range(num_tokens):
            e = int(expert[t])
            if used[e] < limit:
                used[e] += 1
                rows.append(gate[t] * (F.gelu(x[t] @ w1[e]) @ w2[e]))
            else:
                rows.append(gate[t] * x[t] if drop == "identity" else torch.zeros_like(x[t]))
        return torch.stack(rows)
    return layer


@exercise("07.3", function="switch_ffn", title="A Switch layer with expert capacity", points=3, reference=switch_ffn,
          rtol=1e-4, atol=1e-5,
          hint="route every token to one expert with its un-normalised gate; each expert serves at most C tokens, "
               "first come first served in token order; a token that finds its expert full is dropped and its MoE "
               "output is exactly zero",
          hints=("C = ceil(T * capacity_factor / E) (round the product to 9 decimals first, as in 05.1); a token's "
                 "place in its expert's queue is the number of earlier tokens that chose the same expert",
                 "for each expert, run gelu(x_e @ w1[e]) @ w2[e] on its kept tokens only, scale by their gates and "
                 "add the rows into a zero [T, d] output (index_add): dropped rows stay exactly zero, with no "
                 "gradient; the residual connection outside the layer carries those tokens"),
          mistakes={"renormalising the top-1 gate (it is then always 1: the router gets no gradient)":
                    _switch_variant(renormalized=True),
                    "rounding the capacity down (Switch rounds up)": _switch_variant(capacity=math.floor),
                    "passing dropped tokens through the layer scaled by their gate (a bug in published code: the "
                    "residual already carries them)": _switch_variant(drop="identity")})
def _switch_cases(hidden: bool) -> list[Case]:
    configs = [(12, 8, 16, 4, 1.0), (6, 4, 8, 2, 4.0), (10, 4, 8, 4, 1.1)]
    if hidden:
        configs += [(40, 8, 12, 8, 1.25), (9, 4, 4, 3, 0.5), (1, 4, 8, 1, 1.0), (64, 16, 8, 16, 2.0)]
    cases = []
    for t, d, f, e, cf in configs:
        x = torch.randn(t, d)
        x[: t // 2] += 2 * torch.randn(d)  # a common direction: the router favours a few experts, some overflow
        args = (x, torch.randn(e, d), torch.randn(e, d, f) / d**0.5, torch.randn(e, f, d) / f**0.5, cf)
        cases.append(Case(f"T={t}, d={d}, d_ff={f}, E={e}, capacity_factor={cf}", args, grad_wrt=(0, 1, 2)))
    return cases
