"""Exercises of 10_stability: float spacing, the z-loss gradient by hand, a float32 router under autocast,
routing flips, a NaN guard's check, and the z-loss coefficient schedule."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..hooks import Decay, first_nonfinite
from ..losses import router_z_loss
from ..routing import Router
from ..stability import FLOAT_FORMATS, spacing, topk_flips
from .core import Case, exercise

# ------------------------------------------------------------------------------------------------ 10.1 spacing


def _spacing_half(value: float, dtype: torch.dtype) -> float:
    return spacing(value, dtype) / 2


def _spacing_relative(value: float, dtype: torch.dtype) -> float:
    return abs(value) * torch.finfo(dtype).eps


def _spacing_no_subnormals(value: float, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return spacing(max(abs(value), info.smallest_normal), dtype) if value else 0.0


@exercise("10.1", function="spacing", title="Spacing of a float format at a value", points=2, reference=spacing,
          hint="within one binade [2^e, 2^(e+1)) the numbers of a format are equally spaced, 2^e * eps apart; "
               "below the smallest normal number the (subnormal) spacing stays that of the first binade",
          hints=("e is the exponent of |value|: math.frexp(|value|) returns (m, e') with |value| = m * 2^e' and "
                 "0.5 <= m < 1, so e = e' - 1",
                 "torch.finfo(dtype) gives eps (the spacing at 1) and smallest_normal; for |value| < smallest_normal "
                 "(0 included) return smallest_normal * eps"),
          mistakes={"half the spacing (the largest rounding error, not the gap)": _spacing_half,
                    "eps * |value| (relative spacing: the real spacing is a power of two)": _spacing_relative,
                    "no subnormal numbers (0 has a spacing too)": _spacing_no_subnormals},
          rtol=0.0, atol=0.0)
def _spacing_cases(hidden: bool) -> list[Case]:
    values = [(3.0, torch.bfloat16), (1500.0, torch.bfloat16), (1.0, torch.float16), (-0.3, torch.float32)]
    if hidden:
        values += [(2.0, torch.bfloat16), (1024.0, torch.bfloat16), (0.0, torch.float16), (1e-6, torch.float16),
                   (65504.0, torch.float16), (-7.9, torch.bfloat16), (1e-40, torch.float32), (2.0**-14, torch.float16)]
        values += [(random.uniform(-1e4, 1e4), random.choice(FLOAT_FORMATS)) for _ in range(4)]
    return [Case(f"value={v:g}, dtype={d}", (v, d)) for v, d in values]


# ------------------------------------------------------------------------------------- 10.2 z-loss gradients


def z_loss_and_grads(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for 10.2: ``L = mean_t logsumexp(x_t W^T)^2`` and, by autograd, ``dL/dW`` and ``dL/dx``; computed
    in float64 and returned in the inputs' dtype, so an answer more accurate than float32 is not penalised."""
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    loss = router_z_loss(F.linear(x64, w64))
    grad_weight, grad_x = torch.autograd.grad(loss, (w64, x64))
    return loss.detach().to(x.dtype), grad_weight.to(weight.dtype), grad_x.to(x.dtype)


def _z_grads_from(dlogits):
    """A z-loss 'solution' whose gradient w.r.t. the logits is ``dlogits(logits, lse, p)`` (for the mistakes)."""
    def solve(x, weight):
        logits = x @ weight.T
        lse = torch.logsumexp(logits, dim=-1)
        g = dlogits(logits, lse, logits.softmax(dim=-1))
        return lse.square().mean(), g.T @ x, g @ weight
    return solve


@exercise("10.2", function="z_loss_and_grads", title="The z-loss and its gradient by hand", points=3,
          reference=z_loss_and_grads, rtol=1e-4, atol=1e-6, no_autograd=True,
          hint="per token, d lse(z)^2 / dz_j = 2 * lse(z) * softmax(z)_j; the mean over T tokens divides by T; "
               "then the chain rule through z = x W^T",
          hints=("logits z = x @ W.T is [T, E]; G = dL/dz is [T, E]; dL/dW = G^T x is [E, d] and dL/dx = G W is "
                 "[T, d]",
                 "compute logsumexp stably: m = max_j z_j, lse = m + log(sum_j exp(z_j - m)); exp of logits in the "
                 "hundreds overflows float32"),
          mistakes={"the mean's 1/T is missing": _z_grads_from(lambda z, lse, p: 2 * lse[:, None] * p),
                    "the factor 2 of the square is missing":
                        _z_grads_from(lambda z, lse, p: lse[:, None] * p / z.shape[0]),
                    "the gradient of mean lse (no 2 * lse factor)": _z_grads_from(lambda z, lse, p: p / z.shape[0])})
