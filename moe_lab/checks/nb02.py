"""Exercises of 02_softmax_gating_topk: router, top-k gating, expert batching, a full MoE forward."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..dispatch import sort_by_expert
from ..layer import MoELayer
from ..metrics import tokens_per_expert
from ..routing import softmax_topk
from .core import Case, exercise, with_weights


def router_probs(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Reference for 02.1: softmax over experts of ``x @ W^T``, computed in float32."""
    return F.linear(x.float(), router_weight.float()).softmax(dim=-1)


@exercise("02.1", function="router_probs", title="Router probabilities in float32", points=1, reference=router_probs,
          hint="logits = x @ router_weight.T, softmax over the expert dimension, and do the math in float32 "
               "(cast x and the weight with .float() first)")
def _router_cases(hidden: bool) -> list[Case]:
    shapes = [(5, 8, 4), (1, 4, 2)] + ([(64, 32, 16), (7, 3, 1)] if hidden else [])
    cases = [Case(f"T={t}, d={d}, E={e}", (torch.randn(t, d), torch.randn(e, d)), grad_wrt=(0, 1)) for t, d, e in shapes]
    big = [(torch.randn(6, 16) * 8).bfloat16(), torch.randn(4, 16).bfloat16()]
    cases.append(Case("bfloat16 inputs (the router must still compute in float32)", tuple(big)))
    if hidden:
        cases.append(Case("large logits (softmax must not overflow)", (torch.randn(5, 4) * 100, torch.randn(3, 4) * 10)))
    return cases


def topk_gating(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 02.2: softmax over all experts, keep the top k, optionally renormalise."""
    _, gates, experts = softmax_topk(logits, k, renormalize=renormalize)
    return gates, experts


@exercise("02.2", function="topk_gating", title="Top-k gating with optional renormalisation", points=2,
          reference=topk_gating,
          hint="probs = softmax(logits.float()); gates, experts = probs.topk(k); if renormalize divide the gates "
               "by their sum over the k selected experts")
def _topk_cases(hidden: bool) -> list[Case]:
    configs = [(6, 4, 2, True), (6, 4, 2, False), (3, 8, 1, False)]
    if hidden:
        configs += [(32, 64, 6, False), (10, 8, 8, True), (1, 2, 1, True), (50, 16, random.randint(1, 16), True)]
    return [Case(f"T={t}, E={e}, k={k}, renormalize={r}", (torch.randn(t, e), k, r), grad_wrt=(0,))
            for t, e, k, r in configs]


@exercise("02.3", function="tokens_per_expert", title="Tokens per expert", points=1, reference=tokens_per_expert,
          hint="count how often each expert id appears in experts (all k columns); experts nobody picked count 0 "
               "(torch.bincount with minlength)")
def _count_cases(hidden: bool) -> list[Case]:
    configs = [(10, 2, 4), (5, 1, 8)] + ([(100, 6, 64), (1, 1, 3), (40, 2, 2)] if hidden else [])
    return [Case(f"T={t}, k={k}, E={e}", (torch.rand(t, e).topk(k, dim=-1).indices, e)) for t, k, e in configs]


def group_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 02.4: token ids ordered by expert (stable), and tokens per expert."""
    order, counts = sort_by_expert(experts, num_experts)
    return order // experts.shape[1], counts


@exercise("02.4", function="group_by_expert", title="Expert batching: group tokens by expert", points=2,
          reference=group_by_expert,
          hint="flatten experts to [T*k] slots (slot s belongs to token s // k), sort slots by expert with a stable "
               "sort (torch.argsort(..., stable=True)) and count slots per expert")
def _group_cases(hidden: bool) -> list[Case]:
    configs = [(6, 2, 4), (5, 1, 3)] + ([(64, 6, 16), (1, 2, 2), (30, 1, 32)] if hidden else [])
    return [Case(f"T={t}, k={k}, E={e}", (torch.rand(t, e).topk(k, dim=-1).indices, e)) for t, k, e in configs]


def moe_forward(x, router_weight, w1, w3, w2, k):
    """Reference for 02.5: ``MoELayer`` (Mixtral block, reference loop dispatch) with the given weights."""
    num_experts, d_model, d_ff = w1.shape
    layer = MoELayer(d_model, d_ff, num_experts, k, dispatch="loop")
    with_weights(layer, router__weight=router_weight, experts__w1=w1, experts__w3=w3, experts__w2=w2)
    return layer(x)[0]


@exercise("02.5", function="moe_forward", title="A complete MoE forward pass (Mixtral block)", points=3,
          reference=moe_forward, hint="router_probs -> topk_gating(renormalize=True) -> for each expert: "
          "w2(silu(x w1) * x w3) on its tokens, weighted by the gate, summed into the output", rtol=1e-4, atol=1e-5)
def _forward_cases(hidden: bool) -> list[Case]:
    configs = [(10, 8, 16, 4, 2), (3, 4, 8, 2, 1)]
    if hidden:
        configs += [(33, 16, 24, 8, 2), (1, 8, 8, 4, 4), (40, 8, 12, 16, 6)]
    cases = []
    for t, d, f, e, k in configs:
        args = (torch.randn(t, d), torch.randn(e, d), torch.randn(e, d, f) / d**0.5, torch.randn(e, d, f) / d**0.5,
                torch.randn(e, f, d) / f**0.5, k)
        cases.append(Case(f"T={t}, d={d}, d_ff={f}, E={e}, k={k}", args, grad_wrt=(0, 1, 2)))
    return cases
