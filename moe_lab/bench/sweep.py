"""Scaling sweep: the MoE rows' forward+backward time over the dense FFN's as tokens, experts, k and the
granularity grow.

One axis at a time around a base config (the others held at the base), every point a full
:func:`~moe_lab.bench.core.run_benchmark` (interleaved rows, medians). The ``granularity`` axis is DeepSeekMoE's
fine-grained family at equal active FLOPs (:func:`moe_lab.config.fine_grained`): ``m`` splits each of the
:data:`FINE_GRAINED_BASE` ``E = 16`` experts (top-1) of the base width into ``m`` experts of width ``d_ff / m``,
top ``m``. Each point records the machine's load average before and after it (``os.getloadavg``), and with
``max_load`` waits for the load to drop first: a timing taken while other processes share the cores is noise.
:func:`plot_sweep` draws one panel per axis with the ratio to dense; :func:`format_sweep` prints the same numbers.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

from ..config import fine_grained
from .core import BenchConfig, BenchRow, run_benchmark

AXES = {"tokens": (1024, 2048, 4096, 8192, 16384, 32768), "experts": (8, 16, 32, 64, 128), "k": (1, 2, 4, 8),
        "granularity": (1, 2, 4, 8)}
QUICK_AXES = {"tokens": (64, 128), "experts": (4, 8), "k": (1, 2), "granularity": (1, 2)}
FINE_GRAINED_BASE = {"experts": 16, "k": 1}
"""Where the ``granularity`` axis starts (issue 26's family: ``m = 8`` is 128 experts of width ``d_ff / 8``, top-8)."""


@dataclass
class SweepPoint:
    """One point of the sweep: ``axis`` set to ``value``, the other sizes at the base; its benchmark rows."""

    axis: str
    value: int
    rows: list[BenchRow]
    load: tuple[float, float] = (0.0, 0.0)
    """The 1-minute load average before and after the point."""

    def ratio(self, implementation: str) -> float | None:
        """Forward+backward time of ``implementation`` over the dense FFN's (None when either is missing)."""
        times = {r.implementation: r.fwd_bwd_ms for r in self.rows}
        if not times.get(implementation) or not times.get("dense"):
            return None
        return times[implementation] / times["dense"]


def sweep_configs(base: BenchConfig, axes: dict[str, tuple[int, ...]] = AXES) -> list[tuple[str, int, BenchConfig]]:
    """``(axis, value, config)`` for every value of every axis, the other sizes at ``base``; points with
    ``k > experts`` are left out."""
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ValueError(f"sweep axes must be among {tuple(AXES)}, got {sorted(unknown)}")
    points = []
    for axis, values in axes.items():
        for value in values:
            if axis == "granularity":
                experts, k, d_ff = fine_grained(FINE_GRAINED_BASE["experts"], FINE_GRAINED_BASE["k"], base.d_ff, value)
                cfg = replace(base, experts=experts, k=k, d_ff=d_ff)
            else:
                cfg = replace(base, **{axis: value})
            if cfg.k <= cfg.experts:
                points.append((axis, value, cfg))
    return points


def wait_for_load(max_load: float | None, timeout_s: float = 600.0, poll_s: float = 5.0) -> float:
    """The 1-minute load average, after waiting (up to ``timeout_s``) for it to fall to ``max_load`` or below
    (no wait when ``max_load`` is None)."""
    deadline = time.monotonic() + timeout_s
    while max_load is not None and os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(poll_s)
    return os.getloadavg()[0]


def run_sweep(base: BenchConfig, implementations: tuple[str, ...] = ("dense", "sorted"),
              axes: dict[str, tuple[int, ...]] = AXES, max_load: float | None = None) -> list[SweepPoint]:
    """Benchmark ``implementations`` (with ``"dense"``, the reference of every ratio) at every sweep point,
    each after :func:`wait_for_load` ``(max_load)``."""
    if "dense" not in implementations:
        implementations = ("dense", *implementations)
    points = []
    for axis, value, cfg in sweep_configs(base, axes):
        before = wait_for_load(max_load)
        rows = run_benchmark(cfg, implementations)
        points.append(SweepPoint(axis, value, rows, (before, os.getloadavg()[0])))
    return points


def _implementations(points: list[SweepPoint]) -> list[str]:
    return [r.implementation for r in points[0].rows if r.implementation != "dense"] if points else []


def format_sweep(points: list[SweepPoint]) -> str:
    """A plain-text table: per point the dense forward+backward ms and each row's ms and ratio to dense."""
    names = _implementations(points)
    header = (f"{'axis':<11} {'value':>6} {'E':>4} {'k':>3} {'d_ff':>5} {'dense ms':>10}"
              + "".join(f" {n + ' ms':>16} {'/dense':>7}" for n in names) + f" {'load':>11}")
    lines = [header, "-" * len(header)]
    for p in points:
        by_name = {r.implementation: r for r in p.rows}
        first = p.rows[0]
        line = (f"{p.axis:<11} {p.value:>6} {first.experts:>4} {first.k:>3} {first.d_ff:>5} "
                f"{by_name['dense'].fwd_bwd_ms:>10.2f}")
        for n in names:
            ms, ratio = by_name[n].fwd_bwd_ms, p.ratio(n)
            line += f" {ms:>16.2f} {ratio:>6.2f}x" if ms else f" {'skipped':>16} {'-':>7}"
        lines.append(line + f" {p.load[0]:>5.2f}-{p.load[1]:<5.2f}")
    return "\n".join(lines)


def plot_sweep(points: list[SweepPoint], path: str, title: str = "") -> None:
    """Save a figure at ``path``: one panel per axis, forward+backward time over dense against the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(dict.fromkeys(p.axis for p in points))
    fig, panels = plt.subplots(1, len(axes_names), figsize=(4.2 * len(axes_names), 3.6), squeeze=False)
    for panel, axis in zip(panels[0], axes_names):
        on_axis = [p for p in points if p.axis == axis]
        for name in _implementations(points):
            xs = [p.value for p in on_axis if p.ratio(name) is not None]
            panel.plot(xs, [p.ratio(name) for p in on_axis if p.ratio(name) is not None], "o-", label=name)
        panel.axhline(1.0, color="gray", lw=1, ls="--")
        panel.set_xscale("log", base=2)
        panel.set_xticks([p.value for p in on_axis], [str(p.value) for p in on_axis])
        panel.set_xlabel(axis)
        panel.set_ylabel("fwd+bwd time / dense")
        panel.grid(alpha=0.3)
    panels[0][0].legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
