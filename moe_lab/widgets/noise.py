"""Noise dashboard (notebook 03): how the scale of noisy top-k noise spreads tokens over experts.

``noise_snapshot(...)`` is the pure computation; ``noise_dashboard(...)`` redraws it live.
Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from ..metrics import max_over_mean, routing_entropy, tokens_per_expert
from ..routing import add_gating_noise, check_k, softmax_topk
from ..validation import check_number
from ._display import FigureDashboard


@dataclass
class NoiseSnapshot:
    """Routing of one batch with noise ``H = clean + scale * N(0, 1) * noise_std``.

    load: ``[E]`` token-slots per expert.  token_entropy: mean entropy (nats) of each token's softmax over
    ``H``.  load_entropy: entropy of the load distribution ``load / sum(load)`` (``log E`` = perfectly even).
    changed: fraction of tokens whose selected set differs from the noiseless choice (exploration).
    """

    scale: float
    load: torch.Tensor
    token_entropy: float
    load_entropy: float
    max_over_mean: float
    changed: float


def noise_snapshot(
    clean: torch.Tensor, noise_std: torch.Tensor, k: int = 1, scale: float = 1.0, seed: int = 0
) -> NoiseSnapshot:
    """Route ``clean: [T, E]`` logits with noise ``scale * N(0, 1) * noise_std`` (``noise_std: [T, E]`` or a
    broadcastable tensor) and summarise. ``scale = 0`` is the deterministic (evaluation) routing."""
    check_k(k, clean.shape[-1])
    check_number("scale", scale, 0)
    clean = clean.float()
    std = torch.as_tensor(noise_std, dtype=torch.float32).expand_as(clean)
    noisy = add_gating_noise(clean, scale * std, torch.Generator().manual_seed(seed))
    probs, _, experts = softmax_topk(noisy, k)
    base = clean.topk(k, dim=-1).indices.sort(dim=-1).values
    changed = float((experts.sort(dim=-1).values != base).any(dim=-1).float().mean())
    load = tokens_per_expert(experts, clean.shape[-1])
    load_entropy = routing_entropy((load.float() / load.sum())[None])  # entropy of the load distribution
    return NoiseSnapshot(scale, load, routing_entropy(probs), load_entropy, max_over_mean(load), changed)


def draw_noise(snap: NoiseSnapshot, num_tokens: int, k: int) -> Figure:
    """Bars of tokens per expert with the ideal load ``T*k/E``."""
    num_experts = snap.load.numel()
    fig = Figure(figsize=(6, 2.8), layout="constrained")
    ax = fig.subplots()
    ideal = num_tokens * k / num_experts
    ax.bar(range(num_experts), snap.load.tolist(), color="tab:blue")
    ax.axhline(ideal, color="black", linestyle="--", label=f"ideal T*k/E = {ideal:.0f}")
    ax.set(xlabel="expert", ylabel="token-slots", title=f"noise scale {snap.scale:.2f}")
    ax.set_ylim(0, max(num_tokens * k * 0.6, 1.2 * float(snap.load.max())))
    ax.legend(fontsize=8)
    return fig


class NoiseDashboard(FigureDashboard):
    """Controls ``scale`` and ``k``; ``last`` is the :class:`NoiseSnapshot` drawn last."""

    def __init__(self, controls, clean: torch.Tensor, noise_std: torch.Tensor, seed: int):
        super().__init__(controls, [["scale", "k"]])
        self.clean, self.noise_std, self.seed = clean, noise_std, seed
        self.redraw_on_change()

    def update(self, change: dict | None = None) -> None:
        """Recompute and redraw from the current control values."""
        k, scale = self.controls["k"].value, self.controls["scale"].value
        snap = noise_snapshot(self.clean, self.noise_std, k, scale, self.seed)
        text = (f"<b>max/mean load {snap.max_over_mean:.2f} | load entropy {snap.load_entropy:.2f} / "
                f"{math.log(snap.load.numel()):.2f} nats | token entropy {snap.token_entropy:.2f} nats | "
                f"{100 * snap.changed:.0f}% of tokens routed differently than without noise</b>")
        self.show_figure(draw_noise(snap, self.clean.shape[0], k), text)
        self.last = snap


def noise_dashboard(
    clean: torch.Tensor, noise_std: torch.Tensor | float = math.log(2), k: int = 1, scale: float = 1.0, *, seed: int = 0
) -> NoiseDashboard:
    """A live view of :func:`noise_snapshot` for fixed ``clean: [T, E]`` logits and ``noise_std``
    (default ``softplus(0) = log 2``, the noise scale of a zero-initialised ``W_noise``)."""
    noise_std = torch.as_tensor(noise_std, dtype=torch.float32)
    noise_snapshot(clean, noise_std, k, scale, seed)  # validate early
    style = {"description_width": "initial"}
    controls = {
        "scale": widgets.FloatSlider(value=scale, min=0.0, max=5.0, step=0.1, description="noise scale",
                                     style=style, continuous_update=False),
        "k": widgets.IntSlider(value=k, min=1, max=clean.shape[-1], description="top-k", style=style,
                               continuous_update=False),
    }
    return NoiseDashboard(controls, clean, noise_std, seed)
