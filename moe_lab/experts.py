"""Expert FFNs with stacked weights, and the grouped matmul that runs them all at once.

Weights are stacked over experts: ``w1, w3: [E, d_model, d_ff]``, ``w2: [E, d_ff, d_model]``.
Activations: ``"gelu"``: ``w2(gelu(x w1))``; ``"swiglu"``: ``w2(silu(x w1) * x w3)`` (Mixtral, DeepSeek).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
import torch.nn.functional as F

from .utils import compute_dtype

Activation = Literal["gelu", "swiglu"]
ACTIVATIONS = ("gelu", "swiglu")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def fused_grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` supports these operands on this machine.

    CPU: float32 (bf16 needs 16-byte aligned rows). CUDA: bf16 with 16-byte aligned rows on sm90+.
    :func:`grouped_mm` uses it by default on CUDA only (see there).
    """
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], w.shape[-1]))
    if x.device.type == "cpu":
        return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and aligned)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def grouped_mm_kernel(x: torch.Tensor, w: torch.Tensor, fused: bool | None = None) -> str:
    """A short name of what ``grouped_mm(x, w, counts, fused=fused)`` runs on these operands on this machine:
    ``"F.grouped_mm (fused)"`` or ``"per-group matmuls (fallback)"``."""
    if fused is None:
        fused = x.device.type != "cpu" and fused_grouped_mm_usable(x, w)
    return "F.grouped_mm (fused)" if fused else "per-group matmuls (fallback)"


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects expanded (stride-0) gradients such as the one ``out.sum()`` sends.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
    """Multiply consecutive row groups of ``x`` by their own matrix.

    Args:
        x: ``[S, d_in]`` rows sorted by group; group ``e`` has ``counts[e]`` rows.
        w: ``[E, d_in, d_out]`` one matrix per group.
        counts: ``[E]`` int rows per group (may contain zeros), summing to ``S``.
        fused: use ``F.grouped_mm`` (True) or the per-group fallback (False). ``None``: fused on CUDA when
            usable (one kernel, no host sync); the fallback on CPU, where per-group matmuls are as fast as
            torch's CPU kernel with one thread or passive OpenMP waiting, and up to 2x faster on a busy
            machine with OpenMP's default spin-waiting. Both give the same results up to float rounding.
    Returns:
        ``[S, d_out]`` with rows of group ``e`` equal to ``x_e @ w[e]``.
    """
    if fused is None:
        fused = x.device.type != "cpu" and fused_grouped_mm_usable(x, w)
    if fused:
        offsets = counts.cumsum(0).to(torch.int32)
        return _contiguous_grad(F.grouped_mm(x, w, offs=offsets))
    # Fallback: one matmul per group on contiguous slices (needs the counts on the host).
    pieces = [xe @ we for xe, we in zip(torch.split(x, counts.tolist()), w)]
    return torch.cat(pieces) if pieces else x.new_empty(0, w.shape[-1])


class Experts(nn.Module):
    """``E`` expert FFNs stored as stacked weight tensors (no biases). ``dropout``: probability of dropping a
    hidden activation in training mode (Switch's expert dropout; 0 = off)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: Activation = "swiglu", *,
                 dropout: float = 0.0):
        super().__init__()
        _check_activation(activation)
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_experts, self.d_model, self.d_ff, self.activation = num_experts, d_model, d_ff, activation
        self.dropout = dropout
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default scale: uniform(+-1/sqrt(fan_in)) per expert."""
        for w in (self.w1, self.w3, self.w2):
            if w is not None:
                bound = 1 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)

    def _act(self, h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(h1) * h3 if self.activation == "swiglu" else F.gelu(h1)
        return F.dropout(h, self.dropout, training=True) if self.dropout and self.training else h

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        w3 = None if self.w3 is None else self.w3.to(dtype)
        return self.w1.to(dtype), w3, self.w2.to(dtype)

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens. x: ``[n, d_model]`` -> ``[n, d_model]``."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        h3 = None if self.w3 is None else x @ self.w3[e].to(dtype)
        return self._act(x @ self.w1[e].to(dtype), h3) @ self.w2[e].to(dtype)

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
        """All experts at once on expert-sorted rows.

        x: ``[S, d_model]`` sorted by expert, ``counts: [E]`` rows per expert -> ``[S, d_model]``.
        """
        dtype = compute_dtype(x)
        w1, w3, w2 = self._weights(dtype)
        x = x.to(dtype)
        h3 = None if w3 is None else grouped_mm(x, w3, counts, fused=fused)
        return grouped_mm(self._act(grouped_mm(x, w1, counts, fused=fused), h3), w2, counts, fused=fused)

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own fixed-size buffer. x: ``[E, C, d_model]`` -> ``[E, C, d_model]``."""
        dtype = compute_dtype(x)
        w1, w3, w2 = self._weights(dtype)
        x = x.to(dtype)
        h3 = None if w3 is None else torch.bmm(x, w3)
        return torch.bmm(self._act(torch.bmm(x, w1), h3), w2)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class FFN(nn.Module):
    """A dense FFN with the same activation conventions as :class:`Experts` (one expert, every token)."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "swiglu"):
        super().__init__()
        self.experts = Experts(1, d_model, d_ff, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., d_model]`` -> ``[..., d_model]``."""
        return self.experts.forward_one(0, x.reshape(-1, x.shape[-1])).reshape(x.shape)