def _z_grad_cases(hidden: bool) -> list[Case]:
    configs = [(6, 8, 4, 1.0), (3, 5, 2, 3.0)]
    if hidden:
        configs += [(64, 16, 8, 1.0), (1, 4, 3, 2.0), (5, 6, 1, 1.0), (10, 8, 4, 40.0),
                    (random.randint(2, 30), random.randint(1, 12), random.randint(1, 16), 1.0)]
    cases = []
    for t, d, e, scale in configs:
        what = f"T={t}, d={d}, E={e}" + (f", router weights x{scale:g}" if scale != 1 else "")
        if scale > 10:
            what += " (logits in the hundreds: compute logsumexp stably)"
        cases.append(Case(what, (torch.randn(t, d), scale * torch.randn(e, d))))
    return cases


# ----------------------------------------------------------------------- 10.3 a float32 router under autocast


def mixed_precision_router(x: torch.Tensor, w_in: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Reference for 10.3: ``h = x @ w_in`` under CPU bf16 autocast, then float32 router logits of ``h``."""
    router = Router(router_weight.shape[1], router_weight.shape[0])
    del router.weight
    router.weight = router_weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return router(x @ w_in)


def _router_in_autocast(x, w_in, router_weight):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return (x @ w_in) @ router_weight.T


def _router_cast_after(x, w_in, router_weight):
    return _router_in_autocast(x, w_in, router_weight).float()


def _no_autocast(x, w_in, router_weight):
    return (x @ w_in) @ router_weight.T


@exercise("10.3", function="mixed_precision_router", title="A float32 router inside bf16 autocast", points=2,
          reference=mixed_precision_router,
          hint="autocast casts every matmul inside it to bf16, also the router's; switch it off for the router "
               "and compute from float32 copies of its inputs",
          hints=("nest `with torch.autocast('cpu', enabled=False):` inside the autocast block, and call .float() "
                 "on h and on the router weight there",
                 "casting bf16 logits to float32 afterwards is too late: the rounding already happened"),
          mistakes={"the router ran under autocast (bf16 logits)": _router_in_autocast,
                    "bf16 logits cast to float32 afterwards (the rounding already happened)": _router_cast_after,
                    "no autocast at all (h must come from the bf16 matmul)": _no_autocast})
def _router_cases(hidden: bool) -> list[Case]:
    configs = [(8, 16, 32, 4), (3, 8, 8, 2)] + ([(64, 32, 64, 16), (1, 4, 4, 1), (20, 24, 48, 8)] if hidden else [])
    return [Case(f"T={t}, d_in={d}, d_model={m}, E={e}", (torch.randn(t, d), torch.randn(d, m) / d**0.5,
                                                          torch.randn(e, m)), grad_wrt=(2,))
            for t, d, m, e in configs]


# ---------------------------------------------------------------------------------------- 10.4 routing flips


def _flips_ordered(logits, other, k):
    return float((logits.topk(k, dim=-1).indices != other.topk(k, dim=-1).indices).any(-1).float().mean())


def _flips_per_slot(logits, other, k):
    a = logits.topk(k, dim=-1).indices.sort(-1).values
    b = other.topk(k, dim=-1).indices.sort(-1).values
    return float((a != b).float().mean())


def _untied(t: int, e: int, k: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and a perturbed copy without ties at the k-th place (so any top-k implementation agrees)."""
    while True:
        a = torch.randn(t, e)
        b = a + noise * torch.randn(t, e)
        gaps = [z.sort(dim=-1, descending=True).values.diff(dim=-1).abs().min() if e > 1 else torch.tensor(1.0)
                for z in (a, b)]
        if min(float(g) for g in gaps) > 1e-4:
            return a, b


@exercise("10.4", function="routing_flips", title="How many routing decisions flip?", points=2,
          reference=topk_flips,
          hint="a token's decision flips when its *set* of top-k experts changes; the order inside the top-k "
               "does not matter (the gates are renormalised over the set)",
          hints=("take the top-k indices of both tensors, sort each row, compare rows",
                 "return the fraction of tokens (a Python float), not of the T*k slots"),
          mistakes={"compared ordered top-k lists (the order inside the top-k does not matter)": _flips_ordered,
                    "counted changed slots instead of changed tokens": _flips_per_slot})
def _flip_cases(hidden: bool) -> list[Case]:
    configs = [(50, 8, 2, 0.3), (20, 4, 1, 0.5)]
    if hidden:
        configs += [(200, 16, 4, 0.2), (10, 6, 6, 1.0), (1, 8, 2, 2.0), (100, 8, 3, 0.05),
                    (random.randint(5, 80), 8, random.randint(1, 7), 0.4)]
    cases = []
    for t, e, k, noise in configs:
        a, b = _untied(t, e, k, noise)
        cases.append(Case(f"T={t}, E={e}, k={k}, perturbation {noise:g}", (a, b, k)))
    same = torch.tensor([[2.0, 1.0, -1.0, 0.0]])
    cases.append(Case("same set, other order", (same, torch.tensor([[1.0, 2.0, -1.0, 0.0]]), 2)))
    return cases


# ------------------------------------------------------------------------------------------- 10.5 NaN guard


def _loss_first(router_logits, loss, grad_norm):
    if not bool(torch.isfinite(loss).all()):
        return "loss"
    return first_nonfinite(router_logits, loss, grad_norm)


def _nan_only(router_logits, loss, grad_norm):
    if any(bool(torch.isnan(t).any()) for t in router_logits):
        return "router logits"
    if bool(torch.isnan(loss).any()):
        return "loss"
    if grad_norm is not None and bool(torch.isnan(grad_norm).any()):
        return "gradient norm"
    return None  # misses +-inf


@exercise("10.5", function="first_nonfinite", title="A NaN guard's check", points=1, reference=first_nonfinite,
          hint="non-finite means NaN or +-inf; check in the order the step computes them (router logits, "
               "loss, gradient norm) so the name points at the earliest failure",
          hints=("torch.isfinite(t).all() is False for NaN and for +-inf",
                 "grad_norm is None when clipping is off: then skip that check"),
          mistakes={"checked the loss before the router logits": _loss_first,
                    "only NaN counted (inf is not finite either)": _nan_only})
def _nan_cases(hidden: bool) -> list[Case]:
    def logits(n: int = 2) -> list[torch.Tensor]:
        return [torch.randn(6, 4) for _ in range(n)]

    def poisoned(value: float, layer: int = 1) -> list[torch.Tensor]:
        out = logits()
        out[layer][random.randrange(6), random.randrange(4)] = value
        return out

    nan, inf, ok = math.nan, math.inf, torch.tensor(2.5)
    cases = [Case("all finite", (logits(), torch.tensor([3.1, 3.2]), ok)),
             Case("inf router logits (and so an inf loss)", (poisoned(inf), torch.tensor([inf, 3.2]), ok)),
             Case("inf loss", (logits(), torch.tensor([3.0, -inf]), ok))]
    if hidden:
        cases += [Case("NaN router logits", (poisoned(nan, 0), torch.tensor([nan]), ok)),
                  Case("NaN loss", (logits(), torch.tensor([3.0, nan]), ok)),
                  Case("inf gradient norm", (logits(), torch.tensor([3.0]), torch.tensor(inf))),
                  Case("clipping off: no gradient norm", (logits(3), torch.tensor([2.0, 2.0]), None)),
                  Case("no MoE layers, inf loss", ([], torch.tensor([inf]), torch.tensor(nan))),
                  Case("bf16 logits with inf", ([t.bfloat16() for t in poisoned(inf)], torch.tensor([3.0]), ok))]
    return cases


# ---------------------------------------------------------------------------------- 10.6 z-loss coefficient


def decayed_coefficient(step: int, steps: int, start: float, end: float) -> float:
    """Reference for 10.6: the notes' schedule, geometric from ``start`` (step 0) to ``end`` (last step)."""
    return Decay(start, end)(step, steps)


def _linear_decay(step, steps, start, end):
    return Decay(start, end, shape="linear")(step, steps)


def _never_reaches_end(step, steps, start, end):
    return start * (end / start) ** (step / steps)


@exercise("10.6", function="decayed_coefficient", title="A decaying z-loss coefficient", points=1,
          reference=decayed_coefficient,
          hint="geometric interpolation: the coefficient is multiplied by the same ratio every step, from start "
               "at step 0 to end at the last step (steps - 1), and stays at end afterwards",
          hints=("c(step) = start * (end / start) ** t with t = step / (steps - 1), clipped to [0, 1]",
                 "a one-step run has no room to decay: use max(1, steps - 1) as the denominator"),
          mistakes={"linear instead of geometric interpolation": _linear_decay,
                    "t = step / steps (never reaches end)": _never_reaches_end})
def _decay_cases(hidden: bool) -> list[Case]:
    configs = [(0, 100, 1e-2, 1e-3), (50, 101, 1e-2, 1e-3), (99, 100, 1e-2, 1e-3)]
    if hidden:
        configs += [(7, 10, 1.0, 1e-4), (150, 100, 1e-2, 1e-3), (0, 1, 0.1, 0.01), (3, 4, 1e-3, 1e-2),
                    (random.randint(0, 500), 500, random.uniform(1e-3, 1e-1), 1e-3)]
    return [Case(f"step={s}, steps={n}, start={a:g}, end={b:g}", (s, n, a, b)) for s, n, a, b in configs]
