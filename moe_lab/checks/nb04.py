"""Exercises of 04_load_balancing: CV^2, importance loss, Switch aux loss, z-loss, a balancing experiment."""
from __future__ import annotations

import random

import torch

from ..balancing import BalanceConfig, train_router
from ..losses import cv_squared, importance_loss, router_z_loss, switch_aux_loss
from ..routing import dense_gates, softmax_topk
from .core import Case, exercise


@exercise("04.1", function="cv_squared", title="Squared coefficient of variation", points=1, reference=cv_squared,
          hint="CV^2 = variance / mean^2 with the population variance (mean of squared deviations, "
               "x.var(unbiased=False)); add eps=1e-10 to the denominator; a single value has CV^2 = 0")
def _cv_cases(hidden: bool) -> list[Case]:
    sizes = [8, 3] + ([64, 2] if hidden else [])
    cases = [Case(f"{n} positive values", (torch.rand(n) * 10 + 0.1,), grad_wrt=(0,)) for n in sizes]
    cases.append(Case("all equal", (torch.full((5,), 7.0),)))
    if hidden:
        cases += [Case("one value", (torch.tensor([3.0]),)), Case("all zero", (torch.zeros(4),))]
    return cases


def _routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return softmax_topk(torch.randn(t, e) * 2, k)


def importance_loss_from_gates(gates: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Reference for 04.2: ``CV(sum_t G(x_t))^2`` from the top-k ``gates`` and ``experts``."""
    return importance_loss(dense_gates(gates, experts, num_experts))


@exercise("04.2", function="importance_loss_from_gates", title="Shazeer importance loss", points=2,
          reference=importance_loss_from_gates,
          hint="importance_i = the sum over tokens of the gate each token gives expert i (0 if not selected): "
               "scatter the [T, k] gates into [T, E], sum over tokens, then cv_squared")
def _importance_cases(hidden: bool) -> list[Case]:
    configs = [(10, 4, 2), (6, 3, 1)] + ([(64, 16, 4), (2, 8, 1), (30, 5, 5)] if hidden else [])
    cases = []
    for t, e, k in configs:
        _, gates, experts = _routing(t, e, k)
        cases.append(Case(f"T={t}, E={e}, k={k}", (gates, experts, e), grad_wrt=(0,)))
    return cases


@exercise("04.3", function="switch_aux_loss", title="Switch aux loss N * sum_i f_i P_i", points=2,
          reference=switch_aux_loss,
          hint="f_i = (token-slots sent to i) / (T * k) counted from experts (no gradient); P_i = mean over tokens "
               "of probs[:, i] (the full softmax, with gradient); return N * sum(f * P) without alpha")
def _aux_cases(hidden: bool) -> list[Case]:
    configs = [(10, 4, 1), (12, 4, 2)] + ([(100, 8, 2), (3, 16, 1), (50, 6, random.randint(1, 6))] if hidden else [])
    cases = []
    for t, e, k in configs:
        probs, _, experts = _routing(t, e, k)
        cases.append(Case(f"T={t}, E={e}, k={k}", (probs, experts), grad_wrt=(0,)))
    uniform = torch.full((8, 4), 0.25)
    cases.append(Case("perfectly uniform routing (loss 1)", (uniform, torch.arange(8).remainder(4).unsqueeze(1))))
    return cases


@exercise("04.4", function="router_z_loss", title="ST-MoE router z-loss", points=1, reference=router_z_loss,
          hint="z-loss = mean over tokens of logsumexp(logits_t)^2 in float32 (torch.logsumexp is stable: "
               "log(sum(exp)) overflows for large logits)")
def _z_cases(hidden: bool) -> list[Case]:
    shapes = [(5, 4), (1, 8)] + ([(64, 32), (3, 1)] if hidden else [])
    cases = [Case(f"T={t}, E={e}", (torch.randn(t, e) * 3,), grad_wrt=(0,)) for t, e in shapes]
    cases.append(Case("bfloat16 logits (compute in float32)", ((torch.randn(4, 6) * 4).bfloat16(),)))
    if hidden:
        cases.append(Case("large logits (no overflow)", (torch.randn(3, 5) * 100,)))
    return cases


def balancing_experiment(alpha: float, seed: int, steps: int = 100) -> bool:
    """Reference for 04.5: does routing collapse (held-out max/mean load > 2) after ``steps`` steps with
    Switch aux-loss coefficient ``alpha``?"""
    return train_router(BalanceConfig(alpha=alpha, seed=seed), steps)["max_over_mean"] > 2.0


@exercise("04.5", function="balancing_experiment", title="Run the collapse experiment", points=2,
          reference=balancing_experiment,
          allow=("moe_lab.balancing", "moe_lab.layer.MoELayer.forward", "moe_lab.permute._GatherSlots.backward",
                 "moe_lab.permute._SumSlots.backward", "moe_lab.experts._contiguous_grad"),
          hint="one training step: out, info = layer(x); loss = mean squared error + alpha * info.aux_loss; "
               "optimizer.zero_grad(); loss.backward(); optimizer.step()")
def _experiment_cases(hidden: bool) -> list[Case]:
    configs = [(0.0, 0), (0.1, 0)] + ([(1e-3, 1), (0.1, 1), (1.0, 0)] if hidden else [])
    return [Case(f"alpha={alpha}, seed={seed}", (alpha, seed)) for alpha, seed in configs]
