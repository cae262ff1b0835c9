"""Parameter, FLOP and memory arithmetic for dense and MoE transformers.

Conventions: a multiply-add counts as 2 FLOPs, so a forward pass costs 2 FLOPs per active matmul parameter
per token, plus attention's sequence-length term; training costs 3x the forward pass (backward ~ 2x forward).
Linear layers have no biases; RMSNorm weights are counted (``Arch.norms``). Memory is in bytes.

Layer-level helpers (``ffn_params``, ``moe_params``, ``moe_flops_per_token``) serve the lecture's formulas;
:class:`Arch` describes a whole model (GQA or MLA attention, dense / MoE schedule, routed and shared experts)
and :func:`count_params`, :func:`flops_per_token`, :func:`training_memory`, :func:`inference_memory` apply to it.
Inference: :func:`decode_weight_bytes` (weights read per decode step, the memory-bound cost of generating) and
:func:`quantized_weight_bytes` / :func:`weight_memory` (weight-only quantization with per-group scales).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .experts import _check_activation
from .routing import check_k
from .validation import check_bool, check_choice, check_int, check_number, check_type

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5}
ADAM_STATE_BYTES = 8  # Adam's first and second moments, fp32 each


def ffn_params(d_model: int, d_ff: int, activation: str = "swiglu") -> int:
    """Weights of one FFN: ``2*d*d_ff`` (GELU: in + out) or ``3*d*d_ff`` (SwiGLU: gate, up, down)."""
    check_int("d_model", d_model, 1)
    check_int("d_ff", d_ff, 1)
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


def moe_schedule(n_layers: int, every: int = 1, first_dense: int = 0) -> list[bool]:
    """Which layers have an MoE FFN: after ``first_dense`` dense layers, every ``every``-th layer.

    ``every=1``: all layers (Switch-C, Mixtral); ``every=2``: layers 1, 3, 5, ... (GLaM);
    ``first_dense=k``: the first k layers dense (DeepSeek). Returns ``[n_layers]`` booleans.
    """
    for name, value, low in (("n_layers", n_layers, 0), ("every", every, 1), ("first_dense", first_dense, 0)):
        check_int(name, value, low)
    return [i >= first_dense and (i - first_dense + 1) % every == 0 for i in range(n_layers)]


def _check_heads(d_model: int, n_heads: int, n_kv_heads: int | None, head_dim: int | None) -> None:
    check_int("d_model", d_model, 1)
    check_int("n_heads", n_heads, 1)
    if n_kv_heads is not None:
        check_int("n_kv_heads", n_kv_heads, 1, n_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads={n_heads} (grouped-query attention), got {n_kv_heads}")
    if head_dim is not None:
        check_int("head_dim", head_dim, 1)
    elif d_model % n_heads:
        raise ValueError(f"n_heads must divide d_model={d_model} when head_dim is None (head_dim = d_model / n_heads), "
                         f"got n_heads={n_heads}; or pass head_dim")


def attention_params(d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None) -> int:
    """Weights of multi-head / grouped-query attention: ``W_q, W_o: d x h*hd`` and ``W_k, W_v: d x kv*hd``.

    MHA (``n_kv_heads = n_heads``, ``hd = d / h``) gives the lecture's ``4 d^2``. ``n_kv_heads`` must divide
    ``n_heads`` (each KV head serves a group of query heads); without ``head_dim``, ``n_heads`` must divide ``d``.
    """
    _check_heads(d_model, n_heads, n_kv_heads, head_dim)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    head_dim = d_model // n_heads if head_dim is None else head_dim
    return 2 * d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim


def attention_flops_per_token(n_heads: int, qk_dim: int, v_dim: int, context: int) -> int:
    """Forward FLOPs per token of one layer's attention scores and mixing (no weights involved):
    ``2*h*qk_dim*context`` for ``q k^T`` plus ``2*h*v_dim*context`` for the weighted sum of values.

    ``context`` is how many keys the token attends to: its position when decoding; ``(L+1)/2`` on average
    over a causal training sequence of length ``L``.
    """
    for name, value in (("n_heads", n_heads), ("qk_dim", qk_dim), ("v_dim", v_dim)):
        check_int(name, value, 1)
    check_number("context", context, 0)
    return 2 * n_heads * (qk_dim + v_dim) * context


def expected_experts_touched(num_experts: int, k: int, tokens: int) -> float:
    """Expected number of distinct experts a batch of ``tokens`` uses under uniform random top-k routing:
    ``E * (1 - (1 - k/E)^T)`` (each expert is missed by one token with probability ``1 - k/E``)."""
    check_k(k, num_experts)
    check_int("tokens", tokens, 0)
    return num_experts * (1 - (1 - k / num_experts) ** tokens)


_MLA_SIZES = ("q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim")


@dataclass(frozen=True, kw_only=True)
class Arch:
    """A decoder-only transformer, dense or MoE, described for counting.

    Attention ``"gqa"`` (MHA when ``n_kv_heads`` is None) or ``"mla"`` (DeepSeek-V2/V3 multi-head latent
    attention: queries through a ``q_lora_rank`` bottleneck (0 = none), keys/values through ``kv_lora_rank``).
    FFNs: layers chosen by :func:`moe_schedule` (``moe_every``, ``first_dense``) hold ``num_experts`` routed
    experts of width ``d_expert`` (top-``k``) and ``n_shared`` always-on experts of width ``d_shared``
    (default ``d_expert``); the other layers a dense FFN of width ``d_ff`` (a dense model may leave it 0: no FFN,
    attention only). ``num_experts=0``: a dense model. Sizes are integers; every bad value raises a ``ValueError``
    naming the field.
    """

    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    d_ff: int = 0
    activation: str = "swiglu"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    num_experts: int = 0
    k: int = 0
    d_expert: int = 0
    n_shared: int = 0
    d_shared: int | None = None
    moe_every: int = 1
    first_dense: int = 0
    tie_embeddings: bool = False
    norms: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads"):
            check_int(name, getattr(self, name), 1)
        for name in ("vocab_size", "d_ff", "num_experts", "k", "d_expert", "n_shared", "first_dense") + _MLA_SIZES:
            check_int(name, getattr(self, name), 0)
        check_int("moe_every", self.moe_every, 1)
        if self.d_shared is not None:
            check_int("d_shared", self.d_shared, 1)
        check_bool("tie_embeddings", self.tie_embeddings)
        check_bool("norms", self.norms)
        _check_activation(self.activation)
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention must be one of ('gqa', 'mla'), got {self.attention!r}")
        if self.attention == "mla" and not (self.kv_lora_rank and self.qk_nope_dim + self.qk_rope_dim and self.v_head_dim):
            raise ValueError("attention='mla' needs kv_lora_rank, qk_nope_dim + qk_rope_dim and v_head_dim > 0")
        unused = [n for n in (_MLA_SIZES if self.attention == "gqa" else ("n_kv_heads", "head_dim"))
                  if getattr(self, n) not in (0, None)]
        if unused:
            raise ValueError(f"{', '.join(unused)} do not apply to attention={self.attention!r}; leave them unset")
        if self.attention == "gqa":
            _check_heads(self.d_model, self.n_heads, self.n_kv_heads, self.head_dim)
        if self.num_experts:
            check_k(self.k, self.num_experts)
            if self.d_expert < 1:
                raise ValueError(f"d_expert must be >= 1 for an MoE model, got {self.d_expert}")
            if self.d_ff < 1 and not all(self.moe_layers):
                raise ValueError(f"d_ff must be >= 1: layers {[i for i, m in enumerate(self.moe_layers) if not m]} "
                                 f"are dense (first_dense={self.first_dense}, moe_every={self.moe_every}), got d_ff=0")
        else:
            moe_only = [n for n in ("k", "d_expert", "n_shared", "d_shared") if getattr(self, n) not in (0, None)]
            if moe_only:
                raise ValueError(f"{', '.join(moe_only)} apply to MoE models only; set num_experts >= 1 or leave "
                                 "them unset")
        moe_schedule(self.n_layers, self.moe_every, self.first_dense)

    @property
    def moe_layers(self) -> list[bool]:
        """``[n_layers]`` booleans: which layers are MoE (all False for a dense model)."""
        if not self.num_experts:
            return [False] * self.n_layers
        return moe_schedule(self.n_layers, self.moe_every, self.first_dense)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hd(self) -> int:
        """Head dimension of GQA attention."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim


