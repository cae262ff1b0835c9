"""A small decoder-only transformer whose FFNs are dense or MoE on a schedule, with toy-size presets.

Pre-norm blocks: ``x + attn(rmsnorm(x))`` then ``x + ffn(rmsnorm(x))``; grouped-query attention with RoPE
(no position parameters); the FFN of layer ``i`` is an :class:`moe_lab.MoELayer` when
``config.moe_layers[i]`` (plus an always-on shared FFN for DeepSeek-style shared experts), else a dense
:class:`moe_lab.FFN`. Shapes: ``idx: [B, L]`` token ids -> ``logits: [B, L, vocab]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .calculator import Arch, moe_schedule
from .experts import FFN
from .layer import MoELayer, RoutingInfo


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture (the fields of :class:`moe_lab.calculator.Arch` that the model supports) plus routing
    and loss options. ``d_expert=None`` means ``d_ff``; ``n_shared`` shared experts of width ``d_expert``.

    Routing options are passed to :class:`moe_lab.MoELayer`: ``capacity_factor`` (None = dropless),
    ``jitter_eps`` (Switch's multiplicative router noise, 0 = off), ``softmax_order``, ``renormalize``,
    ``dispatch``. Loss: ``cross-entropy + aux_coef * sum_layers aux + z_coef * sum_layers z``.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 256
    activation: str = "swiglu"
    num_experts: int = 0
    k: int = 1
    d_expert: int | None = None
    n_shared: int = 0
    moe_every: int = 1
    first_dense: int = 0
    tie_embeddings: bool = False
    capacity_factor: float | None = None
    jitter_eps: float = 0.0
    softmax_order: str = "before_topk"
    renormalize: bool = True
    dispatch: str = "sorted"
    aux_coef: float = 0.0
    z_coef: float = 0.0
    rope_base: float = 10000.0

    @property
    def moe_layers(self) -> list[bool]:
        """``[n_layers]`` booleans: which layers have an MoE FFN."""
        if not self.num_experts:
            return [False] * self.n_layers
        return moe_schedule(self.n_layers, self.moe_every, self.first_dense)

    def arch(self) -> Arch:
        """This model as a calculator :class:`Arch` (``count_params(cfg.arch()).total`` = its parameters)."""
        moe = self.num_experts > 0
        return Arch(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                    vocab_size=self.vocab_size, d_ff=self.d_ff, activation=self.activation,
                    num_experts=self.num_experts, k=self.k if moe else 0,
                    d_expert=(self.d_expert or self.d_ff) if moe else 0, n_shared=self.n_shared,
                    moe_every=self.moe_every, first_dense=self.first_dense, tie_embeddings=self.tie_embeddings)


# Toy presets: same width, depth and active FFN parameters per token (d_ff 256 dense = k x d_expert routed),
# SwiGLU everywhere so that only the routing differs.
TOY_PRESETS: dict[str, dict] = {
    "dense": dict(),
    "switch": dict(num_experts=8, k=1, d_expert=256, renormalize=False, capacity_factor=1.0, jitter_eps=0.01,
                   aux_coef=1e-2),
    "glam": dict(num_experts=8, k=2, d_expert=128, moe_every=2, aux_coef=1e-2),
    "st_moe": dict(num_experts=8, k=2, d_expert=128, capacity_factor=1.25, aux_coef=1e-2, z_coef=1e-3),
    "mixtral": dict(num_experts=8, k=2, d_expert=128, aux_coef=1e-2),
    "deepseek": dict(num_experts=16, k=3, d_expert=64, n_shared=1, first_dense=1, renormalize=False, aux_coef=1e-2),
}
"""Overrides of :class:`ModelConfig` per preset name (see :func:`toy_config`)."""


def toy_config(name: str, **overrides) -> ModelConfig:
    """The toy preset ``name`` (``dense``, ``switch``: top-1 CF 1.0 + jitter, ``glam``: top-2 every other
    layer, ``st_moe``: top-2 CF 1.25 + z-loss, ``mixtral``: top-2 dropless, ``deepseek``: fine-grained +
    shared expert, first layer dense), with ``overrides`` applied (e.g. ``d_model=128``)."""
    if name not in TOY_PRESETS:
        raise ValueError(f"name must be one of {tuple(TOY_PRESETS)}, got {name!r}")
    return ModelConfig(**{**TOY_PRESETS[name], **overrides})


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding on ``x: [B, H, L, hd]`` (pairs ``(i, i + hd/2)`` rotate by ``pos * base^(-2i/hd)``)."""
    seq_len, head_dim = x.shape[-2], x.shape[-1]
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(seq_len, device=x.device, dtype=torch.float32)[:, None] * freqs  # [L, hd/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE. x: ``[B, L, d]`` -> ``[B, L, d]``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, rope_base: float = 10000.0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1 or d_model % n_heads or n_heads % n_kv_heads or (d_model // n_heads) % 2:
            raise ValueError(f"need n_heads, n_kv_heads >= 1, n_heads dividing d_model with an even head size "
                             f"(RoPE rotates pairs) and n_kv_heads dividing n_heads, got d_model={d_model}, "
                             f"n_heads={n_heads}, n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_base = n_heads, n_kv_heads, d_model // n_heads, rope_base
        self.q = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor, h: int) -> torch.Tensor:
            return t.view(b, n, h, self.head_dim).transpose(1, 2)

        q = rope(heads(self.q(x), self.n_heads), self.rope_base)
        k = rope(heads(self.k(x), self.n_kv_heads), self.rope_base)
        v = heads(self.v(x), self.n_kv_heads)
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """One pre-norm transformer block with a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_base)
        self.shared = None
        if moe:
            d_expert = cfg.d_expert or cfg.d_ff
            self.ffn = MoELayer(cfg.d_model, d_expert, cfg.num_experts, cfg.k, activation=cfg.activation,
                                softmax_order=cfg.softmax_order, renormalize=cfg.renormalize,
                                dispatch=cfg.dispatch, jitter_eps=cfg.jitter_eps,
                                capacity_factor=cfg.capacity_factor)
            if cfg.n_shared:  # shared experts as one always-on FFN of width n_shared * d_expert
                self.shared = FFN(cfg.d_model, cfg.n_shared * d_expert, cfg.activation)
        else:
            self.ffn = FFN(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo | None]:
        x = x + self.attn(self.attn_norm(x))
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, info = self.ffn(h)
            if self.shared is not None:
                y = y + self.shared(h)
            return x + y, info
        return x + self.ffn(h), None


@dataclass
class LossOutput:
    """``total = ce + aux_coef * aux + z_coef * z`` (aux and z summed over MoE layers) and the routing
    info of each MoE layer."""

    total: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor
    infos: list[RoutingInfo]


class MoETransformer(nn.Module):
    """Decoder-only language model with dense or MoE FFNs (see :class:`ModelConfig`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, moe) for moe in cfg.moe_layers)
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[RoutingInfo]]:
        """idx: ``[B, L]`` int64 -> ``(logits [B, L, vocab], routing info of each MoE layer)``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [batch, seq_len], got shape {tuple(idx.shape)}")
        x = self.embed(idx)
        infos = []
        for block in self.blocks:
            x, info = block(x)
            if info is not None:
                infos.append(info)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return logits, infos

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> LossOutput:
        """Next-token loss. idx, targets: ``[B, L]``."""
        logits, infos = self(idx)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        zero = ce.new_zeros(())
        aux = sum((i.aux_loss for i in infos), zero)
        z = sum((i.z_loss for i in infos), zero)
        return LossOutput(ce + self.cfg.aux_coef * aux + self.cfg.z_coef * z, ce, aux, z, infos)
