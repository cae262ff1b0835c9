"""Exercises of 03_noisy_topk: the noisy top-k gate, its gradient by hand, Switch jitter."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..routing import dense_gates, softmax_topk
from .core import Case, exercise


def noisy_topk_gating(clean: torch.Tensor, raw_noise: torch.Tensor, standard_normal: torch.Tensor, k: int,
                      training: bool) -> torch.Tensor:
    """Reference for 03.1: ``G = Softmax(KeepTopK(H, k))`` as a dense ``[T, E]`` matrix, with
    ``H = clean + standard_normal * softplus(raw_noise)`` in training and ``H = clean`` in evaluation."""
    h = clean.float() + standard_normal.float() * F.softplus(raw_noise.float()) if training else clean.float()
    _, gates, experts = softmax_topk(h, k)
    return dense_gates(gates, experts, h.shape[-1])


def _gate(h: torch.Tensor, k: int, renormalize: bool = True, select: torch.Tensor | None = None) -> torch.Tensor:
    probs = h.softmax(dim=-1)
    experts = (h if select is None else select).topk(k, dim=-1).indices
    gates = probs.gather(1, experts)
    return dense_gates(gates / gates.sum(-1, keepdim=True) if renormalize else gates, experts, h.shape[-1])


def _noisy_variant(*, renormalize=True, noise_at_eval=False, softplus=F.softplus, select_clean=False):
    def gating(clean, raw_noise, standard_normal, k, training):
        clean = clean.float()
        h = clean + standard_normal.float() * softplus(raw_noise.float()) if training or noise_at_eval else clean
        return _gate(h, k, renormalize, select=clean if select_clean else None)
    return gating


@exercise("03.1", function="noisy_topk_gating", title="The noisy top-k gate G(x)", points=2,
          reference=noisy_topk_gating,
          hint="in training each logit gets its own Gaussian noise, scaled by a learned positive amount; the k "
               "largest noisy logits survive and the softmax runs over those k alone; in evaluation there is no noise",
          hints=("the noise scale is softplus(raw_noise) (always positive); H = clean + standard_normal * that "
                 "scale, in float32; with training=False, H is just the clean logits",
                 "KeepTopK sets every logit outside the k largest of H to -inf, so after the softmax those gates "
                 "are exactly 0 and the kept ones sum to 1; return the dense [T, E] matrix",
                 "softplus(z) = log(1 + exp(z)) overflows for large z written that way: "
                 "torch.nn.functional.softplus is stable; torch.topk gives the kept indices and values"),
          mistakes={"a softmax over all experts, then top-k (the kept gates do not sum to 1; the paper takes the "
                    "softmax over the kept logits)": _noisy_variant(renormalize=False),
                    "adding noise at evaluation (training=False must route on the clean logits)":
                    _noisy_variant(noise_at_eval=True),
                    "scaling the noise by raw_noise itself (the scale is softplus(raw_noise) > 0)":
                    _noisy_variant(softplus=lambda z: z),
                    "softplus written as log(1 + exp(z)), which overflows for large z":
                    _noisy_variant(softplus=lambda z: torch.log(1 + torch.exp(z))),
                    "keeping the top k of the clean logits (keep those of the noisy H)":
                    _noisy_variant(select_clean=True)})
def _gating_cases(hidden: bool) -> list[Case]:
    configs = [(6, 4, 2, True), (5, 8, 1, True), (4, 5, 2, False)]
    if hidden:
        configs += [(40, 16, 4, True), (1, 2, 1, True), (20, 64, random.randint(1, 8), True), (6, 3, 3, True),
                    (12, 8, 3, False)]
    cases = []
    for t, e, k, training in configs:
        args = (torch.randn(t, e) * 2, torch.randn(t, e), torch.randn(t, e), k, training)
        cases.append(Case(f"T={t}, E={e}, k={k}, training={training}", args, grad_wrt=(0, 1) if training else (0,)))
    args = (torch.randn(4, 3), torch.randn(4, 3) * 200, torch.randn(4, 3), 2, True)
    cases.append(Case("large raw noise (softplus must not overflow)", args, grad_wrt=(0, 1)))
    return cases


def noisy_gating_backward(x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor,
                          standard_normal: torch.Tensor, k: int, grad_gates: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 03.2: autograd's ``dL/dW_g`` and ``dL/dW_noise`` for ``L = sum(G * grad_gates)``, with
    ``G`` the training-mode noisy top-k gate of ``clean = x W_g^T``, ``raw_noise = x W_noise^T``."""
    w_gate, w_noise = w_gate.detach().float().requires_grad_(), w_noise.detach().float().requires_grad_()
    with torch.enable_grad():
        gates = noisy_topk_gating(x.float() @ w_gate.T, x.float() @ w_noise.T, standard_normal, k, True)
        return torch.autograd.grad((gates * grad_gates.float()).sum(), (w_gate, w_noise))