def _attention_layer_params(a: Arch) -> tuple[int, int]:
    """(weights, norm weights) of one attention block."""
    if a.attention == "gqa":
        return attention_params(a.d_model, a.n_heads, a.kv_heads, a.hd), 0
    qk = a.qk_nope_dim + a.qk_rope_dim
    if a.q_lora_rank:
        q, q_norm = a.d_model * a.q_lora_rank + a.q_lora_rank * a.n_heads * qk, a.q_lora_rank
    else:
        q, q_norm = a.d_model * a.n_heads * qk, 0
    kv = a.d_model * (a.kv_lora_rank + a.qk_rope_dim) + a.kv_lora_rank * a.n_heads * (a.qk_nope_dim + a.v_head_dim)
    out = a.n_heads * a.v_head_dim * a.d_model
    return q + kv + out, q_norm + a.kv_lora_rank


@dataclass(frozen=True)
class ParamCount:
    """Parameters by component: ``components[name] = (total, active per token)``."""

    components: dict[str, tuple[int, int]]

    @property
    def total(self) -> int:
        return sum(t for t, _ in self.components.values())

    @property
    def active(self) -> int:
        return sum(a for _, a in self.components.values())


def _check_arch(arch: Arch) -> None:
    check_type("arch", arch, Arch, "a moe_lab.calculator.Arch")


