"""A small decoder-only transformer whose FFNs are dense or MoE on a schedule, with toy-size presets.

Pre-norm blocks: ``x + attn(rmsnorm(x))`` then ``x + ffn(rmsnorm(x))``; grouped-query attention with RoPE
(no position parameters); the FFN of layer ``i`` is an :class:`moe_lab.MoELayer` when
``config.moe_layers[i]`` (its shared experts inside it), else a dense :class:`moe_lab.FFN`.
Shapes: ``idx: [B, L]`` token ids -> ``logits: [B, L, vocab]``.

Inference: :class:`KVCache` keeps every layer's keys and values, so :meth:`MoETransformer.generate` (greedy or
sampling) runs each new token through the model once instead of recomputing the whole sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .calculator import Arch, moe_schedule
from .config import MoEConfig, MoEOptions
from .experts import FFN
from .layer import MoELayer, RoutingInfo
from .losses import AUX_LOSSES
from .validation import check_bool, check_int, check_number, check_type, reads_values

LossCoefficients = make_dataclass("LossCoefficients", [(f"{name}_coef", float, field(default=0.0)) for name in AUX_LOSSES],
                                  frozen=True, kw_only=True)
LossCoefficients.__module__ = __name__
LossCoefficients.__doc__ = ("``<name>_coef`` (default 0) for every term of :data:`moe_lab.losses.AUX_LOSSES`: "
                            "``aux_coef``, ``z_coef``, ``seq_aux_coef``, ``device_aux_coef``, ``comm_aux_coef``, "
                            "``importance_coef``, ``load_coef``.")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(MoEOptions, LossCoefficients):
    """Architecture (the fields of :class:`moe_lab.calculator.Arch` that the model supports), loss weights, and
    every :class:`moe_lab.config.MoEOptions` field (inherited: ``capacity_factor``, ``score_func``,
    ``selection_bias``, ``n_groups``, ``n_shared``, ...), which configure each MoE layer
    (:meth:`layer_config`). ``num_experts`` routed experts of width ``d_expert`` (None = ``d_ff``), ``k`` per
    token; ``n_shared`` shared experts of width ``d_shared`` (None = ``d_expert``); ``activation`` applies to
    the dense FFNs too.

    Loss: ``cross-entropy + sum_name <name>_coef * <name>`` over the terms of :data:`moe_lab.losses.AUX_LOSSES`
    with a non-zero coefficient (:class:`LossCoefficients`: ``aux_coef``, ``z_coef``, ``seq_aux_coef``, ...), each
    term summed over the MoE layers; only those terms are computed.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 256
    num_experts: int = 0
    k: int = 1
    d_expert: int | None = None
    moe_every: int = 1
    first_dense: int = 0
    tie_embeddings: bool = False
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("vocab_size", self.vocab_size, 1)
        if self.d_expert is not None:
            check_int("d_expert", self.d_expert, 1)
        self.arch()  # validates the architecture (sizes, heads, schedule) now, not when the model is built
        if not all(self.moe_layers):
            check_int("d_ff", self.d_ff, 1)  # the width of the dense FFNs (Arch allows 0: attention only)
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads must leave an even head size d_model / n_heads (RoPE rotates pairs), got "
                             f"d_model={self.d_model}, n_heads={self.n_heads}")
        check_number("rope_base", self.rope_base, 1, low_open=True)
        for name, weight in self.loss_weights().items():
            check_number(f"{name}_coef", weight, 0)
            if weight and not AUX_LOSSES[name].applies(self):
                raise ValueError(f"{name}_coef={weight} needs a layer that defines it: {AUX_LOSSES[name].doc}")
        if self.num_experts:
            self.layer_config()  # validates the MoE layer (k, groups, ...) now, not when the model is built

    @property
    def moe_layers(self) -> list[bool]:
        """``[n_layers]`` booleans: which layers have an MoE FFN."""
        if not self.num_experts:
            return [False] * self.n_layers
        return moe_schedule(self.n_layers, self.moe_every, self.first_dense)

    def layer_config(self) -> MoEConfig:
        """The :class:`moe_lab.config.MoEConfig` of each MoE layer (``d_ff`` = ``d_expert or d_ff``)."""
        return MoEConfig(d_model=self.d_model, d_ff=self.d_expert or self.d_ff, num_experts=self.num_experts,
                         k=self.k, **self.options())

    def loss_weights(self) -> dict[str, float]:
        """``{term: coefficient}`` of every auxiliary loss term (the initial ``MoETransformer.loss_weights``)."""
        return {name: getattr(self, f"{name}_coef") for name in AUX_LOSSES}

    def arch(self) -> Arch:
        """This model as a calculator :class:`Arch` (``count_params(cfg.arch()).total`` = its parameters)."""
        moe = self.num_experts > 0
        return Arch(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                    vocab_size=self.vocab_size, d_ff=self.d_ff, activation=self.activation,
                    num_experts=self.num_experts, k=self.k if moe else 0,
                    d_expert=(self.d_expert or self.d_ff) if moe else 0, n_shared=self.n_shared,
                    d_shared=self.d_shared, moe_every=self.moe_every, first_dense=self.first_dense,
                    tie_embeddings=self.tie_embeddings)


