"""Bias-balancing dashboard (notebook 12): aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3) step by step.

The compute is :func:`moe_lab.bias_balancing.simulate_bias_balancing` (a skewed router that does not learn, the
bias update after every step; unit tested). This module replays its trace: ``play`` / ``step`` move through the
steps, the gamma slider, the mean-centring box and the skew slider recompute the run from step 0 with the new
setting and show the same step. Next to it, the same router without a bias (gamma = 0) is the control.
"""
from __future__ import annotations

from functools import lru_cache

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..bias_balancing import BiasTrace, simulate_bias_balancing
from ..validation import check_int
from ._display import FigureDashboard

RATES = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
"""The gamma values offered by the slider (0 = no bias update: the control)."""


@lru_cache(maxsize=64)
def _trace(rate: float, centered: bool, skew: float, num_experts: int, k: int, tokens: int, steps: int,
           seed: int) -> BiasTrace:
    return simulate_bias_balancing(num_experts=num_experts, k=k, tokens=tokens, steps=steps, rate=rate,
                                   centered=centered, skew=skew, seed=seed)


def draw_step(trace: BiasTrace, control: BiasTrace, step: int, rate: float) -> Figure:
    """Load and bias per expert at ``step``, MaxVio up to ``step`` (with the gamma = 0 ``control``), and every
    expert's load relative to the mean over the steps so far."""
    load = trace.load[step].float()
    ideal = float(load.mean())
    experts = range(load.numel())
    fig = Figure(figsize=(12, 2.7), layout="constrained")
    ax_load, ax_bias, ax_vio, ax_lines = fig.subplots(1, 4)
    ax_load.bar(experts, load.tolist(), color=["tab:red" if n > 1.5 * ideal else "tab:blue" for n in load.tolist()])
    ax_load.axhline(ideal, color="black", linestyle="--", linewidth=0.8)
    ax_load.set(title=f"tokens per expert (step {step})", xlabel="expert", ylim=(0, float(trace.load.max()) * 1.05))
    bias = trace.bias[step].tolist()
    ax_bias.bar(experts, bias, color=["tab:green" if b >= 0 else "tab:purple" for b in bias])
    ax_bias.axhline(0, color="black", linewidth=0.8)
    limit = max(1e-3, float(trace.bias.abs().max()))
    ax_bias.set(title="bias b_i (selection only)", xlabel="expert", ylim=(-1.05 * limit, 1.05 * limit))
    ax_vio.plot(control.max_violation[: step + 1].tolist(), color="gray", linestyle="--", label="gamma = 0")
    ax_vio.plot(trace.max_violation[: step + 1].tolist(), color="tab:orange", label=f"gamma = {rate:g}")
    ax_vio.set(title="MaxVio per step", xlabel="step", xlim=(0, len(trace.max_violation) - 1),
               ylim=(0, 1.05 * float(max(control.max_violation.max(), trace.max_violation.max()))))
    ax_vio.legend(fontsize=7, loc="upper right")
    share = trace.load[: step + 1].float() / trace.load[: step + 1].float().mean(-1, keepdim=True)
    ax_lines.plot(share.numpy(), linewidth=0.7)
    ax_lines.axhline(1, color="black", linestyle="--", linewidth=0.8)
    ax_lines.set(title="load / mean, every expert", xlabel="step", xlim=(0, len(trace.max_violation) - 1))
    return fig