def count_params(arch: Arch) -> ParamCount:
    """Total and active-per-token parameters of ``arch``, by component (embedding, attention, dense_ffn,
    router, routed_experts, shared_experts, norms, lm_head). The input embedding counts as active
    (a token reads its row) as published model cards do."""
    _check_arch(arch)
    a = arch
    attn, attn_norms = _attention_layer_params(a)
    moe = a.moe_layers
    n_moe = sum(moe)
    n_dense = a.n_layers - n_moe
    expert = ffn_params(a.d_model, a.d_expert, a.activation) if n_moe else 0
    shared = ffn_params(a.d_model, a.d_expert if a.d_shared is None else a.d_shared, a.activation) if n_moe else 0
    dense = ffn_params(a.d_model, a.d_ff, a.activation) if n_dense and a.d_ff else 0
    norms = (a.n_layers * (2 * a.d_model + attn_norms) + a.d_model) if a.norms else 0
    embedding = a.vocab_size * a.d_model
    lm_head = 0 if a.tie_embeddings else embedding

    def same(n: int) -> tuple[int, int]:
        return n, n

    return ParamCount({
        "embedding": same(embedding),
        "attention": same(a.n_layers * attn),
        "dense_ffn": same(n_dense * dense),
        "router": same(n_moe * a.d_model * a.num_experts),
        "routed_experts": (n_moe * a.num_experts * expert, n_moe * a.k * expert),
        "shared_experts": same(n_moe * a.n_shared * shared),
        "norms": same(norms),
        "lm_head": same(lm_head),
    })


