"""Exercises of 01_why_moe: parameter and FLOP counts, the mixture formula, and conditional computation."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..calculator import ffn_params, moe_flops_per_token, moe_params
from .core import Case, exercise

SIZES = [(16, 64), (4096, 14336), (7168, 2048), (512, 1408)]


def _sizes(hidden: bool) -> list[tuple[int, int]]:
    if not hidden:
        return SIZES[:2]
    return SIZES[2:] + [(random.randint(8, 4096), random.randint(8, 8192)) for _ in range(3)]


@exercise("01.1", function="ffn_params", title="Parameters of a dense FFN", points=1, reference=ffn_params,
          hint="count the weight matrices of each kind of FFN and the size of each",
          hints=("every matrix maps between d_model and d_ff, so each holds d_model * d_ff weights; GELU has an "
                 "input and an output matrix, SwiGLU adds a third (the gate) for silu(x W1) * (x W3)",
                 "return (3 if activation == 'swiglu' else 2) * d_model * d_ff"),
          mistakes={"counting two matrices for SwiGLU (it has three: gate, up and down)":
                    lambda d_model, d_ff, activation: 2 * d_model * d_ff,
                    "counting three matrices for GELU (it has two: in and out)":
                    lambda d_model, d_ff, activation: 3 * d_model * d_ff})
def _ffn_params_cases(hidden: bool) -> list[Case]:
    return [Case(f"d_model={d}, d_ff={f}, {act}", (d, f, act)) for d, f in _sizes(hidden) for act in ("gelu", "swiglu")]


def moe_layer_costs(d_model: int, d_ff: int, num_experts: int, k: int, activation: str) -> tuple[int, int, int]:
    """Reference for 01.2: ``(total, active, forward FLOPs)`` per token of an MoE FFN layer."""
    total, active = moe_params(d_model, d_ff, num_experts, k, activation)
    return total, active, moe_flops_per_token(d_model, d_ff, num_experts, k, activation)


def _no_router(d_model, d_ff, num_experts, k, activation):
    expert = ffn_params(d_model, d_ff, activation)
    return num_experts * expert, k * expert, 2 * k * expert


def _macs(d_model, d_ff, num_experts, k, activation):
    total, active = moe_params(d_model, d_ff, num_experts, k, activation)
    return total, active, active


def _all_experts_flops(d_model, d_ff, num_experts, k, activation):
    total, active = moe_params(d_model, d_ff, num_experts, k, activation)
    return total, active, 2 * total


def _moe_cases(hidden: bool) -> list[Case]:
    configs = [(4096, 14336, 8, 2, "swiglu"), (16, 64, 4, 1, "gelu")]
    if hidden:
        configs += [(2048, 1408, 64, 6, "swiglu"), (7168, 2048, 256, 8, "swiglu"), (768, 3072, 128, 1, "gelu")]
        configs += [(random.randint(8, 1024), random.randint(8, 4096), e, random.randint(1, e), "gelu")
                    for e in (random.randint(2, 64) for _ in range(2))]
    return [Case(f"d_model={d}, d_ff={f}, E={e}, k={k}, {a}", (d, f, e, k, a)) for d, f, e, k, a in configs]


exercise("01.2", function="moe_layer_costs", title="What an MoE layer stores, and what a token costs", points=2,
         reference=moe_layer_costs,
         hint="the layer stores every expert and the router; a token passes through the router and only its k "
              "experts, and each weight it uses costs one multiply-add",
         hints=("total = E expert FFNs + the router's d_model x E matrix; active = k expert FFNs + the router",
                "a multiply-add is 2 FLOPs, so forward FLOPs per token = 2 x active parameters",
                "expert = ffn_params(d_model, d_ff, activation); router = d_model * num_experts; "
                "return E * expert + router, k * expert + router, 2 * (k * expert + router)"),
         mistakes={"forgetting the router (d_model x E weights, used by every token)": _no_router,
                   "counting multiply-adds instead of FLOPs (the lecture outline's 2 d d_ff: a multiply-add is "
                   "2 FLOPs)": _macs,
                   "charging the token for all E experts (it only runs its k)": _all_experts_flops})(_moe_cases)


def mixture_output(expert_outputs: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Reference for 01.3: ``y_t = sum_i gates[t, i] * expert_outputs[i, t]``."""
    return torch.einsum("te,etd->td", gates, expert_outputs)


def _random_gates(t: int, e: int, k: int) -> torch.Tensor:
    """``[T, E]`` gates: each token's top-``k`` of random scores, softmaxed; zeros elsewhere."""
    gates = torch.zeros(t, e)
    top = torch.rand(t, e).topk(min(k, e), dim=-1)
    return gates.scatter(1, top.indices, top.values.softmax(-1))


