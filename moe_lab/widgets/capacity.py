"""Capacity dashboard (notebook 05): each expert's queue, the capacity line, and the slots that overflow.

``capacity_snapshot(...)`` is the pure computation; ``capacity_dashboard(...)`` redraws it live.
Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..dispatch import DROP_POLICIES, expert_capacity, queue_positions
from ..metrics import drop_rate, tokens_per_expert, unrouted_fraction
from ._display import FigureDashboard


@dataclass
class CapacitySnapshot:
    """One batch under one capacity factor.

    capacity: slots per expert.  positions: ``[T, k]`` place of each slot in its expert's queue.
    keep: ``[T, k]`` bool (``positions < capacity``).  routed / kept: ``[E]`` slots routed to / kept by each
    expert.  drop_rate: fraction of slots dropped.  unrouted: fraction of tokens that lost all k slots.
    """

    capacity_factor: float
    policy: str
    capacity: int
    positions: torch.Tensor
    keep: torch.Tensor
    routed: torch.Tensor
    kept: torch.Tensor
    drop_rate: float
    unrouted: float


def capacity_snapshot(
    experts: torch.Tensor,
    probs: torch.Tensor,
    num_experts: int,
    capacity_factor: float = 1.0,
    policy: str = "position",
) -> CapacitySnapshot:
    """Apply expert capacity to a routing decision. experts, probs: ``[T, k]`` (probs: router probability of
    each selected slot, used by the policies ``"probability"`` and ``"batch_priority"``)."""
    num_tokens, k = experts.shape
    capacity = expert_capacity(num_tokens, num_experts, capacity_factor, k)
    positions = queue_positions(experts, num_experts, probs, policy)
    keep = positions < capacity
    routed = tokens_per_expert(experts, num_experts)
    kept = torch.minimum(routed, torch.tensor(capacity))
    return CapacitySnapshot(capacity_factor, policy, capacity, positions, keep, routed, kept,
                            drop_rate(~keep), unrouted_fraction(~keep))


def draw_queues(snap: CapacitySnapshot, experts: torch.Tensor) -> Figure:
    """One column per expert: a square per routed slot at its queue position (kept: blue, first choice dark;
    dropped: red), and the capacity line."""
    num_experts = snap.routed.numel()
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    for (t, j), e in zip(torch.cartesian_prod(torch.arange(experts.shape[0]), torch.arange(experts.shape[1])).tolist(),
                         experts.reshape(-1).tolist()):
        kept = bool(snap.keep[t, j])
        color = ("tab:blue" if j == 0 else "lightsteelblue") if kept else "tab:red"
        ax.add_patch(Rectangle((e - 0.4, int(snap.positions[t, j])), 0.8, 1, facecolor=color, edgecolor="white",
                               linewidth=0.6))
    for color, label in (("tab:blue", "1st choice"), ("lightsteelblue", "2nd+ choice"), ("tab:red", "dropped")):
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor=color, label=label))
    ax.axhline(snap.capacity, color="black", linestyle="--", label=f"capacity C = {snap.capacity}")
    ax.set_xlim(-0.6, num_experts - 0.4)
    ax.set_ylim(0, 1.3 * max(int(snap.routed.max()), snap.capacity) + 1)
    ax.set(xlabel="expert", ylabel="queue position", xticks=range(num_experts),
           title=f"capacity factor {snap.capacity_factor:g}, priority: {snap.policy}")
    ax.legend(loc="upper right", fontsize=8)
    return fig


class CapacityDashboard(FigureDashboard):
    """Controls ``capacity_factor`` and ``policy``; ``last`` is the :class:`CapacitySnapshot` drawn last."""

    def __init__(self, controls, experts: torch.Tensor, probs: torch.Tensor, num_experts: int):
        super().__init__(controls, [["capacity_factor", "policy"]])
        self.experts, self.probs, self.num_experts = experts, probs, num_experts
        self.redraw_on_change()

    def update(self, change: dict | None = None) -> None:
        """Recompute and redraw from the current control values."""
        snap = capacity_snapshot(self.experts, self.probs, self.num_experts,
                                 self.controls["capacity_factor"].value, self.controls["policy"].value)
        text = (f"<b>capacity {snap.capacity} slots per expert | drop rate {100 * snap.drop_rate:.1f}% of slots | "
                f"{100 * snap.unrouted:.1f}% of tokens lost every expert (only the residual carries them)</b>")
        self.show_figure(draw_queues(snap, self.experts), text)
        self.last = snap


def capacity_dashboard(
    experts: torch.Tensor, probs: torch.Tensor, num_experts: int, capacity_factor: float = 1.0,
    policy: str = "position",
) -> CapacityDashboard:
    """A live view of :func:`capacity_snapshot` for a fixed routing decision ``experts, probs: [T, k]``."""
    capacity_snapshot(experts, probs, num_experts, capacity_factor, policy)  # validate early
    style = {"description_width": "initial"}
    controls = {
        "capacity_factor": widgets.FloatSlider(value=capacity_factor, min=0.25, max=3.0, step=0.25,
                                               description="capacity factor", style=style, continuous_update=False),
        "policy": widgets.Dropdown(options=DROP_POLICIES, value=policy, description="priority", style=style),
    }
    return CapacityDashboard(controls, experts, probs, num_experts)