def flops_per_token(arch: Arch, context: int = 0, *, training: bool = False) -> int:
    """FLOPs per token: forward ``2 x`` active matmul weights (everything active but the embedding lookup
    and the norms; the output projection counts even when tied) plus attention over ``context`` keys;
    ``training=True`` multiplies by 3 (forward + backward)."""
    check_number("context", context, 0)
    check_bool("training", training)
    c = count_params(arch).components
    matmul = sum(c[name][1] for name in ("attention", "dense_ffn", "router", "routed_experts", "shared_experts"))
    matmul += arch.vocab_size * arch.d_model
    if arch.attention == "gqa":
        qk_dim = v_dim = arch.hd
    else:
        qk_dim, v_dim = arch.qk_nope_dim + arch.qk_rope_dim, arch.v_head_dim
    forward = 2 * matmul + arch.n_layers * attention_flops_per_token(arch.n_heads, qk_dim, v_dim, context)
    return 3 * forward if training else forward


def _bytes(dtype: str) -> float:
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def training_memory(num_params: int, dtype: str = "bf16") -> dict[str, float]:
    """Bytes to train ``num_params`` weights with Adam, activations excluded: weights and gradients in
    ``dtype``, an fp32 master copy when ``dtype`` is not fp32, and Adam's two fp32 moments
    (mixed precision bf16: 2 + 2 + 4 + 8 = 16 bytes per parameter)."""
    check_number("num_params", num_params, 0)
    b = _bytes(dtype)
    parts = {
        "weights": num_params * b,
        "gradients": num_params * b,
        "master_weights": 0.0 if dtype == "fp32" else num_params * 4.0,
        "adam_states": num_params * float(ADAM_STATE_BYTES),
    }
    parts["total"] = sum(parts.values())
    return parts


def kv_cache_bytes(arch: Arch, context: int, batch: int = 1, dtype: str = "bf16") -> float:
    """KV cache for ``batch`` sequences of ``context`` tokens: per token and layer, GQA stores ``2*kv*hd``
    values (keys and values); MLA stores the compressed latent and the shared rope key,
    ``kv_lora_rank + qk_rope_dim`` values."""
    _check_arch(arch)
    for name, value in (("context", context), ("batch", batch)):
        check_int(name, value, 0)
    per_token = 2 * arch.kv_heads * arch.hd if arch.attention == "gqa" else arch.kv_lora_rank + arch.qk_rope_dim
    return arch.n_layers * per_token * context * batch * _bytes(dtype)


def inference_memory(arch: Arch, context: int, batch: int = 1, dtype: str = "bf16") -> dict[str, float]:
    """Bytes to serve ``arch``: all weights (every expert must be resident, not only the active ones)
    plus the KV cache; activations excluded."""
    parts = {"weights": count_params(arch).total * _bytes(dtype),
             "kv_cache": kv_cache_bytes(arch, context, batch, dtype)}
    parts["total"] = parts["weights"] + parts["kv_cache"]
    return parts


FLOAT_BITS = (16, 32)
QUANT_BITS = (4, 8)


def quantized_weight_bytes(num_params: int, bits: int, group_size: int = 128, scale_bytes: float = 2.0) -> float:
    """Bytes of ``num_params`` weights at ``bits`` per weight: 4 / 8 (weight-only quantization with one
    ``scale_bytes`` scale per ``group_size`` weights: ``N*bits/8 + N/group_size*scale_bytes``; per-channel
    scales: ``group_size`` = the input width) or 16 / 32 (floats, no scales)."""
    check_number("num_params", num_params, 0)
    check_choice("bits", bits, QUANT_BITS + FLOAT_BITS)
    bits = int(bits)
    if bits in FLOAT_BITS:
        return num_params * bits / 8
    check_int("group_size", group_size, 1)
    check_number("scale_bytes", scale_bytes, 0)
    return num_params * bits / 8 + num_params / group_size * scale_bytes



