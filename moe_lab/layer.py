"""``MoELayer``: router -> top-k gating -> (capacity) -> dispatch to experts -> combine, plus routing statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import DISPATCH, DROP_POLICIES, DropPolicy, capacity_mask, expert_capacity
from .experts import Activation, Experts
from .losses import importance_loss, load_loss, router_z_loss, switch_aux_loss
from .metrics import drop_rate, tokens_per_expert
from .routing import NoisyTopKRouter, Router, SoftmaxOrder, check_k, dense_gates, multiplicative_jitter, softmax_topk

ROUTERS = ("softmax", "noisy_topk")


@dataclass
class RoutingInfo:
    """What the router decided for one forward pass (``T`` tokens, ``E`` experts, ``k`` per token).

    logits: ``[T, E]`` float32 logits the gating used (noisy in training with ``router="noisy_topk"``).
    probs: ``[T, E]`` softmax of ``logits`` over all experts.
    experts: ``[T, k]`` selected experts.  gates: ``[T, k]`` their weights.
    tokens_per_expert: ``[E]`` token-slots routed to each expert (before capacity dropping).
    aux_loss: Switch load-balancing loss ``N * sum_i f_i P_i`` (unweighted; 1 when uniform).
    z_loss: router z-loss ``mean logsumexp(logits)^2`` (unweighted).
    dropped: ``[T, k]`` bool, slots dropped by expert capacity (all False when dropless).
    drop_rate: fraction of slots dropped.  capacity: slots per expert (None when dropless).
    importance_loss: Shazeer's ``CV(sum_t G(x_t))^2`` (unweighted).
    clean_logits, noise_std: ``[T, E]`` ``x W_g`` and ``softplus(x W_noise)`` (noisy router only, else None).
    load_loss: Shazeer's smooth ``CV(Load)^2`` (noisy router only, else None).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped: torch.Tensor
    drop_rate: float
    capacity: int | None
    importance_loss: torch.Tensor
    clean_logits: torch.Tensor | None = None
    noise_std: torch.Tensor | None = None
    load_loss: torch.Tensor | None = None