# Toy presets: same width, depth and active FFN parameters per token (d_ff 256 dense = (k + n_shared) x d_expert),
# SwiGLU everywhere so that only the routing differs. The DeepSeek presets mirror the published models'
# structure at toy size (moe_lab.calculator.PRESETS / PUBLISHED_ROUTING; a test checks that they agree):
# fine-grained experts of 1/8 the dense width, shared experts, the first layer dense.
_DEEPSEEK = dict(num_experts=32, d_expert=32, first_dense=1)
TOY_PRESETS: dict[str, dict] = {
    "dense": dict(),
    "switch": dict(num_experts=8, k=1, d_expert=256, renormalize=False, capacity_factor=1.0, jitter_eps=0.01,
                   aux_coef=1e-2),
    "glam": dict(num_experts=8, k=2, d_expert=128, moe_every=2, aux_coef=1e-2),
    "st_moe": dict(num_experts=8, k=2, d_expert=128, capacity_factor=1.25, aux_coef=1e-2, z_coef=1e-3),
    "mixtral": dict(num_experts=8, k=2, d_expert=128, aux_coef=1e-2),
    # DeepSeekMoE (V1): fine-grained + 2 shared experts, softmax before top-k, no renormalisation, aux loss
    "deepseek_v1": dict(**_DEEPSEEK, k=6, n_shared=2, renormalize=False, aux_coef=1e-2),
    # DeepSeek-V2: V1 + device-limited routing (8 groups as devices, M = 3) and the three balance losses with
    # the paper's coefficients (routed_scaling_factor stays 1 like V1, so V1 vs V2 differ only in the limit)
    "deepseek_v2": dict(**_DEEPSEEK, k=6, n_shared=2, renormalize=False, n_groups=8, topk_groups=3,
                        aux_coef=3e-3, device_aux_coef=0.05, comm_aux_coef=0.02),
    # DeepSeek-V3: sigmoid gating, selection bias updated aux-loss-free (gamma 1e-3), node-limited routing
    # (8 groups, 4 kept, top-2 sums), normalised gates x 2.5, 1 shared expert, the tiny sequence-wise loss
    "deepseek_v3": dict(**_DEEPSEEK, k=7, n_shared=1, score_func="sigmoid", selection_bias=True,
                        bias_update_rate=1e-3, n_groups=8, topk_groups=4, group_score="top2_sum",
                        routed_scaling_factor=2.5, seq_aux_coef=1e-4),
}
"""Overrides of :class:`ModelConfig` per preset name (see :func:`toy_config`)."""