def weight_memory(arch: Arch, bits: dict[str, int] | None = None, *, group_size: int = 128,
                  scale_bytes: float = 2.0) -> dict[str, float]:
    """Bytes of ``arch``'s weights with ``bits[component]`` bits per weight for the components of
    :func:`count_params` (``routed_experts``, ``attention``, ...; others: 16, i.e. bf16), quantized ones with
    :func:`quantized_weight_bytes`. E.g. ``{"routed_experts": 4, "shared_experts": 4, "attention": 8}``."""
    components = count_params(arch).components
    if bits is not None:
        check_type("bits", bits, dict, "None or a dict {component: bits}")
    bits = dict(bits or {})
    check_int("group_size", group_size, 1)
    check_number("scale_bytes", scale_bytes, 0)
    unknown = sorted(set(bits) - set(components))
    if unknown:
        raise ValueError(f"bits keys must be among {tuple(components)}, got {unknown}")
    parts = {name: quantized_weight_bytes(total, bits.get(name, 16), group_size, scale_bytes)
             for name, (total, _) in components.items()}
    parts["total"] = sum(parts.values())
    return parts


def decode_weight_bytes(arch: Arch, batch: int = 1, bits: int = 16) -> float:
    """Bytes of weights one decode step reads for ``batch`` sequences (one new token each) at ``bits`` per
    weight (scales ignored): every dense weight once, ``batch`` embedding rows, and in each MoE layer the
    shared experts plus the routed experts the batch touches, ``E (1 - (1 - k/E)^batch)`` under uniform routing
    (the router, norms and output head are read whole)
    (:func:`expected_experts_touched`). Per generated token: divide by ``batch``."""
    c = count_params(arch).components
    check_int("batch", batch, 1)
    check_choice("bits", bits, QUANT_BITS + FLOAT_BITS)
    read = sum(c[name][0] for name in ("attention", "dense_ffn", "router", "shared_experts", "norms", "lm_head"))
    # untied: batch rows of the input embedding; tied: the output projection reads the whole matrix
    read += c["embedding"][0] if arch.tie_embeddings else min(batch, arch.vocab_size) * arch.d_model
    n_moe = sum(arch.moe_layers)
    if n_moe:
        expert = ffn_params(arch.d_model, arch.d_expert, arch.activation)
        read += n_moe * expected_experts_touched(arch.num_experts, arch.k, batch) * expert
    return read * bits / 8


def decode_step_bytes(arch: Arch, batch: int, context: int, bits: int = 16, kv_dtype: str = "bf16") -> dict[str, float]:
    """Bytes one decode step reads for ``batch`` sequences with ``context`` cached tokens each: the weights
    (:func:`decode_weight_bytes` at ``bits``) and every sequence's KV cache (:func:`kv_cache_bytes` in
    ``kv_dtype``), and their ``"total"``."""
    parts = {"weights": decode_weight_bytes(arch, batch, bits), "kv_cache": kv_cache_bytes(arch, context, batch, kv_dtype)}
    parts["total"] = parts["weights"] + parts["kv_cache"]
    return parts


def ridge_batch(arch: Arch, context: int, ridge: float, bits: int = 16, kv_dtype: str = "bf16",
                max_batch: int = 2 ** 24) -> int | None:
    """Smallest decode batch whose arithmetic intensity, ``batch * flops_per_token(arch, context)`` over
    :func:`decode_step_bytes` ``"total"``, reaches ``ridge`` FLOP per byte (a chip's peak FLOP/s over its
    bandwidth); ``None`` if no batch up to ``max_batch`` does. The intensity grows with the batch (weights are
    shared) but stays below ``flops_per_token / KV bytes per token``: the KV cache is read once per sequence."""
    check_number("ridge", ridge, 0, low_open=True)
    check_int("max_batch", max_batch, 1)
    flops = flops_per_token(arch, context)

    def reaches(batch: int) -> bool:
        return batch * flops >= ridge * decode_step_bytes(arch, batch, context, bits, kv_dtype)["total"]

    if not reaches(max_batch):
        return None
    low, high = 0, max_batch  # reaches(high), not reaches(low); the intensity grows with the batch
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reaches(mid) else (mid, high)
    return high


