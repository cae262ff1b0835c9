"""Exercises of 01_why_moe: parameter and FLOP counts, and the mixture formula."""
from __future__ import annotations

import random

import torch

from ..calculator import ffn_params, moe_flops_per_token, moe_params
from .core import Case, exercise

SIZES = [(16, 64), (4096, 14336), (7168, 2048), (512, 1408)]


def _sizes(hidden: bool) -> list[tuple[int, int]]:
    if not hidden:
        return SIZES[:2]
    return SIZES[2:] + [(random.randint(8, 4096), random.randint(8, 8192)) for _ in range(3)]


@exercise("01.1", function="ffn_params", title="Parameters of a dense FFN", points=1, reference=ffn_params,
          hint="count the weight matrices: GELU has W_in [d, d_ff] and W_out [d_ff, d]; SwiGLU adds a gate matrix")
def _ffn_params_cases(hidden: bool) -> list[Case]:
    return [Case(f"d_model={d}, d_ff={f}, {act}", (d, f, act)) for d, f in _sizes(hidden) for act in ("gelu", "swiglu")]


def _moe_cases(hidden: bool) -> list[Case]:
    configs = [(4096, 14336, 8, 2, "swiglu"), (16, 64, 4, 1, "gelu")]
    if hidden:
        configs += [(2048, 1408, 64, 6, "swiglu"), (7168, 2048, 256, 8, "swiglu"), (768, 3072, 128, 1, "gelu")]
        configs += [(random.randint(8, 1024), random.randint(8, 4096), e, random.randint(1, e), "gelu")
                    for e in (random.randint(2, 64) for _ in range(2))]
    return [Case(f"d_model={d}, d_ff={f}, E={e}, k={k}, {a}", (d, f, e, k, a)) for d, f, e, k, a in configs]


exercise("01.2", function="moe_params", title="Total and active parameters of an MoE layer", points=2,
         reference=moe_params,
         hint="total = E experts + the router (d_model x E); active = k experts + the router")(_moe_cases)
exercise("01.3", function="moe_flops_per_token", title="Forward FLOPs per token of an MoE layer", points=1,
         reference=moe_flops_per_token,
         hint="one multiply-add = 2 FLOPs, and a token only touches the router and its k experts")(_moe_cases)


def mixture_output(expert_outputs: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Reference for 01.4: ``y_t = sum_i gates[t, i] * expert_outputs[i, t]``."""
    return torch.einsum("te,etd->td", gates, expert_outputs)


@exercise("01.4", function="mixture_output", title="y = sum_i G(x)_i E_i(x)", points=2, reference=mixture_output,
          hint="expert_outputs is [E, T, d] and gates is [T, E]: weight each expert's output by its gate and sum over experts")
def _mixture_cases(hidden: bool) -> list[Case]:
    shapes = [(4, 3, 5), (1, 2, 3)] + ([(8, 17, 16), (3, 1, 2), (16, 64, 8)] if hidden else [])
    cases = []
    for e, t, d in shapes:
        gates = torch.zeros(t, e)
        top = torch.rand(t, e).topk(min(2, e), dim=-1)
        gates.scatter_(1, top.indices, top.values.softmax(-1))
        cases.append(Case(f"E={e}, T={t}, d={d}", (torch.randn(e, t, d), gates), grad_wrt=(0, 1)))
    return cases