class MoELayer(nn.Module):
    """A token-choice Mixture-of-Experts FFN layer.

    Args:
        d_model: model width.  d_ff: hidden width of each expert.  num_experts: ``E``.  k: experts per token.
        activation: ``"swiglu"`` or ``"gelu"`` experts.
        softmax_order, renormalize: gating variant, see :func:`moe_lab.routing.softmax_topk`.
        dispatch: ``"sorted"`` (fast, default), ``"loop"`` (reference) or ``"onehot"`` (GShard einsum).
        router: ``"softmax"`` (linear router) or ``"noisy_topk"`` (Shazeer et al. 2017; noise in training only).
        jitter_eps: Switch multiplicative jitter ``U(1-eps, 1+eps)`` on the router input in training (0 = off).
        capacity_factor: ``None`` (dropless, default) or ``> 0``: each expert takes at most
            :func:`moe_lab.dispatch.expert_capacity` ``(T, E, capacity_factor, k)`` slots per forward pass.
        drop_policy: which slots win when an expert overflows: ``"position"`` (Switch: first choices in
            token order, then second choices), ``"probability"`` (highest router probability first) or
            ``"batch_priority"`` (V-MoE: first choices before second choices, tokens by top-1 probability).

    ``forward(x)`` takes ``x: [..., d_model]`` and returns ``(y, info)`` with ``y`` shaped like ``x`` and
    ``info`` a :class:`RoutingInfo` over the flattened ``T`` tokens. Dropped slots add exactly zero to ``y``:
    wrap the layer in a residual connection so dropped tokens pass through unchanged.
    The defaults (softmax over all experts in float32, top-k, renormalise, SwiGLU) are Mixtral's block.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        *,
        activation: Activation = "swiglu",
        softmax_order: SoftmaxOrder = "before_topk",
        renormalize: bool = True,
        dispatch: str = "sorted",
        router: str = "softmax",
        jitter_eps: float = 0.0,
        capacity_factor: float | None = None,
        drop_policy: DropPolicy = "position",
    ):
        super().__init__()
        check_k(k, num_experts)
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {tuple(DISPATCH)}, got {dispatch!r}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        if capacity_factor is not None:
            expert_capacity(1, num_experts, capacity_factor, k)  # validates capacity_factor
        multiplicative_jitter(torch.zeros(0), jitter_eps)  # validates jitter_eps
        softmax_topk(torch.zeros(1, num_experts), k, softmax_order=softmax_order, renormalize=renormalize)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.softmax_order, self.renormalize, self.dispatch = softmax_order, renormalize, dispatch
        self.router_type, self.jitter_eps = router, jitter_eps
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.router = Router(d_model, num_experts) if router == "softmax" else NoisyTopKRouter(d_model, num_experts)
        self.experts = Experts(self._num_local_experts(num_experts), d_model, d_ff, activation)

    def _num_local_experts(self, num_experts: int) -> int:
        """How many experts this process holds (all; expert parallelism holds a shard)."""
        return num_experts

    def _capacity_keep(self, experts: torch.Tensor, chosen_probs: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Capacity and ``keep: [T, k]`` for this batch; ``chosen_probs: [T, k]`` ranks slots for the policy."""
        capacity = expert_capacity(experts.shape[0], self.num_experts, self.capacity_factor, self.k)
        return capacity, capacity_mask(experts, self.num_experts, capacity, chosen_probs, self.drop_policy)

    def _run_experts(self, tokens: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor,
                     keep: torch.Tensor | None, capacity: int | None) -> torch.Tensor:
        """Dispatch the kept slots, run the experts, combine: ``[T, d_model]``."""
        extra = {"capacity": capacity} if self.dispatch == "onehot" else {}
        return DISPATCH[self.dispatch](tokens, experts, gates, self.experts, keep, **extra)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"x must contain at least one token, got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.d_model)
        router_in = multiplicative_jitter(tokens, self.jitter_eps) if self.training else tokens
        clean = noise_std = None
        if self.router_type == "noisy_topk":
            clean, noise_std, logits = self.router(router_in)
        else:
            logits = self.router(router_in)
        probs, gates, experts = softmax_topk(
            logits, self.k, softmax_order=self.softmax_order, renormalize=self.renormalize
        )
        capacity = keep = None
        if self.capacity_factor is not None:
            capacity, keep = self._capacity_keep(experts, probs.gather(1, experts))
        y = self._run_experts(tokens, experts, gates, keep, capacity)
        dropped = torch.zeros_like(experts, dtype=torch.bool) if keep is None else ~keep
        info = RoutingInfo(
            logits=logits,
            probs=probs,
            experts=experts,
            gates=gates,
            tokens_per_expert=tokens_per_expert(experts, self.num_experts),
            aux_loss=switch_aux_loss(probs, experts),
            z_loss=router_z_loss(logits),
            dropped=dropped,
            drop_rate=0.0 if keep is None else drop_rate(dropped),  # no GPU sync when dropless
            capacity=capacity,
            importance_loss=importance_loss(dense_gates(gates, experts, self.num_experts)),
            clean_logits=clean,
            noise_std=noise_std,
            load_loss=None if clean is None else load_loss(clean, logits, noise_std, self.k),
        )
        return y.reshape(*x.shape[:-1], self.d_model), info

    def extra_repr(self) -> str:
        text = (
            f"k={self.k}, softmax_order={self.softmax_order!r}, renormalize={self.renormalize}, "
            f"dispatch={self.dispatch!r}, router={self.router_type!r}"
        )
        if self.jitter_eps:
            text += f", jitter_eps={self.jitter_eps}"
        if self.capacity_factor is not None:
            text += f", capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy!r}"
        return text
