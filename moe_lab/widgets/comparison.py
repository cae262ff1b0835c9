"""Comparison dashboard (notebook 13): the training curves of a stored comparison (``run_comparison``'s result, e.g.
``load_result("capstone")``) against steps, training FLOPs or seconds, for the chosen models and seeds.

``comparison_curves(...)`` is the pure computation; ``comparison_dashboard(...)`` redraws it live.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from ..validation import check_int
from ._display import FigureDashboard

X_AXES = {"steps": "optimiser step", "flops": "training FLOPs", "seconds": "wall-clock seconds (mean over seeds)"}
"""The x-axes a comparison can be read against: ``name: axis label``."""


@dataclass
class ArmCurves:
    """One model's curves over the chosen seeds. ``x: [steps]`` (steps, cumulative training FLOPs, or cumulative
    seconds averaged over the seeds); ``ce: [seeds, steps]`` training CE smoothed over ``window`` steps;
    ``mean``, ``low``, ``high``: ``[steps]`` mean, minimum and maximum over seeds; ``val``: ``[(x, mean
    validation CE)]`` at the evaluation points; ``val_ce``: the final validation CE per seed."""

    arm: str
    x: torch.Tensor
    ce: torch.Tensor
    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    val: list[tuple[float, float]]
    val_ce: list[float]


def _smooth(values: Sequence[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def comparison_curves(result: dict[str, Any], x: str = "steps", arms: Sequence[str] | None = None,
                      seeds: Sequence[int] | None = None, window: int = 10) -> dict[str, ArmCurves]:
    """``{arm: ArmCurves}`` of ``result`` (``run_comparison``'s data) for ``arms`` (default all) and ``seeds``
    (seed values, default all) against ``x`` (a key of :data:`X_AXES`); training CE smoothed by a trailing mean
    over ``window`` steps."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {tuple(X_AXES)}, got {x!r}")
    check_int("window", window, 1)
    arms = list(result["arms"]) if arms is None else list(arms)
    if not arms or any(a not in result["arms"] for a in arms):
        raise ValueError(f"arms must be a non-empty selection of {tuple(result['arms'])}, got {arms!r}")
    known = result["setup"]["seeds"]
    seeds = list(known) if seeds is None else list(seeds)
    if not seeds or any(s not in known for s in seeds):
        raise ValueError(f"seeds must be a non-empty selection of {known}, got {seeds!r}")
    out = {}
    for arm in arms:
        info = result["arms"][arm]
        runs = [r for r in result["runs"][arm] if r["seed"] in seeds]
        steps = info["steps"]
        ce = torch.tensor([_smooth(r["train_ce"], window) for r in runs], dtype=torch.float64)
        if x == "steps":
            per_step = torch.ones(steps, dtype=torch.float64)
        elif x == "flops":
            per_step = torch.full((steps,), float(info["flops_per_step"]), dtype=torch.float64)
        else:
            per_step = torch.tensor([r["step_time"] for r in runs], dtype=torch.float64).mean(0)
        xs = per_step.cumsum(0)
        val = [(float(xs[step - 1]), statistics.fmean(dict(r["val"])[step] for r in runs))
               for step, _ in runs[0]["val"]]
        out[arm] = ArmCurves(arm, xs, ce, ce.mean(0), ce.min(0).values, ce.max(0).values, val,
                             [r["val_ce"] for r in runs])
    return out


def draw_comparison(curves: dict[str, ArmCurves], x: str) -> Figure:
    """Training CE (mean, band: min to max over seeds) and the validation points, against ``x``."""
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    for c in curves.values():
        line, = ax.plot(c.x.tolist(), c.mean.tolist(), label=c.arm, lw=1.2)
        if c.ce.shape[0] > 1:
            ax.fill_between(c.x.tolist(), c.low.tolist(), c.high.tolist(), color=line.get_color(), alpha=0.2)
        ax.plot(*zip(*c.val), "o", color=line.get_color(), ms=4)
    top = max(float(c.mean[len(c.mean) // 10]) for c in curves.values())
    bottom = min(min(v for _, v in c.val) for c in curves.values())
    ax.set(xlabel=X_AXES[x], ylabel="cross-entropy (nats/byte)", ylim=(bottom - 0.1, top + 0.1),
           title="training CE (lines, band: min to max over seeds), validation CE (dots)")
    ax.legend(fontsize=8)
    return fig


class ComparisonDashboard(FigureDashboard):
    """Controls ``x`` (the x-axis), ``arms`` and ``seeds``; ``last`` is the ``{arm: ArmCurves}`` drawn last."""

    def __init__(self, controls, result: dict[str, Any]):
        super().__init__(controls, [["x", "seeds"], ["arms"]])
        self.result = result
        self.redraw_on_change()

    def update(self, change: dict | None = None) -> None:
        """Recompute and redraw from the current control values (an empty selection shows every arm / seed)."""
        x = self.controls["x"].value
        arms = list(self.controls["arms"].value) or None
        seeds = self.controls["seeds"].value
        curves = comparison_curves(self.result, x, arms, None if seeds == "all" else [seeds])
        ends = "; ".join(f"{c.arm}: {statistics.fmean(c.val_ce):.3f}" for c in curves.values())
        self.show_figure(draw_comparison(curves, x), f"<b>final validation CE (mean over the seeds shown): {ends}</b>")
        self.last = curves


def comparison_dashboard(result: dict[str, Any], x: str = "steps") -> ComparisonDashboard:
    """A live view of :func:`comparison_curves` over a stored comparison ``result``."""
    comparison_curves(result, x)  # validate early
    style = {"description_width": "initial"}
    controls = {
        "x": widgets.Dropdown(options=[("steps", "steps"), ("FLOPs", "flops"), ("seconds", "seconds")], value=x,
                              description="x-axis", style=style),
        "seeds": widgets.Dropdown(options=[("all (mean, band)", "all")]
                                  + [(f"seed {s}", s) for s in result["setup"]["seeds"]],
                                  value="all", description="seeds", style=style),
        "arms": widgets.SelectMultiple(options=list(result["arms"]), value=list(result["arms"]),
                                       description="models", rows=len(result["arms"]), style=style),
    }
    return ComparisonDashboard(controls, result)
