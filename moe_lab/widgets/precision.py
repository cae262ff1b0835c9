"""Router-precision dashboard (notebook 10): what a bf16 / fp16 router changes as the logits grow.

``precision_snapshot(...)`` is the pure computation (over :func:`moe_lab.stability.routing_flips`);
``precision_dashboard(...)`` redraws it live. Shapes: ``T`` tokens, ``d`` model width, ``E`` experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from ..routing import check_k
from ..stability import FlipStats, router_logits, routing_flips
from ..validation import check_choice, check_int, check_number, check_tensor
from ._display import FigureDashboard

LOW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PrecisionSnapshot:
    """Routing of ``T`` tokens with router weights scaled by ``scale`` and logits offset by ``offset``.

    stats: the :class:`moe_lab.stability.FlipStats` of ``dtype`` against float32.
    probs_fp32, probs_low: ``[E]`` router probabilities of token ``token`` in float32 and in ``dtype``.
    """

    dtype: str
    scale: float
    offset: float
    token: int
    stats: FlipStats
    probs_fp32: torch.Tensor
    probs_low: torch.Tensor


def precision_snapshot(x: torch.Tensor, weight: torch.Tensor, k: int = 2, dtype: str = "bfloat16",
                       scale: float = 1.0, offset: float = 0.0, token: int = 0) -> PrecisionSnapshot:
    """Route ``x: [T, d]`` with ``scale * weight`` (``[E, d]``) plus a common logit ``offset`` in float32 and in
    ``dtype`` (``"bfloat16"`` or ``"float16"``); keep the statistics and one token's probabilities."""
    check_choice("dtype", dtype, tuple(LOW_DTYPES))
    check_number("scale", scale, 0, low_open=True)
    check_number("offset", offset)
    check_tensor("x", x, "[tokens, d_model]", 2)
    check_int("token", token, 0, x.shape[0] - 1)
    check_k(k, weight.shape[0])
    w = scale * weight.detach()
    low_dtype = LOW_DTYPES[dtype]
    stats = routing_flips(x, w, k, low_dtype, offset)
    with torch.no_grad():
        p32 = (router_logits(x[token:token + 1], w) + offset).softmax(-1)[0]
        plow = (router_logits(x[token:token + 1], w, low_dtype) + offset).softmax(-1)[0].float()
    return PrecisionSnapshot(dtype, float(scale), float(offset), token, stats, p32, plow)


def draw_precision(snap: PrecisionSnapshot) -> Figure:
    """Bars of one token's router probabilities in float32 and in the low precision."""
    num_experts = snap.probs_fp32.numel()
    fig = Figure(figsize=(6, 2.6), layout="constrained")
    ax = fig.subplots()
    pos = torch.arange(num_experts)
    ax.bar((pos - 0.2).tolist(), snap.probs_fp32.tolist(), width=0.4, label="float32", color="tab:blue")
    ax.bar((pos + 0.2).tolist(), snap.probs_low.tolist(), width=0.4, label=snap.dtype, color="tab:orange")
    ax.set(xlabel="expert", ylabel="router probability", ylim=(0, 1), xticks=pos.tolist(),
           title=f"token {snap.token}: weights x{snap.scale:g}, offset {snap.offset:g}")
    ax.legend(fontsize=8)
    return fig


class PrecisionDashboard(FigureDashboard):
    """Controls ``dtype``, ``scale``, ``offset`` and ``token``; ``last`` is the :class:`PrecisionSnapshot` drawn."""

    def __init__(self, controls, x: torch.Tensor, weight: torch.Tensor, k: int):
        super().__init__(controls, [["dtype", "scale"], ["offset", "token"]])
        self.x, self.weight, self.k = x, weight, k
        self.redraw_on_change()

    def update(self, change: dict | None = None) -> None:
        """Recompute and redraw from the current control values."""
        c = self.controls
        snap = precision_snapshot(self.x, self.weight, self.k, c["dtype"].value, c["scale"].value,
                                  c["offset"].value, c["token"].value)
        s = snap.stats
        text = (f"<b>{100 * s.flip_rate:.1f}% of {self.x.shape[0]} tokens change their top-{self.k} experts "
                f"({100 * s.top1_flip_rate:.1f}% their best) | mean max probability error {s.prob_error:.4f} | "
                f"mean lse {s.mean_lse:.1f}, max |logit| {s.max_abs_logit:.1f}</b>")
        self.show_figure(draw_precision(snap), text)
        self.last = snap


def precision_dashboard(x: torch.Tensor, weight: torch.Tensor, k: int = 2, *, dtype: str = "bfloat16",
                        scale: float = 1.0, offset: float = 0.0) -> PrecisionDashboard:
    """A live view of :func:`precision_snapshot` for fixed router inputs ``x: [T, d]`` and weights ``[E, d]``."""
    precision_snapshot(x, weight, k, dtype, scale, offset)  # validate early
    style = {"description_width": "initial"}
    controls = {
        "dtype": widgets.Dropdown(options=list(LOW_DTYPES), value=dtype, description="router dtype", style=style),
        "scale": widgets.FloatLogSlider(value=scale, base=10, min=0, max=2, step=0.1, description="weights x",
                                        style=style, continuous_update=False),
        "offset": widgets.FloatSlider(value=offset, min=0.0, max=1024.0, step=4.0, description="logit offset",
                                      style=style, continuous_update=False),
        "token": widgets.IntSlider(value=0, min=0, max=x.shape[0] - 1, description="token", style=style,
                                   continuous_update=False),
    }
    return PrecisionDashboard(controls, x, weight, k)