class BiasBalancingDashboard(FigureDashboard):
    """Controls ``play`` (the step shown), ``step`` (one step on), ``reset`` (back to step 0), ``rate`` (gamma),
    ``centered`` (mean-centred update) and ``skew`` (how unequal the experts' popularity is). ``last``: a dict
    of the step drawn (``step``, ``rate``, ``centered``, ``skew``, ``load``, ``bias``, ``max_violation``,
    ``control_max_violation``)."""

    def __init__(self, controls: dict[str, widgets.Widget], sizes: dict[str, int]):
        self.sizes = sizes
        super().__init__(controls, [["play", "step", "reset"], ["rate", "centered", "skew"]])
        controls["step"].on_click(lambda _: self._advance())
        controls["reset"].on_click(lambda _: setattr(controls["play"], "value", 0))
        for name in ("play", "rate", "centered", "skew"):
            controls[name].observe(self.update, names="value")
        self.update()

    def _advance(self) -> None:
        play = self.controls["play"]
        play.value = min(play.max, play.value + 1)

    def traces(self) -> tuple[BiasTrace, BiasTrace]:
        """The run with the current settings and its gamma = 0 control."""
        c = {name: self.controls[name].value for name in ("rate", "centered", "skew")}
        trace = _trace(c["rate"], c["centered"], c["skew"], **self.sizes)
        return trace, _trace(0.0, False, c["skew"], **self.sizes)

    def update(self, change: dict | None = None) -> None:
        """Redraw the step the ``play`` control points at, for the current settings."""
        trace, control = self.traces()
        step, rate = self.controls["play"].value, self.controls["rate"].value
        self.last = {"step": step, "rate": rate, "centered": self.controls["centered"].value,
                     "skew": self.controls["skew"].value, "load": trace.load[step].tolist(),
                     "bias": trace.bias[step].tolist(), "max_violation": float(trace.max_violation[step]),
                     "control_max_violation": float(control.max_violation[step])}
        text = (f"<b>step {step} | gamma {rate:g}{' (mean-centred)' if self.last['centered'] else ''} | "
                f"MaxVio {self.last['max_violation']:.2f} (gamma = 0: {self.last['control_max_violation']:.2f}) | "
                f"bias from {min(self.last['bias']):+.3f} to {max(self.last['bias']):+.3f}</b>")
        self.show_figure(draw_step(trace, control, step, rate), text)


def bias_balancing_dashboard(
    rate: float = 1e-2,
    *,
    centered: bool = False,
    skew: float = 1.0,
    num_experts: int = 16,
    k: int = 2,
    tokens: int = 512,
    steps: int = 200,
    seed: int = 0,
    initial_step: int | None = None,
    interval_ms: int = 100,
) -> BiasBalancingDashboard:
    """A dashboard over :func:`moe_lab.bias_balancing.simulate_bias_balancing`: press play (or ``step``) to move
    through ``steps`` bias updates of ``num_experts`` experts (top-``k`` of sigmoid scores + bias, ``tokens``
    tokens per step); change gamma (one of :data:`RATES`), the mean-centring or the skew at any time. The
    first render shows ``initial_step`` (default: the last step, so the static picture has the whole run)."""
    if rate not in RATES:
        raise ValueError(f"rate must be one of {RATES} for the dashboard, got {rate!r}")
    check_int("steps", steps, 1)
    initial_step = steps - 1 if initial_step is None else initial_step
    check_int("initial_step", initial_step, 0, steps - 1)
    sizes = dict(num_experts=num_experts, k=k, tokens=tokens, steps=steps, seed=seed)
    _trace(rate, centered, skew, **sizes)  # validates the sizes before any widget exists
    style = {"description_width": "initial"}
    controls = {
        "play": widgets.Play(value=initial_step, min=0, max=steps - 1, step=1, interval=interval_ms,
                             description="run"),
        "step": widgets.Button(description="step", tooltip="one bias update"),
        "reset": widgets.Button(description="reset", tooltip="back to step 0 (bias 0)"),
        "rate": widgets.SelectionSlider(options=[(f"{r:g}", r) for r in RATES], value=rate,
                                        description="gamma (bias update rate)", style=style),
        "centered": widgets.Checkbox(value=centered, description="mean-centred update"),
        "skew": widgets.FloatSlider(value=skew, min=0.0, max=2.0, step=0.25, description="router skew",
                                    style=style, continuous_update=False),
    }
    return BiasBalancingDashboard(controls, sizes)
