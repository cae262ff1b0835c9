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


def untied(shape: tuple[int, int], scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random ``[T, E]`` logits ``scale * N(0, 1)`` rounded to ``dtype``, re-drawn until no row has two equal
    values (which of two exactly tied experts comes first is a convention, not something to grade)."""
    while True:
        logits = (scale * torch.randn(shape)).to(dtype)
        if all(len(set(row)) == shape[1] for row in logits.float().tolist()):
            return logits


def router_probs(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Reference for 02.1: softmax over experts of ``x @ W^T``, computed in float32."""
    return F.linear(x.float(), router_weight.float()).softmax(dim=-1)


@exercise("02.1", function="router_probs", title="Router probabilities in float32", points=1, reference=router_probs,
          hint="a linear map gives one logit per expert and a softmax over the experts turns them into "
               "probabilities; the whole computation runs in float32, whatever the input dtype",
          hints=("router_weight is stored like nn.Linear's weight, [E, d]: the logits are x times its transpose, "
                 "[T, E]; the softmax runs over the last (expert) dimension",
                 "cast first, then multiply: logits = x.float() @ router_weight.float().T; "
                 "return torch.softmax(logits, dim=-1)"),
          mistakes={"computing in the input's dtype (cast x and the weight to float32 before the matmul)":
                    lambda x, router_weight: F.linear(x, router_weight).softmax(dim=-1),
                    "a softmax over the tokens (dim=0) instead of over the experts":
                    lambda x, router_weight: F.linear(x.float(), router_weight.float()).softmax(dim=0)})
def _router_cases(hidden: bool) -> list[Case]:
    shapes = [(5, 8, 4), (1, 4, 2)] + ([(64, 32, 16), (7, 3, 1)] if hidden else [])
    cases = [Case(f"T={t}, d={d}, E={e}", (torch.randn(t, d), torch.randn(e, d)), grad_wrt=(0, 1)) for t, d, e in shapes]
    big = [(torch.randn(6, 16) * 8).bfloat16(), torch.randn(4, 16).bfloat16()]
    cases.append(Case("bfloat16 inputs (the router must still compute in float32)", tuple(big)))
    if hidden:
        cases.append(Case("large logits (softmax must not overflow)", (torch.randn(5, 4) * 100, torch.randn(3, 4) * 10)))
    return cases


def topk_gating(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 02.2: softmax over all experts, keep the top k (chosen by the logits), optionally
    renormalise."""
    _, gates, experts = softmax_topk(logits, k, renormalize=renormalize)
    return gates, experts


def _ignores_renormalize(renormalize: bool):
    def gating(logits, k, renormalize_):
        return topk_gating(logits, k, renormalize)
    return gating


def _by_probabilities(logits, k, renormalize):
    probs = logits.float().softmax(dim=-1)
    gates, experts = probs.topk(k, dim=-1)
    return (gates / gates.sum(dim=-1, keepdim=True) if renormalize else gates), experts


def _low_precision(logits, k, renormalize):
    probs = logits.softmax(dim=-1)
    gates, experts = probs.topk(k, dim=-1)
    return (gates / gates.sum(dim=-1, keepdim=True) if renormalize else gates), experts


@exercise("02.2", function="topk_gating", title="Top-k gating with optional renormalisation", points=2,
          reference=topk_gating,
          hint="the gates are the full-softmax probabilities of the k best experts, best first; only with "
               "renormalize are they rescaled to sum to 1 over those k",
          hints=("choose the experts by their logits: the softmax keeps their order, but a probability more than "
                 "~100 below the best logit underflows to exactly 0 and ties with the others, and then its order "
                 "is lost; read the gates off the float32 probabilities at the chosen experts",
                 "top-k of the logits gives the experts (torch.topk returns them best first); gather the "
                 "probabilities there; divide by their sum over the k only if renormalize",
                 "probs = torch.softmax(logits.float(), dim=-1); experts = logits.float().topk(k, dim=-1).indices; "
                 "gates = probs.gather(-1, experts); if renormalize: gates = gates / gates.sum(-1, keepdim=True)"),
          mistakes={"renormalising although renormalize=False (a softmax over the k kept logits does the same); "
                    "without renormalising the gates are the full-softmax probabilities": _ignores_renormalize(True),
                    "not renormalising although renormalize=True": _ignores_renormalize(False),
                    "choosing the experts by their probabilities: where they underflow to 0 their order is lost "
                    "(choose by the logits)": _by_probabilities,
                    "computing the softmax in the logits' dtype (bfloat16 gates; compute in float32)": _low_precision})
def _topk_cases(hidden: bool) -> list[Case]:
    configs = [(6, 4, 2, True), (6, 4, 2, False), (3, 8, 1, False)]
    if hidden:
        configs += [(32, 64, 6, False), (10, 8, 8, True), (1, 2, 1, True), (50, 16, random.randint(1, 16), True)]
    cases = [Case(f"T={t}, E={e}, k={k}, renormalize={r}", (torch.randn(t, e), k, r), grad_wrt=(0,))
             for t, e, k, r in configs]
    cases.append(Case("bfloat16 logits, k=2, renormalize=True (gates in float32)",
                      (untied((5, 6), 3.0, torch.bfloat16), 2, True)))
    spread = torch.randperm(8).float().repeat(4, 1) * -60 + torch.rand(4, 8)  # logits 0, -60, ..., -420 (shuffled)
    spread = spread[:, torch.randperm(8)]
    cases.append(Case("logits hundreds apart, k=6 (far-behind probabilities underflow to 0)", (spread, 6, False)))
    return cases


@exercise("02.3", function="tokens_per_expert", title="Tokens per expert", points=1, reference=tokens_per_expert,
          hint="the load of an expert is how many token-slots chose it, over all k choices of every token; an "
               "expert nobody chose has load 0",
          hints=("flatten the [T, k] choices into one list of expert ids and count each id from 0 to E - 1",
                 "torch.bincount(experts.flatten(), minlength=num_experts)"),
          mistakes={"counting only the first choice of each token (count all k columns)":
                    lambda experts, num_experts: torch.bincount(experts[:, 0], minlength=num_experts),
                    "leaving out the experts nobody chose at the end (bincount needs minlength)":
                    lambda experts, num_experts: torch.bincount(experts.flatten())})
def _count_cases(hidden: bool) -> list[Case]:
    configs = [(10, 2, 4), (5, 1, 8)] + ([(100, 6, 64), (1, 1, 3), (40, 2, 2)] if hidden else [])
    return [Case(f"T={t}, k={k}, E={e}", (torch.rand(t, e).topk(k, dim=-1).indices, e)) for t, k, e in configs]


def group_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 02.4: token ids ordered by expert (stable), and tokens per expert."""
    order, counts = sort_by_expert(experts, num_experts)
    return order // experts.shape[1], counts


def _slot_ids(experts, num_experts):
    order, counts = sort_by_expert(experts, num_experts)
    return order, counts


def _choice_major(experts, num_experts):
    order = torch.argsort(experts.T.flatten(), stable=True)
    return order // experts.shape[1], torch.bincount(experts.flatten(), minlength=num_experts)


@exercise("02.4", function="group_by_expert", title="Expert batching: group tokens by expert", points=2,
          reference=group_by_expert,
          hint="think of the T*k token-slots as one list; reorder it so that each expert's slots are contiguous, "
               "keeping token order inside an expert, and report where each slot came from",
          hints=("slot s of the row-major flattening belongs to token s // k; a stable sort by expert id keeps "
                 "equal ids in their original (token) order",
                 "argsort the flattened expert ids with stable=True, turn the slot ids it returns into token ids, "
                 "and count the slots per expert (the counts tell each expert's batch boundaries)"),
          mistakes={"returning slot ids instead of token ids (slot s belongs to token s // k)": _slot_ids,
                    "flattening the choices column by column (experts.T) while mapping slot s to token s // k":
                    _choice_major})
def _group_cases(hidden: bool) -> list[Case]:
    configs = [(6, 2, 4), (5, 1, 3)] + ([(64, 6, 16), (1, 2, 2), (30, 1, 32)] if hidden else [])
    return [Case(f"T={t}, k={k}, E={e}", (torch.rand(t, e).topk(k, dim=-1).indices, e)) for t, k, e in configs]


def moe_forward(x, router_weight, w1, w3, w2, k):
    """Reference for 02.5: ``MoELayer`` (Mixtral block, reference loop dispatch) with the given weights."""
    num_experts, d_model, d_ff = w1.shape
    layer = MoELayer(d_model, d_ff, num_experts, k, dispatch="loop")
    with_weights(layer, router__weight=router_weight, experts__w1=w1, experts__w3=w3, experts__w2=w2)
    return layer(x)[0]


def _variant(renormalize: bool = True, gated: bool = True, activation=F.silu):
    def forward(x, router_weight, w1, w3, w2, k):
        probs = (x.float() @ router_weight.float().T).softmax(dim=-1)
        gates, experts = probs.topk(k, dim=-1)
        if renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        y = torch.zeros(x.shape)
        for e in range(w1.shape[0]):
            token, slot = torch.where(experts == e)
            out = (activation(x[token] @ w1[e]) * (x[token] @ w3[e])) @ w2[e]
            y = y.index_add(0, token, out * (gates[token, slot, None] if gated else 1))
        return y
    return forward


@exercise("02.5", function="moe_forward", title="A complete MoE forward pass (Mixtral block)", points=3,
          reference=moe_forward, rtol=1e-4, atol=1e-5,
          hint="chain what you wrote: router probabilities, renormalised top-k gates, then each expert runs once "
               "on the tokens that chose it and its outputs, weighted by their gates, are added into those tokens' "
               "rows",
          hints=("loop over experts, not tokens: for expert e find the (token, slot) pairs whose choice is e; "
                 "gather those tokens, apply the SwiGLU expert, scale each row by the gate of its slot",
                 "SwiGLU expert e: (silu(x_e @ w1[e]) * (x_e @ w3[e])) @ w2[e]; accumulate into a float32 [T, d] "
                 "zero tensor with index_add (it returns a new tensor, so autograd can follow); an expert with no "
                 "tokens contributes nothing"),
          mistakes={"not renormalising the top-k gates (Mixtral renormalises them to sum to 1)": _variant(False),
                    "adding the expert outputs without weighting them by their gates": _variant(gated=False),
                    "a GELU expert instead of SwiGLU's silu gate": _variant(activation=F.gelu)})
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
