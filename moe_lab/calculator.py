"""Parameter and FLOP arithmetic for FFN and MoE layers.

Convention: a multiply-add counts as 2 FLOPs, so a forward pass costs 2 FLOPs per active parameter per token.
Biases are not counted (the experts here have none).
"""
from __future__ import annotations

from .experts import _check_activation
from .routing import check_k


def ffn_params(d_model: int, d_ff: int, activation: str = "swiglu") -> int:
    """Weights of one FFN: ``2*d*d_ff`` (GELU: in + out) or ``3*d*d_ff`` (SwiGLU: gate, up, down)."""
    _check_activation(activation)
    return (3 if activation == "swiglu" else 2) * d_model * d_ff


def moe_params(d_model: int, d_ff: int, num_experts: int, k: int, activation: str = "swiglu") -> tuple[int, int]:
    """``(total, active per token)`` weights of an MoE FFN layer: ``E`` experts plus a ``d*E`` router;
    a token uses the router and ``k`` experts."""
    check_k(k, num_experts)
    expert = ffn_params(d_model, d_ff, activation)
    router = d_model * num_experts
    return num_experts * expert + router, k * expert + router


def moe_flops_per_token(d_model: int, d_ff: int, num_experts: int, k: int, activation: str = "swiglu") -> int:
    """Forward FLOPs per token of an MoE FFN layer: 2 x active parameters (router + k experts)."""
    return 2 * moe_params(d_model, d_ff, num_experts, k, activation)[1]
