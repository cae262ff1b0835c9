"""Scaling sweep: the MoE rows' forward+backward time over the dense FFN's as tokens, experts and k grow.

One axis at a time around a base config (the others held at the base), every point a full
:func:`~moe_lab.bench.core.run_benchmark` (interleaved rows, medians). :func:`plot_sweep` draws one panel per
axis with the ratio to dense; :func:`format_sweep` prints the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .core import BenchConfig, BenchRow, run_benchmark

AXES = {"tokens": (1024, 2048, 4096, 8192, 16384, 32768), "experts": (8, 16, 32, 64, 128), "k": (1, 2, 4, 8)}
QUICK_AXES = {"tokens": (64, 128), "experts": (4, 8), "k": (1, 2)}


@dataclass
class SweepPoint:
    """One point of the sweep: ``axis`` set to ``value``, the other sizes at the base; its benchmark rows."""

    axis: str
    value: int
    rows: list[BenchRow]

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
            cfg = replace(base, **{axis: value})
            if cfg.k <= cfg.experts:
                points.append((axis, value, cfg))
    return points


def run_sweep(base: BenchConfig, implementations: tuple[str, ...] = ("dense", "sorted"),
              axes: dict[str, tuple[int, ...]] = AXES) -> list[SweepPoint]:
    """Benchmark ``implementations`` (with ``"dense"``, the reference of every ratio) at every sweep point."""
    if "dense" not in implementations:
        implementations = ("dense", *implementations)
    return [SweepPoint(axis, value, run_benchmark(cfg, implementations))
            for axis, value, cfg in sweep_configs(base, axes)]


def _implementations(points: list[SweepPoint]) -> list[str]:
    return [r.implementation for r in points[0].rows if r.implementation != "dense"] if points else []


def format_sweep(points: list[SweepPoint]) -> str:
    """A plain-text table: per point the dense forward+backward ms and each row's ms and ratio to dense."""
    names = _implementations(points)
    header = f"{'axis':<8} {'value':>6} {'dense ms':>10}" + "".join(f" {n + ' ms':>16} {'/dense':>7}" for n in names)
    lines = [header, "-" * len(header)]
    for p in points:
        by_name = {r.implementation: r for r in p.rows}
        dense = by_name["dense"].fwd_bwd_ms
        line = f"{p.axis:<8} {p.value:>6} {dense:>10.2f}"
        for n in names:
            ms, ratio = by_name[n].fwd_bwd_ms, p.ratio(n)
            line += f" {ms:>16.2f} {ratio:>6.2f}x" if ms else f" {'skipped':>16} {'-':>7}"
        lines.append(line)
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
