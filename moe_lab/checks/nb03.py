"""Exercises of 03_noisy_topk: noisy logits, noisy top-k gating, Switch jitter."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..routing import dense_gates, softmax_topk
from .core import Case, exercise


def noisy_logits(clean: torch.Tensor, raw_noise: torch.Tensor, standard_normal: torch.Tensor) -> torch.Tensor:
    """Reference for 03.1: ``H = clean + standard_normal * softplus(raw_noise)`` (Shazeer et al. 2017, eq. 4)."""
    return clean.float() + standard_normal.float() * F.softplus(raw_noise.float())


@exercise("03.1", function="noisy_logits", title="Noisy logits H(x)", points=1, reference=noisy_logits,
          hint="H = clean + standard_normal * softplus(raw_noise), in float32; softplus(z) = log(1 + exp(z)) "
               "(use torch.nn.functional.softplus: it does not overflow for large z)")
def _noisy_cases(hidden: bool) -> list[Case]:
    shapes = [(5, 4), (1, 8)] + ([(64, 16), (3, 1)] if hidden else [])
    cases = [Case(f"T={t}, E={e}", (torch.randn(t, e), torch.randn(t, e), torch.randn(t, e)), grad_wrt=(0, 1))
             for t, e in shapes]
    if hidden:
        cases.append(Case("large raw noise (softplus must not overflow)", (torch.randn(4, 3), torch.randn(4, 3) * 200,
                                                                          torch.randn(4, 3))))
    return cases


def noisy_topk_gating(h: torch.Tensor, k: int) -> torch.Tensor:
    """Reference for 03.2: ``G = Softmax(KeepTopK(H, k))`` as a dense ``[T, E]`` matrix."""
    _, gates, experts = softmax_topk(h, k)
    return dense_gates(gates, experts, h.shape[-1])


@exercise("03.2", function="noisy_topk_gating", title="G(x) = Softmax(KeepTopK(H(x), k))", points=2,
          reference=noisy_topk_gating,
          hint="KeepTopK sets every logit outside the top k to -inf; the softmax of that is zero there. Return the "
               "dense [T, E] matrix in float32 (torch.topk, then scatter or masked_fill)")
def _gating_cases(hidden: bool) -> list[Case]:
    configs = [(6, 4, 2), (5, 8, 1), (3, 3, 3)]
    if hidden:
        configs += [(40, 16, 4), (1, 2, 1), (20, 64, random.randint(1, 8))]
    return [Case(f"T={t}, E={e}, k={k}", (torch.randn(t, e) * 2, k), grad_wrt=(0,)) for t, e, k in configs]


def switch_jitter(x: torch.Tensor, uniform: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference for 03.3: ``x * U(1 - eps, 1 + eps)`` given ``uniform ~ U(0, 1)`` of the same shape."""
    return x * (1 - eps + 2 * eps * uniform)


@exercise("03.3", function="switch_jitter", title="Switch multiplicative jitter", points=1, reference=switch_jitter,
          hint="map uniform from [0, 1) to [1 - eps, 1 + eps) (an affine map) and multiply x by it elementwise")
def _jitter_cases(hidden: bool) -> list[Case]:
    configs = [((4, 3), 0.01), ((2, 5), 0.5)] + ([((16, 8), 0.1), ((1, 1), 0.0)] if hidden else [])
    return [Case(f"x {shape}, eps={eps}", (torch.randn(shape), torch.rand(shape), eps), grad_wrt=(0,))
            for shape, eps in configs]
