"""Interactive parameter / FLOP / memory calculator for an MoE transformer.

``calculator_report(...)`` is the pure computation (build an :class:`moe_lab.calculator.Arch`, count);
``calculator_dashboard(...)`` wraps it in sliders and dropdowns and redraws on every change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..calculator import DTYPE_BYTES, Arch, count_params, flops_per_token, inference_memory, training_memory
from ._display import FigureDashboard

GB = 1e9


@dataclass
class CalculatorReport:
    """Everything the dashboard shows for one architecture. Parameters are counts, FLOPs per token, memory
    in bytes: ``training`` / ``inference`` are the breakdowns of :func:`training_memory` /
    :func:`inference_memory`; ``components``: name -> (total, active)."""

    arch: Arch
    dtype: str
    context: int
    batch: int
    total: int
    active: int
    components: dict[str, tuple[int, int]]
    forward_flops: int
    training_flops: int
    training: dict[str, float]
    inference: dict[str, float]

    @property
    def active_fraction(self) -> float:
        return self.active / self.total


def calculator_report(d_model: int = 4096, d_expert: int = 14336, num_experts: int = 8, k: int = 2,
                      n_shared: int = 0, n_layers: int = 32, dtype: str = "bf16", context: int = 4096,
                      batch: int = 1, *, vocab_size: int = 32000, head_dim: int = 128, n_kv_heads: int = 8,
                      activation: str = "swiglu") -> CalculatorReport:
    """Count a GQA transformer with an MoE FFN (``num_experts`` routed experts of width ``d_expert``, top-``k``,
    ``n_shared`` shared experts) in every layer; ``num_experts=0`` gives a dense FFN of width ``d_expert``.
    Heads: ``d_model / head_dim`` query heads and ``gcd(n_kv_heads, heads)`` KV heads (a divisor of the heads).
    FLOPs use ``context`` keys per token; memory uses ``dtype``, and the KV cache ``batch x context`` tokens.
    The defaults are Mixtral 8x7B."""
    if d_model % head_dim:
        raise ValueError(f"d_model must be a multiple of head_dim={head_dim}, got {d_model}")
    heads = d_model // head_dim
    moe = num_experts > 0
    arch = Arch(n_layers=n_layers, d_model=d_model, n_heads=heads, n_kv_heads=math.gcd(n_kv_heads, heads),
                head_dim=head_dim, vocab_size=vocab_size, activation=activation, d_ff=0 if moe else d_expert,
                num_experts=num_experts, k=k if moe else 0, d_expert=d_expert if moe else 0,
                n_shared=n_shared if moe else 0, name="calculator")
    params = count_params(arch)
    return CalculatorReport(
        arch=arch, dtype=dtype, context=context, batch=batch, total=params.total, active=params.active,
        components=params.components, forward_flops=flops_per_token(arch, context),
        training_flops=flops_per_token(arch, context, training=True),
        training=training_memory(params.total, dtype), inference=inference_memory(arch, context, batch, dtype))


def draw_report(r: CalculatorReport) -> Figure:
    """Left: total vs active parameters by component. Right: training vs inference memory by part."""
    fig = Figure(figsize=(9.5, 3.3), layout="constrained")
    ax_p, ax_m = fig.subplots(1, 2)
    names = [n for n, (t, _) in r.components.items() if t > 0]
    bottom = [0.0, 0.0]
    for name in names:
        total, active = r.components[name]
        ax_p.bar(["total", "active"], [total / GB, active / GB], bottom=bottom, label=name)
        bottom = [bottom[0] + total / GB, bottom[1] + active / GB]
    ax_p.set(ylabel="parameters (billions)", title="parameters by component")
    ax_p.legend(fontsize=7, loc="upper right")
    for col, parts in (("training", r.training), ("inference", r.inference)):
        base = 0.0
        for part, value in parts.items():
            if part != "total":
                ax_m.bar(col, value / GB, bottom=base, label=f"{col}: {part}")
                base += value / GB
    ax_m.set(ylabel="GB", title=f"memory ({r.dtype} weights, no activations)")
    ax_m.legend(fontsize=7, loc="upper right")
    return fig


def summary_html(r: CalculatorReport) -> str:
    rows = [
        ("total parameters", f"{r.total / GB:,.2f} B"),
        ("active parameters / token", f"{r.active / GB:,.2f} B ({100 * r.active_fraction:.1f}%)"),
        (f"forward FLOPs / token (context {r.context:,})", f"{r.forward_flops / GB:,.1f} GFLOP"),
        ("training FLOPs / token (3x forward)", f"{r.training_flops / GB:,.1f} GFLOP"),
        (f"weights in {r.dtype}", f"{r.inference['weights'] / GB:,.1f} GB"),
        ("training memory (weights, grads, fp32 master, Adam)", f"{r.training['total'] / GB:,.1f} GB"),
        (f"KV cache (batch {r.batch} x {r.context:,} tokens)", f"{r.inference['kv_cache'] / GB:,.2f} GB"),
        ("inference memory (weights + KV cache)", f"{r.inference['total'] / GB:,.1f} GB"),
    ]
    body = "".join(f"<tr><td>{a}</td><td style='text-align:right'><b>{b}</b></td></tr>" for a, b in rows)
    return f"<table>{body}</table>"


class CalculatorDashboard(FigureDashboard):
    """The calculator widget. ``controls``: name -> ipywidget; ``last``: the :class:`CalculatorReport` drawn
    last; ``png``: its figure as PNG bytes (also offered as a static image)."""

    def __init__(self, controls: dict[str, widgets.ValueWidget]):
        names = list(controls)
        super().__init__(controls, [names[i:i + 3] for i in range(0, len(names), 3)])
        self.redraw_on_change()

    def update(self, change: dict | None = None) -> None:
        """Recompute and redraw from the current control values."""
        c = {name: control.value for name, control in self.controls.items()}
        experts = max(c["num_experts"], 1)
        if self.controls["k"].max != experts:  # k's range follows E; setting it may re-trigger update
            self.controls["k"].max = experts
            if c["k"] > experts:
                return
        report = calculator_report(**c)
        self.show_figure(draw_report(report), summary_html(report))
        self.last = report


def calculator_dashboard(d_model: int = 4096, d_expert: int = 14336, num_experts: int = 8, k: int = 2,
                         n_shared: int = 0, n_layers: int = 32, dtype: str = "bf16", context: int = 4096,
                         batch: int = 1) -> CalculatorDashboard:
    """Sliders and dropdowns over :func:`calculator_report` (same arguments as its initial values; the
    defaults are Mixtral 8x7B). ``num_experts = 0`` is the dense model."""
    calculator_report(d_model, d_expert, num_experts, k, n_shared, n_layers, dtype, context, batch)  # validate
    style = {"description_width": "initial"}

    def slider(cls, value, lo, hi, step, label):
        return cls(value=value, min=lo, max=max(hi, value), step=step, description=label, style=style,
                   continuous_update=False)

    controls = {
        "d_model": slider(widgets.IntSlider, d_model, 512, 8192, 128, "d_model"),
        "d_expert": slider(widgets.IntSlider, d_expert, 256, 32768, 256, "d_ff (per expert)"),
        "num_experts": slider(widgets.IntSlider, num_experts, 0, 256, 1, "experts E"),
        "k": slider(widgets.IntSlider, k, 1, max(num_experts, 1), 1, "top-k"),
        "n_shared": slider(widgets.IntSlider, n_shared, 0, 4, 1, "shared experts"),
        "n_layers": slider(widgets.IntSlider, n_layers, 1, 128, 1, "layers"),
        "dtype": widgets.Dropdown(options=list(DTYPE_BYTES), value=dtype, description="dtype", style=style),
        "context": widgets.IntSlider(value=context, min=128, max=max(131072, context), step=128,
                                     description="context", style=style, continuous_update=False),
        "batch": slider(widgets.IntSlider, batch, 1, 256, 1, "batch"),
    }
    return CalculatorDashboard(controls)