def _manual_backward(*, diagonal_only=False, sigmoid=True, noise_path=True):
    def backward(x, w_gate, w_noise, standard_normal, k, grad_gates):
        raw = x @ w_noise.T
        gates = noisy_topk_gating(x @ w_gate.T, raw, standard_normal, k, True)
        dot = 0 if diagonal_only else (gates * grad_gates).sum(-1, keepdim=True)
        dh = gates * (grad_gates - dot)
        draw = dh * standard_normal * (torch.sigmoid(raw) if sigmoid else 1) * (1 if noise_path else 0)
        return dh.T @ x, draw.T @ x
    return backward


@exercise("03.2", function="noisy_gating_backward", title="How the noise learns: the gate's gradient by hand",
          points=4, reference=noisy_gating_backward, rtol=1e-4, atol=1e-5,
          hint="work backwards through the chain W -> logits -> H -> KeepTopK -> softmax -> G: the selection itself "
               "has no gradient, so the gradient reaches only the kept experts of each token, and it reaches "
               "W_noise through the noise scale softplus(x W_noise)",
          hints=("start at the softmax over each token's kept set S: for i in S, dL/dH_i = G_i * (u_i - sum_{j in S} "
                 "G_j u_j) with u = grad_gates; for i outside S it is 0 (G is 0 there, so the same formula gives 0)",
                 "H = clean + eps * softplus(raw) gives dL/dclean = dL/dH and dL/draw = dL/dH * eps * "
                 "softplus'(raw), where softplus'(z) = sigmoid(z)",
                 "clean = x @ W_g^T, so dL/dW_g = (dL/dclean)^T @ x, an [E, d] sum over tokens; the same for W_noise "
                 "with dL/draw"),
          mistakes={"only the diagonal of the softmax Jacobian (the - G_i * sum_j G_j u_j term is missing)":
                    _manual_backward(diagonal_only=True),
                    "dropping softplus' derivative sigmoid(x W_noise) on the noise path":
                    _manual_backward(sigmoid=False),
                    "no gradient for W_noise (the noise scale is learned: it has one)":
                    _manual_backward(noise_path=False)})
def _backward_cases(hidden: bool) -> list[Case]:
    configs = [(8, 6, 4, 2), (5, 4, 3, 1)]
    if hidden:
        configs += [(32, 8, 16, 4), (4, 3, 2, 2), (16, 5, 8, 3), (random.randint(1, 20), 4, 6, random.randint(1, 6))]
    cases = []
    for t, d, e, k in configs:
        args = (torch.randn(t, d), torch.randn(e, d) * 0.5, torch.randn(e, d) * 0.5, torch.randn(t, e), k,
                torch.randn(t, e))
        cases.append(Case(f"T={t}, d={d}, E={e}, k={k}", args))
    return cases


def switch_jitter(x: torch.Tensor, uniform: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference for 03.3: ``x * U(1 - eps, 1 + eps)`` given ``uniform ~ U(0, 1)`` of the same shape."""
    return x * (1 - eps + 2 * eps * uniform)


@exercise("03.3", function="switch_jitter", title="Switch multiplicative jitter", points=1, reference=switch_jitter,
          hint="the jitter multiplies each input entry by a random factor spread evenly around 1, from 1 - eps to "
               "1 + eps",
          hints=("turn uniform in [0, 1) into a factor in [1 - eps, 1 + eps) with an affine map (stretch by 2 eps, "
                 "shift by 1 - eps), then multiply x by it elementwise",
                 "return x * (1 - eps + 2 * eps * uniform)"),
          mistakes={"a factor in [1, 1 + eps) instead of [1 - eps, 1 + eps)":
                    lambda x, uniform, eps: x * (1 + eps * uniform),
                    "additive noise (Switch multiplies the input)":
                    lambda x, uniform, eps: x + eps * (2 * uniform - 1)})
def _jitter_cases(hidden: bool) -> list[Case]:
    configs = [((4, 3), 0.01), ((2, 5), 0.5)] + ([((16, 8), 0.1), ((1, 1), 0.0)] if hidden else [])
    return [Case(f"x {shape}, eps={eps}", (torch.randn(shape), torch.rand(shape), eps), grad_wrt=(0,))
            for shape, eps in configs]