def toy_config(name: str, **overrides) -> ModelConfig:
    """The toy preset ``name`` (``dense``, ``switch``: top-1 CF 1.0 + jitter, ``glam``: top-2 every other
    layer, ``st_moe``: top-2 CF 1.25 + z-loss, ``mixtral``: top-2 dropless, ``deepseek_v1`` / ``_v2`` /
    ``_v3``: see :data:`TOY_PRESETS`), with ``overrides`` applied (e.g. ``d_model=128``,
    ``bias_update_rate=1e-2``)."""
    if name not in TOY_PRESETS:
        raise ValueError(f"name must be one of {tuple(TOY_PRESETS)}, got {name!r}")
    return ModelConfig(**{**TOY_PRESETS[name], **overrides})


def rope(x: torch.Tensor, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """Rotary position embedding on ``x: [B, H, L, hd]`` (pairs ``(i, i + hd/2)`` rotate by ``pos * base^(-2i/hd)``)
    at positions ``offset, ..., offset + L - 1`` (``offset``: tokens already in a :class:`KVCache`)."""
    seq_len, head_dim = x.shape[-2], x.shape[-1]
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    positions = torch.arange(offset, offset + seq_len, device=x.device, dtype=torch.float32)
    angles = positions[:, None] * freqs  # [L, hd/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of every attention layer for ``batch`` sequences, preallocated for ``max_len`` positions.

    ``keys, values: [n_layers, batch, n_kv_heads, max_len, head_dim]`` (grouped-query attention stores only the
    ``n_kv_heads`` key/value heads); ``length``: positions filled so far (the same for every sequence).
    Build one with :meth:`MoETransformer.new_cache`; the model's forward fills it and advances ``length``.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim), ("max_len", max_len)):
            check_int(name, value, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype (the model's), got {dtype!r}")
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def check_fits(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> None:
        """Raise ``ValueError`` naming ``cache`` unless this cache was built for a model of these sizes, dtype and
        device (:meth:`MoETransformer.new_cache` builds one that fits)."""
        n, _, heads, _, dim = self.keys.shape
        theirs = dict(n_layers=n, n_kv_heads=heads, head_dim=dim, dtype=self.keys.dtype, device=self.keys.device)
        ours = dict(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, dtype=dtype, device=device)
        wrong = [f"{name}={theirs[name]} (the model has {ours[name]})" for name in ours if theirs[name] != ours[name]]
        if wrong:
            raise ValueError(f"cache was built for another model: {', '.join(wrong)}; build it with "
                             "model.new_cache(batch, max_len)")

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated keys and values."""
        return self.keys.nbytes + self.values.nbytes

    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence takes: ``2 * n_layers * n_kv_heads * head_dim * element size``."""
        return self.nbytes // (self.batch * self.max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v: [B, n_kv_heads, L, head_dim]`` at positions ``length ..`` of ``layer``; return that layer's
        keys and values of all positions so far, ``[B, n_kv_heads, length + L, head_dim]``."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds max_len={self.max_len} positions; {self.length} are filled and "
                             f"{k.shape[2]} more do not fit (build a longer cache)")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE. x: ``[B, L, d]`` -> ``[B, L, d]``; with a :class:`KVCache`
    the ``L`` new positions follow the ``cache.length`` cached ones and attend to them too."""

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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``cache``: the :class:`KVCache` to read and extend at index ``layer`` (None: attend within ``x``)."""
        b, n, _ = x.shape
        past = 0 if cache is None else cache.length

        def heads(t: torch.Tensor, h: int) -> torch.Tensor:
            return t.view(b, n, h, self.head_dim).transpose(1, 2)

        q = rope(heads(self.q(x), self.n_heads), self.rope_base, past)
        k = rope(heads(self.k(x), self.n_kv_heads), self.rope_base, past)
        v = heads(self.v(x), self.n_kv_heads)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i sits at position past + i and sees keys 0 .. past + i (SDPA's is_causal aligns top-left)
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """One pre-norm transformer block with a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_base)
        self.ffn = MoELayer.from_config(cfg.layer_config()) if moe else FFN(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
                ) -> tuple[torch.Tensor, RoutingInfo | None]:
        x = x + self.attn(self.attn_norm(x), cache, layer)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, info = self.ffn(h)
            return x + y, info
        return x + self.ffn(h), None


IGNORE_INDEX = -100
"""A target id that :meth:`MoETransformer.loss` skips (``F.cross_entropy``'s ``ignore_index``), e.g. for padding."""


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, ignore_index: int | None = None) -> None:
    """Raise unless ``ids`` is a non-empty int64 / int32 ``[batch, seq_len]`` tensor of ids in ``0 .. vocab_size - 1``
    (or ``ignore_index``); the range is checked where :func:`moe_lab.validation.reads_values` allows."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids [batch, seq_len], got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"{name} must be an int64 (or int32) tensor of token ids of shape [batch >= 1, seq_len >= 1], "
                         f"got {ids.dtype} of shape {tuple(ids.shape)}")
    if reads_values(ids):
        bad = (ids < 0) | (ids >= vocab_size)
        if ignore_index is not None:
            bad &= ids != ignore_index
        if bool(bad.any()):
            also = "" if ignore_index is None else f" (or {ignore_index}: ignored)"
            raise ValueError(f"{name} must hold token ids in 0..{vocab_size - 1} (vocab_size={vocab_size}){also}, got "
                             f"{int(bad.sum())} id(s) outside, e.g. {int(ids[bad][0])}")


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """``logits: [B, vocab]`` -> ``[B, 1]`` token ids: argmax (temperature 0) or a draw from the tempered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def _layer_sum(infos: list[RoutingInfo], name: str, zero: torch.Tensor) -> torch.Tensor | None:
    """Auxiliary loss ``name`` summed over the MoE layers (``zero`` without any; None where a layer lacks it)."""
    values = [info.loss(name) for info in infos]
    return None if any(v is None for v in values) else sum(values, zero)


@dataclass(eq=False)
class LossOutput:
    """``total = ce + sum_term weight[term] * term`` over the auxiliary terms with a non-zero weight
    (``MoETransformer.loss_weights``), each summed over the MoE layers, and the routing info of each MoE layer.

    ``terms``: the terms computed so far (those with a weight, and those asked for), by name. Any other term of
    :data:`moe_lab.losses.AUX_LOSSES` is computed from ``infos`` when first read: ``out.term("z")`` or ``out.z``.
    """

    total: torch.Tensor
    ce: torch.Tensor
    terms: dict[str, torch.Tensor | None]
    infos: list[RoutingInfo]

    def term(self, name: str) -> torch.Tensor | None:
        """Auxiliary loss ``name`` summed over the MoE layers (unweighted; 0 for a dense model, None where the
        layers do not define it)."""
        if name not in self.terms:
            if name not in AUX_LOSSES:
                raise ValueError(f"name must be one of {tuple(AUX_LOSSES)} (moe_lab.losses.AUX_LOSSES), got {name!r}")
            self.terms[name] = _layer_sum(self.infos, name, self.ce.new_zeros(()))
        return self.terms[name]

    def __getattr__(self, attr: str):
        # ``out.aux`` etc. (only called when normal lookup fails)
        if attr in AUX_LOSSES and "terms" in self.__dict__:
            return self.term(attr)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")


class MoETransformer(nn.Module):
    """Decoder-only language model with dense or MoE FFNs (see :class:`ModelConfig`).

    ``loss_weights``: the coefficient of each auxiliary loss term (from the config; a plain dict, so a
    schedule hook may change it during training).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_type("cfg", cfg, ModelConfig, "a moe_lab.model.ModelConfig (e.g. toy_config('mixtral'))")
        self.cfg = cfg
        self.loss_weights = cfg.loss_weights()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, moe) for moe in cfg.moe_layers)
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, list[RoutingInfo]]:
        """idx: ``[B, L]`` int64 -> ``(logits [B, L, vocab], routing info of each MoE layer)``.

        ``cache``: a :class:`KVCache` (from :meth:`new_cache`): ``idx`` holds the next ``L`` tokens after the
        ``cache.length`` cached ones; their keys and values are appended and ``cache.length`` grows by ``L``.
        """
        check_token_ids("idx", idx, self.cfg.vocab_size)
        if cache is not None:
            check_type("cache", cache, KVCache, "None or a moe_lab.model.KVCache (model.new_cache(batch, max_len))")
            attn = self.blocks[0].attn
            weight = self.embed.weight
            cache.check_fits(len(self.blocks), attn.n_kv_heads, attn.head_dim, weight.dtype, weight.device)
            if cache.batch != idx.shape[0]:
                raise ValueError(f"cache holds batch={cache.batch} sequences, idx has {idx.shape[0]}")
        x = self.embed(idx)
        infos = []
        for i, block in enumerate(self.blocks):
            x, info = block(x, cache, i)
            if info is not None:
                infos.append(info)
        if cache is not None:
            cache.length += idx.shape[1]
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return logits, infos

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, *, terms: tuple[str, ...] = ()) -> LossOutput:
        """Next-token loss. idx, targets: ``[B, L]`` (targets int64; :data:`IGNORE_INDEX` skips a position).

        Computes the auxiliary terms with a non-zero weight in ``loss_weights`` (they enter ``total``) and the
        ``terms`` asked for (names of :data:`moe_lab.losses.AUX_LOSSES`, in ``LossOutput.terms`` only)."""
        for name in terms:
            if name not in AUX_LOSSES:
                raise ValueError(f"terms must be names of moe_lab.losses.AUX_LOSSES {tuple(AUX_LOSSES)}, got {name!r}")
        check_token_ids("targets", targets, self.cfg.vocab_size, IGNORE_INDEX)
        if targets.dtype != torch.int64 or targets.shape != getattr(idx, "shape", None):
            raise ValueError(f"targets must be int64 with the shape of idx, {tuple(getattr(idx, 'shape', ()))}, got "
                             f"{targets.dtype} of shape {tuple(targets.shape)}")
        logits, infos = self(idx)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        out = LossOutput(ce, ce, {}, infos)
        total = ce
        for name, weight in self.loss_weights.items():
            if weight:
                value = out.term(name)
                if value is None:
                    raise ValueError(f"loss_weights[{name!r}]={weight}, but this model's layers do not define the "
                                     f"term: {AUX_LOSSES[name].doc}")
                total = total + weight * value
        for name in terms:
            out.term(name)
        out.total = total
        return out

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens, on this model's device
        and in its dtype."""
        weight = self.embed.weight
        attn = self.blocks[0].attn
        return KVCache(len(self.blocks), batch, attn.n_kv_heads, attn.head_dim, max_len, dtype=weight.dtype,
                       device=weight.device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Continue the prompts ``idx: [B, L]`` by ``max_new_tokens`` tokens -> ``[B, L + max_new_tokens]``.

        ``temperature=0``: greedy (argmax); ``> 0``: sample from ``softmax(logits / temperature)``, restricted to
        the ``top_k`` most likely tokens when given, with ``generator`` for repeatable draws. ``use_cache``: run
        the prompt once (prefill), then one token per step through a :class:`KVCache` (decode); False
        recomputes the whole sequence at every step (the slow reference; same tokens in eval mode when the
        MoE layers are dropless: a capacity factor at eval makes routing depend on the batch of tokens).
        Runs in eval mode (and restores the mode), without gradients.
        """
        check_token_ids("idx", idx, self.cfg.vocab_size)
        idx = idx.long()
        check_int("max_new_tokens", max_new_tokens, 0)
        check_number("temperature (0 = greedy)", temperature, 0)
        if top_k is not None:
            check_int("top_k", top_k, 1, self.cfg.vocab_size)
        check_type("generator", generator, (torch.Generator, type(None)), "None or a torch.Generator")
        check_bool("use_cache", use_cache)
        was_training = self.training
        self.eval()
        try:
            out = idx
            cache = self.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
            step_input = idx
            for _ in range(max_new_tokens):
                logits = self(step_input if use_cache else out, cache)[0][:, -1].float()
                token = _next_token(logits, temperature, top_k, generator)
                out = torch.cat([out, token], dim=1)
                step_input = token
            return out
        finally:
            self.train(was_training)
