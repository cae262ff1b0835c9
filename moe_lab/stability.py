"""Numerical stability of MoE routers: float-format facts, what a low-precision router changes, Switch's init.

- :func:`float_formats` and :func:`spacing`: range and resolution of float32 / bfloat16 / float16 (from
  ``torch.finfo``), and the gap between neighbouring numbers at a value (ST-MoE: 0.0156 in ``[2, 4)`` but 8.0 in
  ``[1024, 2048)`` for bfloat16).
- :func:`topk_flips` and :func:`routing_flips`: how many routing decisions change when the router runs in a lower
  precision (what ``router_dtype`` does in :class:`moe_lab.MoELayer`) instead of float32.
- :func:`switch_init_`: the Switch Transformer's truncated-normal initialisation with a scale (0.1 recommended).
- :func:`expert_utilisation`: the share of token-slots that fit into equal expert capacities (a reading of the
  companion notes' unsourced "expert utilisation 82% -> 95%").

Training-time tools (loss-weight schedules, a NaN guard, router statistics) are hooks: :mod:`moe_lab.hooks`.
Shapes: ``T`` tokens, ``E`` experts, ``d`` model width.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from .experts import Experts
from .routing import check_k, softmax_topk
from .validation import check_finite, check_number, check_tensor, check_type, is_number, reads_values

FLOAT_FORMATS = (torch.float32, torch.bfloat16, torch.float16)
"""The formats the course compares (router math, autocast dtypes)."""


def _check_format(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_FORMATS:
        raise ValueError(f"dtype must be one of {FLOAT_FORMATS}, got {dtype!r}")


def float_formats(dtypes: tuple[torch.dtype, ...] = FLOAT_FORMATS) -> list[dict]:
    """One row per format: bits, exponent and mantissa (stored fraction) bits, largest finite value, smallest
    normal value, ``eps`` (the spacing at 1) and the spacing at 1000, all from ``torch.finfo``."""
    check_type("dtypes", dtypes, (tuple, list), f"a tuple of dtypes among {FLOAT_FORMATS}")
    rows = []
    for dtype in dtypes:
        _check_format(dtype)
        info = torch.finfo(dtype)
        mantissa = round(-math.log2(info.eps))
        rows.append({"dtype": str(dtype).removeprefix("torch."), "bits": info.bits,
                     "exponent bits": info.bits - 1 - mantissa, "mantissa bits": mantissa, "max": info.max,
                     "smallest normal": info.smallest_normal, "eps (spacing at 1)": info.eps,
                     "spacing at 1000": spacing(1000.0, dtype)})
    return rows


def spacing(value: float, dtype: torch.dtype) -> float:
    """The gap between consecutive ``dtype`` numbers around ``value`` (its ULP): ``2^e * eps`` for
    ``2^e <= |value| < 2^(e+1)``, and ``smallest_normal * eps`` (the subnormal spacing) below the smallest normal
    number (0 included). Rounding to nearest moves a value by at most half of it.

    Raises ``ValueError`` for values that are not finite or exceed ``dtype``'s largest finite number.
    """
    _check_format(dtype)
    info = torch.finfo(dtype)
    if not is_number(value) or abs(value) > info.max:
        raise ValueError(f"value must be finite with |value| <= {info.max:.6g} (the {dtype} range), got {value!r}")
    value = float(value)
    if abs(value) < info.smallest_normal:
        return info.smallest_normal * info.eps
    _, exponent = math.frexp(abs(value))  # |value| = m * 2^exponent with 0.5 <= m < 1
    return math.ldexp(info.eps, exponent - 1)


def topk_flips(logits: torch.Tensor, other: torch.Tensor, k: int) -> float:
    """Fraction of tokens whose *set* of top-``k`` experts differs between ``logits`` and ``other`` (both
    ``[T, E]``; the order inside the top-k does not count, so at ``k = E`` nothing can flip)."""
    for name, t in (("logits", logits), ("other", other)):
        check_tensor(name, t, "[tokens, num_experts]", 2)
        check_finite(name, t)
    if other.shape != logits.shape or logits.shape[0] == 0:
        raise ValueError(f"logits and other must both have shape [tokens, num_experts] with tokens >= 1, got "
                         f"{tuple(logits.shape)} and {tuple(other.shape)}")
    check_k(k, logits.shape[-1])
    a = logits.float().topk(k, dim=-1).indices.sort(dim=-1).values
    b = other.float().topk(k, dim=-1).indices.sort(dim=-1).values
    return float((a != b).any(dim=-1).float().mean())


class FlipStats(NamedTuple):
    """What computing a router in a low precision changes, over ``T`` tokens (see :func:`routing_flips`).

    flip_rate: fraction of tokens whose set of top-k experts changes.  top1_flip_rate: fraction whose best
    expert changes.  prob_error: mean over tokens of the largest absolute change of a router probability.
    mean_lse: mean ``logsumexp`` of the float32 logits (the quantity the z-loss squares).
    max_abs_logit: largest ``|logit|`` in float32.
    """

    flip_rate: float
    top1_flip_rate: float
    prob_error: float
    mean_lse: float
    max_abs_logit: float


def router_logits(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x: [T, d] @ weight^T: [d, E] -> [T, E]`` computed in ``dtype`` with autocast off: what
    :class:`moe_lab.routing.Router` computes for a layer's ``router_dtype``."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


@torch.no_grad()
def routing_flips(x: torch.Tensor, weight: torch.Tensor, k: int, dtype: torch.dtype = torch.bfloat16,
                  offset: float = 0.0) -> FlipStats:
    """Route the router inputs ``x: [T, d]`` with ``weight: [E, d]`` once in float32 and once with the router
    matmul and the softmax in ``dtype`` (``MoELayer(router_dtype=dtype)``); compare the decisions.

    ``offset`` adds the same number to every logit (computed in each precision, so the low-precision logits are
    rounded again): the softmax ignores it in exact arithmetic, ``dtype``'s spacing at ``offset`` does not.
    """
    check_tensor("weight", weight, "[num_experts, d_model]", 2)
    check_tensor("x", x, f"[tokens, d_model={weight.shape[1]}]", 2)
    if x.shape[1] != weight.shape[1] or x.shape[0] == 0:
        raise ValueError(f"x must have shape [tokens >= 1, d_model={weight.shape[1]}] (weight is [num_experts, "
                         f"d_model]), got shape {tuple(x.shape)}")
    check_finite("x", x)
    check_finite("weight", weight)
    _check_format(dtype)
    check_k(k, weight.shape[0])
    check_number("offset", offset)
    ref = router_logits(x, weight) + offset
    low = router_logits(x, weight, dtype) + offset
    if not bool(torch.isfinite(ref).all() and torch.isfinite(low).all()):
        raise ValueError(f"x and offset={offset!r} give router logits beyond the range of {dtype} (largest finite "
                         f"{torch.finfo(dtype).max:.3g}): scale x down or use a smaller offset")
    p_ref, _, e_ref = softmax_topk(ref, k)
    p_low, _, e_low = softmax_topk(low, k, dtype=dtype)
    return FlipStats(flip_rate=topk_flips(ref, low, k),
                     top1_flip_rate=float((e_ref[:, 0] != e_low[:, 0]).float().mean()),
                     prob_error=float((p_low.float() - p_ref).abs().amax(dim=-1).mean()),
                     mean_lse=float(ref.logsumexp(dim=-1).mean()), max_abs_logit=float(ref.abs().max()))


@torch.no_grad()
def switch_init_(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Re-initialise every weight matrix of ``model`` in place as the Switch Transformer does (Sec. 2.4): a
    normal distribution with mean 0 and std ``sqrt(scale / fan_in)``, truncated at 2 std (Switch: ``scale``
    0.1 stable, 1.0 unstable, Table 3). ``fan_in``: ``in_features`` of linear layers and the router
    (``[out, in]``), ``d_in`` of stacked expert weights (``[E, d_in, d_out]``). Embeddings, norms and vectors
    keep their initialisation. Returns ``model``."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_number("scale", scale, 0, low_open=True)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for param in module.parameters(recurse=False):
            if param.dim() < 2:
                continue
            fan_in = param.shape[1] if isinstance(module, Experts) else param.shape[-1]
            std = math.sqrt(scale / fan_in)
            nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)
    return model


def expert_utilisation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``sum_i min(n_i, n / E) / n`` for ``tokens_per_expert: [..., E]`` (``n`` slots in all): the share of the
    token-slots that experts of equal capacity ``n / E`` (capacity factor 1) could take; 1 at perfect balance,
    ``1 / E`` when one expert gets everything (and 0 for a row without slots). Returns ``[...]`` float32."""
    check_tensor("tokens_per_expert", tokens_per_expert, "[..., num_experts]", kind="real")
    if tokens_per_expert.dim() == 0 or tokens_per_expert.shape[-1] == 0:
        raise ValueError(f"tokens_per_expert must have shape [..., num_experts >= 1], got shape "
                         f"{tuple(tokens_per_expert.shape)}")
    check_finite("tokens_per_expert", tokens_per_expert)
    if reads_values(tokens_per_expert) and bool((tokens_per_expert < 0).any()):
        raise ValueError(f"tokens_per_expert must be counts >= 0, got a minimum of {float(tokens_per_expert.min())}")
    load = tokens_per_expert.float()
    total = load.sum(dim=-1, keepdim=True)
    fair = total / load.shape[-1]
    return (torch.minimum(load, fair).sum(dim=-1, keepdim=True) / total.clamp_min(1)).squeeze(-1)
