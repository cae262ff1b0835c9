"""Budget matching and matched baselines, decided by the calculator (:mod:`moe_lab.calculator`).

A budget-matched comparison gives every model the same budget (optimiser steps, training tokens or training
FLOPs) and its *own* number of steps, with its own warm-up + cosine schedule that ends at that budget
(:func:`moe_lab.train.train` decays to its ``steps``): no model is read mid-schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..calculator import count_params, flops_per_token
from ..model import ModelConfig
from ..validation import check_int, check_number

BUDGET_KINDS = ("steps", "tokens", "flops")
MATCHES = ("active_flops", "total_params")


def flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Training FLOPs of one optimiser step of ``batch_size`` sequences of ``seq_len`` tokens:
    ``flops_per_token(cfg.arch(), seq_len, training=True) * batch_size * seq_len`` (forward + backward)."""
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1)
    return flops_per_token(cfg.arch(), seq_len, training=True) * batch_size * seq_len


@dataclass(frozen=True)
class Budget:
    """``amount`` optimiser steps, training tokens or training FLOPs (``kind``) that every model of a comparison
    may spend. :meth:`steps_for` turns it into one model's steps."""

    kind: str
    amount: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        check_number("amount", self.amount, 0, low_open=True)

    @classmethod
    def of(cls, kind: str, cfg: ModelConfig, steps: int, *, batch_size: int, seq_len: int) -> Budget:
        """The ``kind`` budget that ``steps`` steps of ``cfg`` spend (e.g. the FLOPs of 800 dense steps)."""
        check_int("steps", steps, 1)
        per_step = {"steps": 1, "tokens": batch_size * seq_len, "flops": flops_per_step(cfg, batch_size, seq_len)}
        return cls(kind, steps * per_step[kind])

    def steps_for(self, cfg: ModelConfig, *, batch_size: int, seq_len: int) -> int:
        """The most whole steps of ``cfg`` within the budget (rounded down, never over it); a ``ValueError``
        when not even one step fits."""
        per_step = {"steps": 1, "tokens": batch_size * seq_len, "flops": flops_per_step(cfg, batch_size, seq_len)}
        steps = math.floor(self.amount / per_step[self.kind])
        if steps < 1:
            raise ValueError(f"budget {self.amount:g} {self.kind} is less than one step of this model "
                             f"({per_step[self.kind]:,} {self.kind} per step of {batch_size} x {seq_len} tokens)")
        return steps


def _dense(cfg: ModelConfig, d_ff: int) -> ModelConfig:
    """``cfg``'s architecture with one dense SwiGLU/GELU FFN of width ``d_ff`` in every layer."""
    return ModelConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads, d_ff=d_ff, activation=cfg.activation,
                       tie_embeddings=cfg.tie_embeddings, rope_base=cfg.rope_base)


def matched_dense(cfg: ModelConfig, match: str = "active_flops") -> ModelConfig:
    """The dense model that matches the MoE model ``cfg`` on ``match``: ``"active_flops"`` (forward FLOPs per
    token, :func:`moe_lab.calculator.flops_per_token`: the router's FLOPs included) or ``"total_params"``
    (:func:`moe_lab.calculator.count_params`). Same width, depth, heads, vocabulary and activation; every FFN
    dense, of the width whose count is nearest the MoE model's (ties: the narrower; the calculator decides).
    E.g. ``toy_config("mixtral", n_layers=2)`` (8 experts of 128, top-2, ``d_model`` 64): width 259 for
    active FLOPs (2 x 128 plus the router), 1027 for total parameters."""
    if not isinstance(cfg, ModelConfig) or not cfg.num_experts:
        raise ValueError(f"cfg must be an MoE ModelConfig (num_experts >= 1), got {cfg!r}")
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")

    def count(c: ModelConfig) -> int:
        return flops_per_token(c.arch()) if match == "active_flops" else count_params(c.arch()).total

    target, one, two = count(cfg), count(_dense(cfg, 1)), count(_dense(cfg, 2))
    guess = 1 + (target - one) / (two - one)  # the count is affine in the FFN width
    widths = {max(1, math.floor(guess)), max(1, math.ceil(guess))}
    return _dense(cfg, min(widths, key=lambda w: (abs(count(_dense(cfg, w)) - target), w)))
