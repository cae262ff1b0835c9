"""``MoELayer``: router -> top-k gating -> dispatch to experts -> combine, plus routing statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import DISPATCH
from .experts import Activation, Experts
from .losses import router_z_loss, switch_aux_loss
from .metrics import tokens_per_expert
from .routing import Router, SoftmaxOrder, check_k, softmax_topk


@dataclass
class RoutingInfo:
    """What the router decided for one forward pass (``T`` tokens, ``E`` experts, ``k`` per token).

    logits: ``[T, E]`` float32 router logits.  probs: ``[T, E]`` softmax over all experts.
    experts: ``[T, k]`` selected experts.  gates: ``[T, k]`` their weights.
    tokens_per_expert: ``[E]`` token-slots per expert.
    aux_loss: Switch load-balancing loss ``N * sum_i f_i P_i`` (unweighted; 1 when uniform).
    z_loss: router z-loss ``mean logsumexp(logits)^2`` (unweighted).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


class MoELayer(nn.Module):
    """A token-choice Mixture-of-Experts FFN layer.

    Args:
        d_model: model width.  d_ff: hidden width of each expert.  num_experts: ``E``.  k: experts per token.
        activation: ``"swiglu"`` or ``"gelu"`` experts.
        softmax_order, renormalize: gating variant, see :func:`moe_lab.routing.softmax_topk`.
        dispatch: ``"sorted"`` (fast, default), ``"loop"`` (reference) or ``"onehot"`` (GShard einsum).

    ``forward(x)`` takes ``x: [..., d_model]`` and returns ``(y, info)`` with ``y`` shaped like ``x`` and
    ``info`` a :class:`RoutingInfo` over the flattened ``T`` tokens.
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
    ):
        super().__init__()
        check_k(k, num_experts)
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {tuple(DISPATCH)}, got {dispatch!r}")
        softmax_topk(torch.zeros(1, num_experts), k, softmax_order=softmax_order, renormalize=renormalize)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.softmax_order, self.renormalize, self.dispatch = softmax_order, renormalize, dispatch
        self.router = Router(d_model, num_experts)
        self.experts = Experts(num_experts, d_model, d_ff, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.d_model)
        logits = self.router(tokens)
        probs, gates, experts = softmax_topk(
            logits, self.k, softmax_order=self.softmax_order, renormalize=self.renormalize
        )
        y = DISPATCH[self.dispatch](tokens, experts, gates, self.experts)
        info = RoutingInfo(
            logits=logits,
            probs=probs,
            experts=experts,
            gates=gates,
            tokens_per_expert=tokens_per_expert(experts, self.num_experts),
            aux_loss=switch_aux_loss(probs, experts),
            z_loss=router_z_loss(logits),
        )
        return y.reshape(*x.shape[:-1], -1), info

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, softmax_order={self.softmax_order!r}, renormalize={self.renormalize}, "
            f"dispatch={self.dispatch!r}"
        )
