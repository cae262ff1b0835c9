"""Routing: turn router logits into (probabilities, top-k gates, selected experts).

Also the two classic sources of routing noise: Shazeer et al. 2017's noisy top-k (a learned, per-expert
Gaussian noise scale) and the Switch Transformer's multiplicative jitter on the router input. Both are
for training only: evaluation routing is deterministic.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
Router math always runs in float32, whatever the input dtype or autocast setting.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

SoftmaxOrder = Literal["before_topk", "after_topk"]
SOFTMAX_ORDERS = ("before_topk", "after_topk")


def check_k(k: int, num_experts: int) -> None:
    """Raise ``ValueError`` unless ``1 <= k <= num_experts``."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer with 1 <= k <= num_experts={num_experts}, got k={k!r}")


def reads_values(t: torch.Tensor) -> bool:
    """Whether input checks may read ``t``'s values: always on CPU; on other devices (where a read is a host-device
    sync) only under PyTorch's debug mode, ``torch.autograd.set_detect_anomaly(True)``."""
    return t.device.type == "cpu" or torch.is_anomaly_enabled()


def check_experts(experts: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` unless ``experts`` is an integer ``[T, k]`` tensor of ids in ``0 .. num_experts - 1``.

    The range is checked where :func:`reads_values` allows (on CUDA an id out of range otherwise fails in the
    indexing kernel).
    """
    if experts.dim() != 2 or experts.is_floating_point() or experts.is_complex():
        raise ValueError(f"experts must be an integer tensor of shape [tokens, k], got {experts.dtype} "
                         f"of shape {tuple(experts.shape)}")
    if reads_values(experts) and experts.numel() and (experts.min() < 0 or experts.max() >= num_experts):
        raise ValueError(f"experts must hold expert ids in 0..{num_experts - 1} (num_experts={num_experts}), "
                         f"got ids from {int(experts.min())} to {int(experts.max())}")


def check_finite_logits(logits: torch.Tensor) -> None:
    """Raise ``ValueError`` if router logits contain NaN or +-inf (a sign of a diverging router).

    Checked where :func:`reads_values` allows, so a CUDA forward pass never waits for the GPU; there a diverged
    router shows up as a NaN loss (or, under anomaly detection, as this error).
    """
    if reads_values(logits) and not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(
            f"router logits contain {bad} non-finite value(s) (NaN or inf): the router has diverged "
            "or its input is broken; check the learning rate, use the z-loss, keep the router in float32"
        )


def softmax_topk(
    logits: torch.Tensor,
    k: int,
    *,
    softmax_order: SoftmaxOrder = "before_topk",
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax gating with top-k selection.

    Args:
        logits: ``[T, E]`` router logits (any float dtype; computed in float32).
        k: experts per token, ``1 <= k <= E``.
        softmax_order: ``"before_topk"``: softmax over all ``E`` experts, then keep the top k
            (Mixtral, DeepSeek v1/v2, Switch); ``"after_topk"``: keep the top-k logits, softmax over them.
        renormalize: with ``"before_topk"``, rescale the kept probabilities to sum to 1 (Mixtral: yes;
            Switch k=1 and DeepSeek v1/v2: no). Softmax after top-k always sums to 1, so it requires True.

    Returns:
        probs: ``[T, E]`` float32 softmax over all experts (what the Switch aux loss uses).
        gates: ``[T, k]`` float32 weights of the selected experts, largest first.
        experts: ``[T, k]`` int64 indices of the selected experts.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [tokens, num_experts], got shape {tuple(logits.shape)}")
    check_k(k, logits.shape[-1])
    if softmax_order not in SOFTMAX_ORDERS:
        raise ValueError(f"softmax_order must be one of {SOFTMAX_ORDERS}, got {softmax_order!r}")
    if softmax_order == "after_topk" and not renormalize:
        raise ValueError(
            "renormalize=False only applies to softmax_order='before_topk': a softmax after top-k "
            "already sums to 1 over the selected experts"
        )
    check_finite_logits(logits)
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    if softmax_order == "before_topk":
        gates, experts = probs.topk(k, dim=-1)
        if renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
    else:
        top_logits, experts = logits.topk(k, dim=-1)
        gates = top_logits.softmax(dim=-1)
    return probs, gates, experts


class Router(nn.Module):
    """A linear router ``logits = x @ W^T`` computed in float32.

    ``weight`` is ``[E, d_model]`` like ``nn.Linear(d_model, E, bias=False)``.
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, d_model]`` -> logits ``[T, E]`` in float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


def dense_gates(gates: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter the top-k gates into a dense ``[T, E]`` matrix ``G(x)`` (zeros for unselected experts).

    gates: ``[T, k]``, experts: ``[T, k]`` -> ``[T, E]`` float32 (differentiable in ``gates``).
    """
    out = torch.zeros(gates.shape[0], num_experts, dtype=torch.float32, device=gates.device)
    return out.scatter(1, experts, gates.float())


def multiplicative_jitter(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Switch Transformer jitter: multiply the router input by ``U(1 - eps, 1 + eps)`` elementwise.

    Applied to the copy of ``x: [T, d_model]`` that the router sees, in training only (the experts get the
    clean ``x``). ``eps = 0`` returns ``x`` unchanged; Switch used ``eps = 1e-2``.
    """
    if not 0 <= eps < 1:
        raise ValueError(f"jitter_eps must satisfy 0 <= jitter_eps < 1, got {eps!r}")
    if eps == 0:
        return x
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return x * (1 - eps + 2 * eps * noise).to(x.dtype)


class NoisyLogits(NamedTuple):
    """Output of :class:`NoisyTopKRouter` (all ``[T, E]`` float32).

    clean: ``x W_g``.  noise_std: ``softplus(x W_noise)``.  noisy: ``clean + N(0, 1) * noise_std`` in
    training, ``clean`` in evaluation (``H(x)`` in Shazeer et al. 2017, eq. 4).
    """

    clean: torch.Tensor
    noise_std: torch.Tensor
    noisy: torch.Tensor


def add_gating_noise(
    clean: torch.Tensor, noise_std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``H = clean + N(0, 1) * noise_std`` for ``[T, E]`` logits (Shazeer et al. 2017, eq. 4)."""
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=torch.float32)
    return clean.float() + noise * noise_std.float()


class NoisyTopKRouter(nn.Module):
    """Shazeer et al. 2017 noisy top-k router: ``H(x) = x W_g + N(0, 1) * softplus(x W_noise)``.

    ``weight`` (``W_g``) and ``noise_weight`` (``W_noise``) are ``[E, d_model]`` and start at zero, as in
    the paper: at initialisation every expert has the same clean logit and a noise scale of
    ``softplus(0) = log 2``, so the noise alone picks the experts. Noise is sampled only in training mode.
    Use :func:`softmax_topk` on ``noisy`` for the gates; the paper's form (softmax over the kept top-k
    noisy logits) equals ``softmax_order="before_topk", renormalize=True``.
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> NoisyLogits:
        """x: ``[T, d_model]`` -> :class:`NoisyLogits` of ``[T, E]`` float32 tensors."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            clean = F.linear(x, self.weight.float())
            noise_std = F.softplus(F.linear(x, self.noise_weight.float()))
        noisy = add_gating_noise(clean, noise_std, generator) if self.training else clean
        return NoisyLogits(clean, noise_std, noisy)


GROUP_SCORES = ("max", "top2_sum")


def group_limited_topk(scores: torch.Tensor, k: int, *, n_groups: int, topk_groups: int,
                       group_score: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Device- / node-limited top-k (DeepSeek-V2 / V3): choose ``k`` experts from the best ``topk_groups`` groups.

    scores: ``[T, E]`` float32 selection scores; the ``E`` experts form ``n_groups`` contiguous groups of
    ``E / n_groups`` (e.g. the experts of one device). Each group is scored per token by its best expert
    (``"max"``, DeepSeek-V2's device-limited routing) or the sum of its two best (``"top2_sum"``, V3); the
    experts outside the best ``topk_groups`` groups are masked with ``-inf`` (never 0: a masked expert must
    lose to any real score, negative ones included), then top-k.
    Returns ``(values [T, k], experts [T, k] int64)``, largest first.
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor of shape [tokens, num_experts], got {scores.dtype} "
                         f"of shape {tuple(scores.shape)}")
    num_experts = scores.shape[1]
    if not isinstance(n_groups, int) or n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"n_groups must be a positive divisor of num_experts={num_experts}, got {n_groups!r}")
    if not isinstance(topk_groups, int) or not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_groups must be an integer with 1 <= topk_groups <= n_groups={n_groups}, "
                         f"got {topk_groups!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    per_group = num_experts // n_groups
    if group_score == "top2_sum" and per_group < 2:
        raise ValueError(f"group_score='top2_sum' needs >= 2 experts per group, got {per_group}")
    check_k(k, topk_groups * per_group)
    grouped = scores.view(scores.shape[0], n_groups, per_group)
    if group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_groups, dim=-1).indices, True)
    masked = scores.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    return masked.topk(k, dim=-1)