@exercise("01.3", function="mixture_output", title="y = sum_i G(x)_i E_i(x)", points=2, reference=mixture_output,
          hint="each token's output is a weighted sum over experts of that expert's output for the token, weighted "
               "by the token's gate for the expert",
          hints=("line the shapes up: expert_outputs is [E, T, d] and gates is [T, E]; move the expert axis of the "
                 "gates next to it, multiply elementwise (broadcasting over d) and sum over experts",
                 "(gates.T.unsqueeze(-1) * expert_outputs).sum(dim=0), or torch.einsum('te,etd->td', gates, "
                 "expert_outputs)"),
          mistakes={"an unweighted sum of the expert outputs (the gates are missing)":
                    lambda expert_outputs, gates: expert_outputs.sum(dim=0) + 0 * gates.sum()})
def _mixture_cases(hidden: bool) -> list[Case]:
    shapes = [(4, 3, 5), (1, 2, 3)] + ([(8, 17, 16), (3, 1, 2), (16, 64, 8)] if hidden else [])
    return [Case(f"E={e}, T={t}, d={d}", (torch.randn(e, t, d), _random_gates(t, e, 2)), grad_wrt=(0, 1))
            for e, t, d in shapes]


def sparse_moe_forward(x: torch.Tensor, gates: torch.Tensor, w_in: torch.Tensor,
                       w_out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference for 01.4 (a slow, obvious loop): ``y_t = sum over i with gates[t, i] != 0 of
    gates[t, i] * gelu(x_t @ w_in[i]) @ w_out[i]``, and the matmul FLOPs of the expert evaluations done
    (``2 * 2 * d * d_ff`` each)."""
    num_tokens, d = x.shape
    num_experts, _, d_ff = w_in.shape
    rows, flops = [], 0
    for t in range(num_tokens):
        y_t = torch.zeros(d)
        for i in range(num_experts):
            if gates[t, i] != 0:
                y_t = y_t + gates[t, i] * (F.gelu(x[t] @ w_in[i]) @ w_out[i])
                flops += 4 * d * d_ff
        rows.append(y_t)
    return torch.stack(rows), flops


def _dense_then_mask(x, gates, w_in, w_out):
    out = torch.einsum("ecf,efd->ecd", F.gelu(torch.einsum("td,edf->etf", x, w_in)), w_out)  # every expert, every token
    return torch.einsum("te,etd->td", gates, out), 4 * x.shape[0] * w_in.shape[0] * w_in.shape[1] * w_in.shape[2]


def _counted_macs(x, gates, w_in, w_out):
    y, flops = sparse_moe_forward(x, gates, w_in, w_out)
    return y, flops // 2


def _counted_tokens(x, gates, w_in, w_out):
    y, _ = sparse_moe_forward(x, gates, w_in, w_out)
    return y, int((gates != 0).any(dim=1).sum()) * 4 * w_in.shape[1] * w_in.shape[2]


@exercise("01.4", function="sparse_moe_forward", title="Conditional computation: run only the chosen experts",
          points=4, reference=sparse_moe_forward, rtol=1e-4, atol=1e-5,
          hint="the formula is the same as 01.3, but an expert must only ever see the tokens that gave it a "
               "non-zero gate: group the work by expert, not by token",
          hints=("for each expert, find the tokens with a non-zero gate for it; if there are none, skip the expert; "
                 "otherwise run the expert once on that batch of tokens",
                 "add each expert's gated outputs back into the rows of its tokens without in-place writes into a "
                 "tensor autograd needs (index_add returns a new tensor); a token with no expert keeps a zero row",
                 "count FLOPs as you go: every (token, expert) pair you compute costs two matmuls of d x d_ff, "
                 "2 FLOPs per multiply-add each, so 4 * d * d_ff per pair; return it as a Python int"),
          mistakes={"running every expert on every token and masking afterwards (the output is right, but the "
                    "FLOPs are those of a dense layer E times wider)": _dense_then_mask,
                    "counting multiply-adds instead of FLOPs (2 FLOPs per multiply-add)": _counted_macs,
                    "counting one expert per token (a token may use several experts, or none)": _counted_tokens})
def _sparse_cases(hidden: bool) -> list[Case]:
    configs = [(6, 4, 8, 4, 2), (5, 3, 4, 6, 1)]
    if hidden:
        configs += [(24, 8, 16, 8, 3), (1, 2, 3, 1, 1), (12, 4, 4, 3, 3), (random.randint(2, 32), 8, 8, 5, 2)]
    cases = []
    for t, d, f, e, k in configs:
        gates = _random_gates(t, e, k)
        if t > 2:
            gates[t // 2] = 0  # a token that goes to no expert
        if e > k:
            gates[:, e - 1] = 0  # an expert no token chose
        if int((gates[0] != 0).sum()) > 1:
            gates[0, gates[0].nonzero()[0]] = 0  # the first token uses one expert fewer than the others
        args = (torch.randn(t, d), gates, torch.randn(e, d, f) / d**0.5, torch.randn(e, f, d) / f**0.5)
        cases.append(Case(f"T={t}, d={d}, d_ff={f}, E={e}, up to {k} experts per token", args, grad_wrt=(0, 2, 3)))
    return cases
