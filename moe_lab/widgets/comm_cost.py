"""Communication-cost dashboard (notebook 08): predicted expert-parallel step time and communication share
against interconnect bandwidth, from the alpha-beta model of :mod:`moe_lab.cost_model`.

``comm_cost_sweep(...)`` is the pure computation; ``comm_cost_dashboard(...)`` redraws it live.
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from ..cost_model import LINKS, StepEstimate, ep_step_time
from ..parallel import all_to_all_bytes
from ._display import FigureDashboard

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
WORLD_SIZES = (2, 4, 8, 16, 32, 64)


@dataclass
class CommCostSweep:
    """One configuration. bytes_per_all_to_all: rows one rank holds per all-to-all (``T k d bytes``, its own share
    included). estimate: the step at ``bandwidth_gbps``. bandwidths_gbps / total_ms / comm_share: the curve."""

    compute_ms: float
    world_size: int
    latency_us: float
    bandwidth_gbps: float
    bytes_per_all_to_all: int
    estimate: StepEstimate
    bandwidths_gbps: np.ndarray
    total_ms: np.ndarray
    comm_share: np.ndarray


def comm_cost_sweep(compute_ms: float, tokens: int, k: int, d_model: int, bytes_per_element: int,
                    world_size: int, latency_us: float, bandwidth_gbps: float,
                    bandwidths_gbps: np.ndarray | None = None) -> CommCostSweep:
    """Step time (compute + 4 all-to-alls, no overlap) at ``bandwidth_gbps`` and over ``bandwidths_gbps``
    (default 0.5 to 1000 GB/s, log-spaced). Times in ms, latency in microseconds, bandwidth in GB/s (1e9 B/s)."""
    sweep = np.geomspace(0.5, 1000, 60) if bandwidths_gbps is None else np.asarray(bandwidths_gbps, dtype=float)
    n = all_to_all_bytes(tokens, k, d_model, bytes_per_element)

    def at(gbps: float) -> StepEstimate:
        return ep_step_time(compute_ms * 1e-3, n, world_size, latency_us * 1e-6, gbps * 1e9)

    curve = [at(b) for b in sweep]
    return CommCostSweep(compute_ms, world_size, latency_us, bandwidth_gbps, n, at(bandwidth_gbps), sweep,
                         np.array([e.total_s * 1e3 for e in curve]), np.array([e.comm_share for e in curve]))


def draw_sweep(s: CommCostSweep) -> Figure:
    """Step time (left axis, log) and communication share (right axis) against bandwidth, with the published
    and nominal links of :data:`moe_lab.cost_model.LINKS` marked."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(s.bandwidths_gbps, s.total_ms, color="tab:blue", label="step time (compute + all-to-alls)")
    ax.axhline(s.compute_ms, color="tab:blue", linestyle=":", label="compute alone")
    ax.plot([s.bandwidth_gbps], [s.estimate.total_s * 1e3], "o", color="tab:blue")
    ax.set(xscale="log", yscale="log", xlabel="all-to-all bandwidth per rank (GB/s)", ylabel="step time (ms)",
           title=f"{s.world_size} ranks, {s.bytes_per_all_to_all / 2**20:.0f} MiB per all-to-all, "
                 f"latency {s.latency_us:g} us")
    share = ax.twinx()
    share.plot(s.bandwidths_gbps, 100 * s.comm_share, color="tab:red", label="communication share")
    share.plot([s.bandwidth_gbps], [100 * s.estimate.comm_share], "o", color="tab:red")
    share.set(ylabel="communication share (%)", ylim=(0, 100))
    for link in LINKS.values():
        ax.axvline(link.bandwidth / 1e9, color="grey", linewidth=0.8, alpha=0.6)
        ax.annotate(link.name, (link.bandwidth / 1e9, ax.get_ylim()[1]), rotation=90, fontsize=7,
                    va="top", ha="right", color="grey")
    lines = ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="lower left")
    return fig


class CommCostDashboard(FigureDashboard):
    """Controls over :func:`comm_cost_sweep`; ``last`` is the :class:`CommCostSweep` drawn last."""

    def __init__(self, controls):
        super().__init__(controls, [["bandwidth_gbps", "latency_us", "world_size"],
                                    ["tokens", "k", "d_model"], ["dtype", "compute_ms"]])
        self.redraw_on_change()

    def update(self, change: dict | None = None) -> None:
        """Recompute and redraw from the current control values."""
        c = {name: control.value for name, control in self.controls.items()}
        s = comm_cost_sweep(c["compute_ms"], c["tokens"], c["k"], c["d_model"], DTYPE_BYTES[c["dtype"]],
                            c["world_size"], c["latency_us"], c["bandwidth_gbps"])
        e = s.estimate
        text = (f"<b>{s.bytes_per_all_to_all / 2**20:.1f} MiB per all-to-all per rank x 4 per step | "
                f"at {s.bandwidth_gbps:.3g} GB/s: communication {e.comm_s * 1e3:.2f} ms + compute "
                f"{e.compute_s * 1e3:.2f} ms = {e.total_s * 1e3:.2f} ms per step, "
                f"{100 * e.comm_share:.0f}% communication (no overlap)</b>")
        self.show_figure(draw_sweep(s), text)
        self.last = s


def comm_cost_dashboard(compute_ms: float = 15.15, tokens: int = 16384, k: int = 6, d_model: int = 2048,
                        dtype: str = "bf16", world_size: int = 8, latency_us: float = 10.0,
                        bandwidth_gbps: float = 153.0) -> CommCostDashboard:
    """A live view of :func:`comm_cost_sweep`. The defaults: one DeepSeekMoE-16B-sized MoE layer (64 experts of
    width 1408, top-6) with 16,384 tokens per rank, whose forward + backward took 15.15 ms on an H100 (README
    benchmark), over DeepEP's measured NVLink bandwidth."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    if world_size not in WORLD_SIZES:
        raise ValueError(f"world_size must be one of {WORLD_SIZES}, got {world_size!r}")
    comm_cost_sweep(compute_ms, tokens, k, d_model, DTYPE_BYTES[dtype], world_size, latency_us, bandwidth_gbps)
    style = {"description_width": "initial"}

    def log_slider(value, lo, hi, label):
        return widgets.FloatLogSlider(value=value, base=10, min=np.log10(lo), max=np.log10(hi), step=0.05,
                                      description=label, style=style, continuous_update=False, readout_format=".3g")

    controls = {
        "bandwidth_gbps": log_slider(bandwidth_gbps, 0.5, 1000, "bandwidth (GB/s)"),
        "latency_us": log_slider(latency_us, 1, 1000, "latency (us)"),
        "world_size": widgets.Dropdown(options=WORLD_SIZES, value=world_size, description="ranks", style=style),
        "tokens": widgets.Dropdown(options=sorted({1024, 4096, 16384, 65536, tokens}), value=tokens,
                                   description="tokens per rank", style=style),
        "k": widgets.IntSlider(value=k, min=1, max=max(8, k), description="top-k", style=style,
                               continuous_update=False),
        "d_model": widgets.Dropdown(options=sorted({1024, 2048, 4096, 7168, d_model}), value=d_model,
                                    description="d_model", style=style),
        "dtype": widgets.Dropdown(options=list(DTYPE_BYTES), value=dtype, description="rows in", style=style),
        "compute_ms": log_slider(compute_ms, 0.1, 1000, "compute (ms)"),
    }
    return CommCostDashboard(controls)
