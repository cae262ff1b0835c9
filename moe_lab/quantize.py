"""Weight-only quantization: int8 per output channel and int4 group-wise, symmetric, with scales.

A weight ``w: [..., d_in, d_out]`` (the layout of :class:`moe_lab.Experts`: ``y = x @ w``) is split along ``d_in``
into groups of ``group_size`` rows (``None``: one group, i.e. per output channel); each group of each output
column gets one scale ``s = max|w| / q_max`` with ``q_max = 2^(bits-1) - 1`` (127 for int8, 7 for int4), and
the codes are ``q = clamp(round(w / s), -q_max, q_max)``; ``w ~ s * q``. Rounding is to the nearest code with the
*stored* scale, so ``|w - s q| <= s / 2`` for every weight, and the stored scale is ``max|w| / q_max`` up to the
rounding of its dtype (relative ``2^-11`` in float16, ``2^-8`` in bfloat16, ``2^-24`` in float32): the error is at
most ``max|w| / (2 q_max)`` of the weight's group times ``1 + 2^-10`` (float16 or float32 scales; ``1 + 2^-8`` with
bfloat16), at every magnitude. ``scale_dtype``: None (default) stores float16 scales, as GPTQ / AWQ / HQQ do, when
every non-zero scale of the tensor is a normal float16 number (``6.1e-5 <= s <= 65504``: about ``|w| >= 7.8e-3``
for int8, ``4.3e-4`` for int4) and float32 scales otherwise; a dtype given explicitly is used, and a scale it
cannot hold as a normal number raises a ``ValueError``.
(A scale below float32's smallest normal, ``|w| < 1e-36``, is stored as that number: the error stays below
``6e-39``.) int4 codes are packed two per byte.

:class:`QuantizedExperts` holds a layer's experts this way and runs them with the same forward methods as
:class:`moe_lab.Experts` (each expert's weights are dequantized when it runs: weight-only quantization saves
memory and bytes moved, not FLOPs). :func:`quantize_model` applies it to a model's experts, and fake-quantizes
(quantize, then store the dequantized values) attention, dense FFNs, shared experts, embedding and output head
for the "everything" experiments: the same numbers as a dequantize-on-the-fly kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .experts import Experts
from .layer import MoELayer
from .model import MoETransformer
from .utils import compute_dtype
from .validation import check_bool, check_choice, check_finite, check_tensor, check_type, is_int

BITS = (4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EXPERT_WEIGHTS = ("w1", "w3", "w2")


def _check_options(bits: int, scale_dtype: torch.dtype | None) -> None:
    check_choice("bits", bits, BITS)
    if scale_dtype is not None:
        check_choice("scale_dtype", scale_dtype, SCALE_DTYPES)


def _check_group(group_size: int | None, d_in: int) -> int:
    """The group size in force for an input width ``d_in`` (``None``: all ``d_in`` rows)."""
    if group_size is None:
        return d_in
    if not is_int(group_size) or group_size < 1 or d_in % group_size:
        raise ValueError(f"group_size must be None or a positive integer dividing the input width d_in={d_in}, "
                         f"got {group_size!r}")
    return int(group_size)


def _scale_dtype(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype that stores the exact scales ``scale`` (see the module docstring): ``scale_dtype``, or with None
    float16 if it holds every non-zero scale as a normal number, else float32."""
    nonzero = scale[scale > 0]
    if not nonzero.numel():
        return torch.float16 if scale_dtype is None else scale_dtype
    low, high = float(nonzero.min()), float(nonzero.max())
    for dtype in (torch.float16, torch.float32) if scale_dtype is None else (scale_dtype,):
        info = torch.finfo(dtype)
        if dtype == torch.float32 or info.smallest_normal <= low and high <= info.max:
            return dtype
    info = torch.finfo(scale_dtype)
    raise ValueError(f"scale_dtype={scale_dtype} cannot hold the scales max|w| / q_max of w (from {low:.3g} to "
                     f"{high:.3g}; its normal numbers span {info.smallest_normal:.3g} to {info.max:.3g}), so the "
                     "error bound would not hold: use scale_dtype=None (automatic) or torch.float32")


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[..., d_in, d_out]`` in [-8, 7] -> ``[..., ceil(d_in*d_out/2)]`` uint8, two per byte."""
    flat = (codes.flatten(-2) + 8).to(torch.uint8)
    if flat.shape[-1] % 2:
        flat = F.pad(flat, (0, 1))
    return flat[..., 0::2] | (flat[..., 1::2] << 4)


def _unpack4(packed: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
    """Inverse of :func:`_pack4`: int8 codes ``[..., d_in, d_out]``."""
    flat = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)[..., : d_in * d_out]
    return (flat.to(torch.int8) - 8).unflatten(-1, (d_in, d_out))


@dataclass
class QuantizedTensor:
    """A weight ``[..., d_in, d_out]`` as codes and scales (see the module docstring).

    data: int8 codes ``[..., d_in, d_out]`` (bits 8) or uint8 ``[..., ceil(d_in*d_out/2)]`` (bits 4, packed).
    scale: ``[..., d_in / group_size, 1, d_out]`` in ``scale_dtype``.
    """

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return self.data.nbytes + self.scale.nbytes

    def codes(self) -> torch.Tensor:
        """int8 codes ``[..., d_in, d_out]`` in ``[-q_max, q_max]``."""
        return self.data if self.bits == 8 else _unpack4(self.data, *self.shape[-2:])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale * codes`` as a ``shape`` tensor in ``dtype`` (a floating-point dtype)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        *lead, d_in, d_out = self.shape
        grouped = self.codes().reshape(*lead, d_in // self.group_size, self.group_size, d_out)
        return (grouped.to(torch.float32) * self.scale.to(torch.float32)).reshape(self.shape).to(dtype)

    def __getitem__(self, i: int) -> "QuantizedTensor":
        """The ``i``-th weight along the first dimension (e.g. one expert of a stacked ``[E, d_in, d_out]``)."""
        if len(self.shape) < 3:
            raise ValueError(f"indexing needs a stacked weight [n, d_in, d_out], this one has shape {self.shape}")
        return QuantizedTensor(self.data[i], self.scale[i], self.bits, self.group_size, self.shape[1:])


def quantize(w: torch.Tensor, bits: int = 8, group_size: int | None = None, *,
             scale_dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Symmetric weight-only quantization of ``w: [..., d_in, d_out]`` (see the module docstring).

    ``bits``: 8 or 4; ``group_size``: rows of ``d_in`` sharing a scale (None: all, per output channel; must
    divide ``d_in``); ``scale_dtype``: None (float16, or float32 where float16 cannot hold a scale) or one of
    :data:`SCALE_DTYPES`. Raises ``ValueError`` for other bits, a group size that does not divide ``d_in``, a
    weight that is not finite, or a scale that ``scale_dtype`` cannot hold.
    """
    check_tensor("w", w, "[..., d_in, d_out]")
    if w.dim() < 2 or not w.shape[-2]:
        raise ValueError(f"w must have shape [..., d_in >= 1, d_out], got shape {tuple(w.shape)}")
    *lead, d_in, d_out = w.shape
    _check_options(bits, scale_dtype)
    group = _check_group(group_size, d_in)
    check_finite("w", w)
    w32 = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise ValueError(f"w must fit into float32 (the quantization math), got |w| up to {float(w.abs().max()):.3g}")
    qmax = 2 ** (bits - 1) - 1
    grouped = w32.reshape(*lead, d_in // group, group, d_out)
    amax = grouped.abs().amax(dim=-2, keepdim=True)  # [..., groups, 1, d_out]
    exact = amax.double() / qmax  # float32 division could round to 0 below float32's smallest normal
    dtype = _scale_dtype(exact, scale_dtype)
    scale = exact.clamp(min=torch.finfo(dtype).tiny).to(dtype)  # a zero group: codes 0, any scale
    codes = (grouped / scale.to(torch.float32)).round().clamp(-qmax, qmax).to(torch.int8).reshape(w.shape)
    data = codes if bits == 8 else _pack4(codes)
    return QuantizedTensor(data, scale, bits, group, tuple(w.shape))


def fake_quantize(w: torch.Tensor, bits: int = 8, group_size: int | None = None, *,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype: the weight a quantized kernel effectively multiplies by."""
    return quantize(w, bits, group_size, scale_dtype=scale_dtype).dequantize(w.dtype)


class QuantizedExperts(nn.Module):
    """A layer's experts with weight-only quantized ``w1, w3, w2`` and :class:`moe_lab.Experts`' forward methods
    (``forward_one``, ``forward_grouped``, ``forward_batched``), so every dispatch path runs it unchanged.

    Each expert's weights are dequantized to the compute dtype when that expert runs (``forward_grouped``
    dequantizes only the experts that have tokens). Codes and scales are buffers (they follow ``.to(device)``
    and are saved in ``state_dict``); ``w1``, ``w3``, ``w2`` read back the dequantized float32 stacks.
    Build with ``QuantizedExperts(experts, bits, group_size)`` or :func:`quantize_model`. ``group_size`` must
    divide the input width of every weight (``d_model`` for ``w1`` / ``w3``, ``d_ff`` for ``w2``); with
    ``fallback=True`` a weight whose input width it does not divide gets per-channel scales instead.
    """

    def __init__(self, experts: Experts, bits: int = 8, group_size: int | None = None, *,
                 scale_dtype: torch.dtype | None = None, fallback: bool = False):
        super().__init__()
        check_type("experts", experts, Experts, "a moe_lab.Experts (the float experts to quantize)")
        _check_options(bits, scale_dtype)
        check_bool("fallback", fallback)
        self.num_experts, self.d_model, self.d_ff = experts.num_experts, experts.d_model, experts.d_ff
        self.activation, self.dropout = experts.activation, getattr(experts, "dropout", 0.0)
        self.bits = bits
        self._names = [n for n in EXPERT_WEIGHTS if getattr(experts, n) is not None]
        self._shapes, self._group = {}, {}
        for name in self._names:
            w = getattr(experts, name)
            group = _group_or_channel(group_size, w.shape[-2]) if fallback else group_size
            q = quantize(w, bits, group, scale_dtype=scale_dtype)
            self.register_buffer(f"{name}_data", q.data)
            self.register_buffer(f"{name}_scale", q.scale)
            self._shapes[name], self._group[name] = q.shape, q.group_size

    def quantized(self, name: str) -> QuantizedTensor | None:
        """The :class:`QuantizedTensor` of weight ``name`` (``w1``, ``w3``, ``w2``; None for GELU's ``w3``)."""
        if name not in self._names:
            return None
        return QuantizedTensor(getattr(self, f"{name}_data"), getattr(self, f"{name}_scale"), self.bits,
                               self._group[name], self._shapes[name])

    @property
    def nbytes(self) -> int:
        """Bytes of every code and scale."""
        return sum(self.quantized(n).nbytes for n in self._names)

    w1 = property(lambda self: self.quantized("w1").dequantize(), doc="Dequantized ``[E, d_model, d_ff]``.")
    w3 = property(lambda self: None if "w3" not in self._names else self.quantized("w3").dequantize(),
                  doc="Dequantized ``[E, d_model, d_ff]`` (None for GELU experts).")
    w2 = property(lambda self: self.quantized("w2").dequantize(), doc="Dequantized ``[E, d_ff, d_model]``.")

    def expert_weights(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """``(w1[e], w3[e], w2[e])`` of every expert, dequantized to ``dtype`` (``w3[e]`` None for GELU)."""
        return [self._expert(e, dtype) for e in range(self.num_experts)]

    def _expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        w3 = self.quantized("w3")
        return (self.quantized("w1")[e].dequantize(dtype), None if w3 is None else w3[e].dequantize(dtype),
                self.quantized("w2")[e].dequantize(dtype))

    def mlp(self, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
        """One expert with the given (dequantized) weights. x: ``[n, d_model]`` -> ``[n, d_model]``."""
        h = F.gelu(x @ w1) if w3 is None else F.silu(x @ w1) * (x @ w3)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return h @ w2

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens. x: ``[n, d_model]`` -> ``[n, d_model]``."""
        dtype = compute_dtype(x)
        return self.mlp(x.to(dtype), *self._expert(e, dtype))

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, *, fused: bool | None = None,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
        """All experts on expert-sorted rows: x ``[S, d_model]``, ``counts: [E]`` -> ``[S, d_model]``, each output
        row times ``scale: [S]`` when given. ``fused`` is accepted for the dispatch signature; every expert runs
        as its own matmuls on its dequantized weights."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        out = x.new_empty(x.shape[0], self.d_model)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = slice(start, start + n)
                y = self.forward_one(e, x[rows])
                out[rows] = y if scale is None else y * scale[rows, None].to(dtype)
                start += n
        return out

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own buffer. x: ``[E, C, d_model]`` -> ``[E, C, d_model]``."""
        return torch.stack([self.forward_one(e, x[e]) for e in range(self.num_experts)])

    def extra_repr(self) -> str:
        groups = {self._group[n] for n in self._names}
        group = groups.pop() if len(groups) == 1 else self._group
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation!r}, bits={self.bits}, group_size={group}")


QUANTIZED = "_moe_lab_quantized"
"""The attribute :func:`quantize_model` sets on a model it quantized (``{part: bits}``)."""
PARTS = ("experts", "shared", "attention", "dense_ffn", "embedding", "lm_head")
"""What :func:`quantize_model` can quantize: routed experts (real :class:`QuantizedExperts`), and fake-quantized
shared experts, attention projections, dense FFNs, the input embedding and the output head."""


def _group_or_channel(group_size: int | None, d_in: int) -> int | None:
    """:func:`quantize_model`'s rule: ``group_size`` where it divides the input width ``d_in``, else None
    (per-channel scales)."""
    return group_size if group_size is not None and d_in % group_size == 0 else None


def quantize_model(model: nn.Module, bits: dict[str, int], group_size: int | None = None, *,
                   scale_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Quantize a :class:`moe_lab.model.MoETransformer` in place; ``bits = {part: 8 or 4}`` for the parts of
    :data:`PARTS` to quantize (others stay as they are). Routed experts become :class:`QuantizedExperts`; the
    other parts are fake-quantized (their float weights replaced by the dequantized values: the same outputs
    as a kernel that dequantizes on the fly, but no memory saved in this process). ``group_size`` applies to
    every weight whose own input width it divides (an expert's ``w1`` / ``w3``: ``d_model``; its ``w2``:
    ``d_ff``), the others fall back to per-channel scales.

    A model quantizes once: the weights must be the original floats, so a second call (e.g. a notebook cell run
    again) raises a ``ValueError``; quantize a fresh copy (``copy.deepcopy`` of the float model) instead.

    Returns ``{part: bytes}`` of the weights of every part after quantization (float parts at their dtype's
    size, quantized ones as codes + scales, whether real or fake).
    """
    check_type("model", model, MoETransformer, "a moe_lab.model.MoETransformer (quantize a layer's experts "
               "with QuantizedExperts)")
    check_type("bits", bits, dict, "a dict {part: 8 or 4}")
    unknown = sorted(set(bits) - set(PARTS), key=repr)
    if unknown:
        raise ValueError(f"bits keys must be among {PARTS}, got {unknown}")
    for part, b in bits.items():
        check_choice(f"bits[{part!r}]", b, BITS)
    _check_options(8, scale_dtype)
    if group_size is not None and (not is_int(group_size) or group_size < 1):
        raise ValueError(f"group_size must be None or an integer >= 1, got {group_size!r}")
    done = getattr(model, QUANTIZED, None)
    if done is not None or any(isinstance(m, QuantizedExperts) for m in model.modules()):
        raise ValueError(f"model is already quantized ({done or 'its experts are QuantizedExperts'}): quantize_model "
                         "quantizes float weights once; quantize a copy of the float model instead "
                         "(copy.deepcopy(model) before the first call)")
    sizes = dict.fromkeys(PARTS, 0)

    def fake(part: str, weight: torch.Tensor, transpose: bool) -> None:
        # nn.Linear / nn.Embedding store [d_out, d_in] (embedding rows: one per token, scaled per row)
        w = weight.data.T if transpose else weight.data
        if part in bits:
            q = quantize(w, bits[part], _group_or_channel(group_size, w.shape[-2]), scale_dtype=scale_dtype)
            weight.data.copy_((q.dequantize(w.dtype).T if transpose else q.dequantize(w.dtype)))
            sizes[part] += q.nbytes
        else:
            sizes[part] += weight.nbytes

    for block in model.blocks:
        for proj in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
            fake("attention", proj.weight, transpose=True)
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            if "experts" in bits:
                ffn.experts = QuantizedExperts(ffn.experts, bits["experts"], group_size, scale_dtype=scale_dtype,
                                               fallback=True)
            experts = ffn.experts
            sizes["experts"] += experts.nbytes if isinstance(experts, QuantizedExperts) else sum(
                p.nbytes for p in experts.parameters())
            dense = [ffn.shared.experts] if ffn.shared is not None else []
            part = "shared"
        else:
            dense, part = [ffn.experts], "dense_ffn"
        for module in dense:
            for name in EXPERT_WEIGHTS:
                w = getattr(module, name)
                if w is not None:
                    fake(part, w, transpose=False)
    fake("embedding", model.embed.weight, transpose=True)
    if model.lm_head is not None:
        fake("lm_head", model.lm_head.weight, transpose=True)
    if bits:
        setattr(model, QUANTIZED, dict(bits))
    return sizes
