"""Expert-load dashboard: how many tokens each expert receives under softmax top-k routing.

``routing_snapshot(...)`` is the pure computation (route a synthetic batch, count, measure);
``expert_load_dashboard(...)`` wraps it in ipywidgets controls and redraws on every change.
Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..losses import switch_aux_loss
from ..metrics import max_violation, routing_entropy, tokens_per_expert
from ..routing import Router, check_k, dense_gates, softmax_topk
from ..validation import check_choice, check_int, check_number
from ._display import FigureDashboard

DISTRIBUTIONS = ("gaussian", "clustered", "dominant")
NUM_CLUSTERS = 3


@dataclass
class RoutingSnapshot:
    """One routed batch and its load statistics.

    probs: ``[T, E]`` softmax over all experts.  gates: ``[T, k]``.  experts: ``[T, k]``.
    gate_matrix: ``[T, E]`` gate weight of each token on each expert (0 where not selected).
    tokens_per_expert: ``[E]`` token-slots per expert (sums to ``T*k``).  ideal_load: ``T*k/E``.
    max_violation: ``(max load - mean load) / mean load``.  entropy: mean router entropy in nats
    (``max_entropy = log E`` is a uniform router).  aux_loss: Switch ``N * sum_i f_i P_i`` (1 when uniform).
    """

    probs: torch.Tensor
    gates: torch.Tensor
    experts: torch.Tensor
    gate_matrix: torch.Tensor
    tokens_per_expert: torch.Tensor
    ideal_load: float
    max_violation: float
    entropy: float
    max_entropy: float
    aux_loss: float
    unused_experts: int

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def k(self) -> int:
        return self.experts.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @classmethod
    def from_routing(cls, probs: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor) -> "RoutingSnapshot":
        """Summarise a routing decision. probs: ``[T, E]``, gates / experts: ``[T, k]``."""
        num_tokens, num_experts = probs.shape
        load = tokens_per_expert(experts, num_experts)
        gate_matrix = dense_gates(gates, experts, num_experts)
        return cls(
            probs=probs,
            gates=gates,
            experts=experts,
            gate_matrix=gate_matrix,
            tokens_per_expert=load,
            ideal_load=experts.numel() / num_experts,
            max_violation=max_violation(load),
            entropy=routing_entropy(probs),
            max_entropy=math.log(num_experts),
            aux_loss=float(switch_aux_loss(probs, experts)),
            unused_experts=int((load == 0).sum()),
        )


def _tokens(distribution: str, num_tokens: int, d_model: int, gen: torch.Generator) -> torch.Tensor:
    """Synthetic router inputs ``[T, d_model]`` with per-coordinate scale about 1."""
    noise = torch.randn(num_tokens, d_model, generator=gen)
    if distribution == "gaussian":
        return noise
    if distribution == "clustered":  # a few tight clusters: tokens of a cluster pick the same experts
        centres = torch.randn(NUM_CLUSTERS, d_model, generator=gen)
        which = torch.randint(NUM_CLUSTERS, (num_tokens,), generator=gen)
        return centres[which] + 0.3 * noise
    # "dominant": every token shares one large component (like an un-normalised mean direction)
    direction = torch.randn(d_model, generator=gen)
    return noise + 3.0 * direction


def routing_snapshot(
    num_experts: int = 8,
    k: int = 2,
    logit_scale: float = 1.0,
    distribution: str = "gaussian",
    num_tokens: int = 256,
    d_model: int = 32,
    seed: int = 0,
) -> RoutingSnapshot:
    """Route ``num_tokens`` synthetic tokens through a freshly initialised ``moe_lab.Router``.

    Logits are ``logit_scale * router(x)`` (a larger scale = a lower softmax temperature), gated with softmax
    over all experts, top-k and renormalisation (Mixtral). ``distribution``: ``"gaussian"`` (isotropic),
    ``"clustered"`` (3 tight clusters) or ``"dominant"`` (a shared direction dominates every token).
    Deterministic given ``seed``; the global RNG is left untouched.
    """
    for name, value in (("num_experts", num_experts), ("num_tokens", num_tokens), ("d_model", d_model)):
        check_int(name, value, 1)
    check_k(k, num_experts)
    check_number("logit_scale", logit_scale, 0, low_open=True)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_int("seed", seed, 0)
    gen = torch.Generator().manual_seed(seed)
    x = _tokens(distribution, num_tokens, d_model, gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(d_model, num_experts)
    with torch.no_grad():
        logits = logit_scale * router(x)
    probs, gates, experts = softmax_topk(logits, k)
    return RoutingSnapshot.from_routing(probs, gates, experts)


def draw_snapshot(snap: RoutingSnapshot, title: str = "") -> Figure:
    """Bar chart of tokens per expert (with the ideal load ``T*k/E``) and a token x expert gate heat map."""
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    ax_bar, ax_map = fig.subplots(1, 2, width_ratios=(1.1, 1))
    load = snap.tokens_per_expert.tolist()
    ids = range(snap.num_experts)
    over = [n > 1.5 * snap.ideal_load for n in load]
    ax_bar.bar(ids, load, color=["tab:red" if o else "tab:blue" for o in over])
    for color, label in (("tab:blue", "load <= 1.5x ideal"), ("tab:red", "load > 1.5x ideal")):
        ax_bar.bar([0], [0], color=color, label=label)  # legend entries, drawn with zero height
    ax_bar.axhline(snap.ideal_load, color="black", linestyle="--", label=f"ideal T*k/E = {snap.ideal_load:.1f}")
    ax_bar.set(xlabel="expert", ylabel="token-slots", title="tokens per expert")
    ax_bar.set_ylim(0, 1.25 * max(max(load), snap.ideal_load))
    ax_bar.legend(loc="upper right", fontsize=8)
    order = torch.argsort(snap.experts[:, 0], stable=True)  # group tokens by their top expert
    image = ax_map.imshow(snap.gate_matrix[order].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
    ax_map.set(xlabel="expert", ylabel="token (sorted by top expert)", title="gate weights")
    for ax in (ax_bar, ax_map):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax_map, fraction=0.05)
    fig.suptitle(title, fontsize=10)
    return fig


def _summary(snap: RoutingSnapshot) -> str:
    loads = snap.tokens_per_expert
    return (
        f"MaxVio {snap.max_violation:.2f} | entropy {snap.entropy:.2f} / {snap.max_entropy:.2f} nats | "
        f"load min {int(loads.min())} / max {int(loads.max())} (ideal {snap.ideal_load:.1f}) | "
        f"unused experts {snap.unused_experts} | Switch aux loss {snap.aux_loss:.2f}"
    )


class ExpertLoadDashboard(FigureDashboard):
    """The dashboard widget. ``controls``: name -> ipywidget; ``last``: the :class:`RoutingSnapshot` drawn last;
    ``png``: that drawing as PNG bytes (also offered as a static image for viewers without live widgets)."""

    def __init__(self, controls: dict[str, widgets.ValueWidget], d_model: int, seed: int):
        self.d_model, self.seed = d_model, seed
        super().__init__(controls, [["num_experts", "k", "logit_scale"], ["distribution", "num_tokens"]])
        self.redraw_on_change()

    def update(self, change: dict | None = None) -> None:
        """Recompute and redraw from the current control values."""
        c = {name: control.value for name, control in self.controls.items()}
        if c["k"] > c["num_experts"]:  # the k slider's max follows num_experts; it re-triggers update
            self.controls["k"].max = c["num_experts"]
            return
        self.controls["k"].max = c["num_experts"]
        snap = routing_snapshot(c["num_experts"], c["k"], c["logit_scale"], c["distribution"], c["num_tokens"],
                                self.d_model, self.seed)
        title = (f"E={snap.num_experts}, k={snap.k}, logit scale={c['logit_scale']:.3g}, "
                 f"{c['distribution']} tokens, T={snap.num_tokens}")
        self.show_figure(draw_snapshot(snap, title), f"<b>{_summary(snap)}</b>")
        self.last = snap


def expert_load_dashboard(
    num_experts: int = 8,
    k: int = 2,
    logit_scale: float = 1.0,
    distribution: str = "gaussian",
    num_tokens: int = 256,
    *,
    d_model: int = 32,
    seed: int = 0,
) -> ExpertLoadDashboard:
    """An interactive view of :func:`routing_snapshot`: tokens per expert, a routing heat map and balance
    metrics, redrawn whenever a control changes. The arguments are the initial control values."""
    routing_snapshot(num_experts, k, logit_scale, distribution, num_tokens, d_model, seed)  # validate early
    style = {"description_width": "initial"}
    controls = {
        "num_experts": widgets.IntSlider(value=num_experts, min=2, max=max(64, num_experts),
                                         description="experts E", style=style, continuous_update=False),
        "k": widgets.IntSlider(value=k, min=1, max=num_experts, description="top-k", style=style,
                               continuous_update=False),
        "logit_scale": widgets.FloatLogSlider(value=logit_scale, base=10, min=-1.5, max=1.5, step=0.05,
                                              description="logit scale", style=style, continuous_update=False),
        "distribution": widgets.Dropdown(options=DISTRIBUTIONS, value=distribution, description="tokens",
                                         style=style),
        "num_tokens": widgets.IntSlider(value=num_tokens, min=16, max=max(1024, num_tokens), step=16,
                                        description="T", style=style, continuous_update=False),
    }
    return ExpertLoadDashboard(controls, d_model, seed)
