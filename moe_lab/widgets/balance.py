"""Live load-balancing dashboard (notebook 04): train a router + tiny MoE step by step and watch the load.

The compute lives in :class:`moe_lab.balancing.BalanceExperiment` (unit tested); this module only drives it
from a play button and draws its history.
"""
from __future__ import annotations

from dataclasses import replace

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..balancing import BalanceConfig, BalanceExperiment
from ._display import FigureDashboard

ALPHAS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


def draw_history(experiment: BalanceExperiment) -> Figure:
    """Tokens per expert at the last step, and the task loss, aux loss and MaxVio curves."""
    h = experiment.history
    fig = Figure(figsize=(11, 2.6), layout="constrained")
    ax_bar, ax_task, ax_aux, ax_vio = fig.subplots(1, 4)
    c = experiment.config
    ideal = c.tokens * c.k / c.num_experts
    ax_bar.bar(range(c.num_experts), h.load[-1] if h.load else [0] * c.num_experts, color="tab:blue")
    ax_bar.axhline(ideal, color="black", linestyle="--", label=f"ideal T*k/E = {ideal:g}")
    ax_bar.legend(loc="upper right", fontsize=7)
    ax_bar.set(title="tokens per expert (latest step)", xlabel="expert", ylim=(0, c.tokens * c.k))
    for ax, values, title in ((ax_task, h.task_loss, "task loss (MSE)"), (ax_aux, h.aux_loss, "Switch aux loss"),
                              (ax_vio, h.max_vio, "MaxVio")):
        ax.plot(values, color="tab:orange")
        ax.set(title=title, xlabel="step")
    ax_aux.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="uniform routing")
    ax_vio.axhline(0.0, color="black", linestyle="--", linewidth=0.8, label="perfect balance")
    for ax in (ax_aux, ax_vio):
        ax.legend(loc="upper right", fontsize=7)
    return fig


class BalanceDashboard(FigureDashboard):
    """Controls ``play`` (runs ``steps_per_tick`` steps per tick), ``alpha``, ``noise`` (Switch jitter eps)
    and ``reset``. ``experiment`` is the live :class:`BalanceExperiment`; ``last`` a dict of the latest step."""

    def __init__(self, controls, config: BalanceConfig, steps_per_tick: int, initial_steps: int):
        super().__init__(controls, [["play", "reset"], ["alpha", "noise"]])
        self.config, self.steps_per_tick = config, steps_per_tick
        controls["play"].observe(self._on_play, names="value")
        controls["alpha"].observe(self._on_knob, names="value")
        controls["noise"].observe(self._on_knob, names="value")
        controls["reset"].on_click(lambda _: self.reset())
        self.reset(initial_steps)

    def reset(self, steps: int = 0) -> None:
        """Start a fresh experiment with the current alpha and noise, run ``steps`` steps and redraw."""
        self.experiment = BalanceExperiment(replace(self.config, alpha=self.controls["alpha"].value,
                                                    jitter_eps=self.controls["noise"].value))
        self.controls["play"].value = 0
        self.run(steps)

    def run(self, steps: int) -> None:
        """Run ``steps`` training steps and redraw."""
        if steps:
            self.experiment.step(steps)
        self.redraw()

    def _on_play(self, change: dict) -> None:
        if change["new"] > change["old"]:
            self.run(self.steps_per_tick * (change["new"] - change["old"]))

    def _on_knob(self, change: dict) -> None:
        # applies from the next step on: the router keeps what it has learned so far
        self.experiment.config.alpha = self.controls["alpha"].value
        self.experiment.config.jitter_eps = self.experiment.layer.jitter_eps = self.controls["noise"].value
        self.redraw()

    def redraw(self) -> None:
        h, c = self.experiment.history, self.experiment.config
        self.last = {"step": len(h.load), "alpha": c.alpha, "noise": c.jitter_eps,
                     "load": h.load[-1] if h.load else None,
                     "task_loss": h.task_loss[-1] if h.load else None,
                     "aux_loss": h.aux_loss[-1] if h.load else None,
                     "max_vio": h.max_vio[-1] if h.load else None}
        text = f"<b>step {self.last['step']} | alpha {c.alpha:g} | jitter eps {c.jitter_eps:g}"
        if h.load:
            text += (f" | task loss {h.task_loss[-1]:.4f} | aux loss {h.aux_loss[-1]:.3f} | "
                     f"MaxVio {h.max_vio[-1]:.2f}")
        self.show_figure(draw_history(self.experiment), text + "</b>")


def balance_dashboard(
    config: BalanceConfig | None = None,
    *,
    steps_per_tick: int = 5,
    max_ticks: int = 60,
    initial_steps: int = 50,
    interval_ms: int = 300,
) -> BalanceDashboard:
    """A training dashboard over :class:`BalanceExperiment`: press play to train ``steps_per_tick`` steps per
    tick (up to ``max_ticks`` ticks), move the alpha / noise sliders while it trains, reset to start over.
    The first render already shows ``initial_steps`` steps."""
    config = config or BalanceConfig()
    if config.alpha not in ALPHAS:
        raise ValueError(f"config.alpha must be one of {ALPHAS} for the dashboard, got {config.alpha!r}")
    style = {"description_width": "initial"}
    controls = {
        "play": widgets.Play(value=0, min=0, max=max_ticks, step=1, interval=interval_ms, description="train"),
        "reset": widgets.Button(description="reset", tooltip="start a fresh router with the current settings"),
        "alpha": widgets.SelectionSlider(options=[(f"{a:g}", a) for a in ALPHAS], value=config.alpha,
                                         description="aux loss alpha", style=style),
        "noise": widgets.FloatSlider(value=config.jitter_eps, min=0.0, max=0.5, step=0.05,
                                     description="jitter eps", style=style, continuous_update=False),
    }
    return BalanceDashboard(controls, config, steps_per_tick, initial_steps)