_MLA = dict(attention="mla", n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64,
            v_head_dim=128)

PRESETS: dict[str, Arch] = {
    "mixtral_8x7b": Arch(name="Mixtral 8x7B", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                         vocab_size=32000, num_experts=8, k=2, d_expert=14336),
    "deepseek_moe_16b": Arch(name="DeepSeekMoE 16B", n_layers=28, d_model=2048, n_heads=16, vocab_size=102400,
                             d_ff=10944, num_experts=64, k=6, d_expert=1408, n_shared=2, first_dense=1),
    "deepseek_v2": Arch(name="DeepSeek-V2", n_layers=60, d_model=5120, vocab_size=102400, d_ff=12288,
                        num_experts=160, k=6, d_expert=1536, n_shared=2, first_dense=1, **_MLA),
    "deepseek_v3": Arch(name="DeepSeek-V3", n_layers=61, d_model=7168, vocab_size=129280, d_ff=18432,
                        num_experts=256, k=8, d_expert=2048, n_shared=1, first_dense=3, **_MLA),
    # the lecture's worked example: one layer, MHA (4 d^2), GELU FFN (2 d d_ff), 128 experts of the dense size
    "lecture_example": Arch(name="Lecture example (one MoE layer)", n_layers=1, d_model=4096, n_heads=32,
                            vocab_size=0, activation="gelu", num_experts=128, k=2, d_expert=16384, norms=False),
}
"""Real models (configs in FACTS.md) and the lecture's worked example."""

PUBLISHED: dict[str, tuple[float, float, str]] = {
    "mixtral_8x7b": (46.7e9, 12.9e9, "Mistral AI, Mixtral of experts (release post, Dec 2023); the paper rounds to 47B / 13B"),
    "deepseek_moe_16b": (16.4e9, 2.8e9, "Dai et al. 2024, DeepSeekMoE, Sec. 5 / Table 3"),
    "deepseek_v2": (236e9, 21e9, "DeepSeek-AI 2024, DeepSeek-V2, abstract"),
    "deepseek_v3": (671e9, 37e9, "DeepSeek-AI 2024, DeepSeek-V3, abstract (main model, no MTP module)"),
}
"""Published ``(total, active, source)`` parameter counts."""

PUBLISHED_ROUTING: dict[str, dict] = {
    "deepseek_moe_16b": dict(score_func="softmax", renormalize=False, n_groups=1, topk_groups=1,
                             routed_scaling_factor=1.0),
    "deepseek_v2": dict(score_func="softmax", renormalize=False, n_groups=8, topk_groups=3, group_score="max",
                        routed_scaling_factor=16.0),
    "deepseek_v3": dict(score_func="sigmoid", renormalize=True, selection_bias=True,
                        n_groups=8, topk_groups=4, group_score="top2_sum", routed_scaling_factor=2.5),
}
"""How the DeepSeek presets route, as :class:`moe_lab.config.MoEOptions` fields (DeepSeek-V3 repository,
``inference/model.py`` and its configs; the papers: V2 device-limited routing with D = 8, M = 3; V3
node-limited routing with 8 groups, 4 kept, bias-corrected sigmoid scores). The toy presets
``moe_lab.model.toy_config("deepseek_v1" / "_v2" / "_v3")`` follow them, except V2's scaling factor 16
(toy: 1, like V1)."""


def dense_counterpart(arch: Arch) -> Arch:
    """The same model with every FFN dense (width ``d_ff``, or ``d_expert`` when ``d_ff`` is 0)."""
    _check_arch(arch)
    return replace(arch, num_experts=0, k=0, n_shared=0, d_shared=None, d_expert=0, d_ff=arch.d_ff or arch.d_expert,
                   name=f"{arch.name} (dense)")
