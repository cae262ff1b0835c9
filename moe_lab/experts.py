"""Expert FFNs with stacked weights, and the grouped computation that runs them all at once.

Weights are stacked over experts: ``w1, w3: [E, d_model, d_ff]``, ``w2: [E, d_ff, d_model]``.
Activations: ``"gelu"``: ``w2(gelu(x w1))``; ``"swiglu"``: ``w2(silu(x w1) * x w3)`` (Mixtral, DeepSeek).

On expert-sorted rows (:meth:`Experts.forward_grouped`) the experts run either as three grouped matmuls
(:func:`grouped_mm`: ``torch.nn.functional.grouped_mm``, the default on CUDA) or one expert at a time with a
hand-written backward, the experts shared among the CPU threads (:class:`_ExpertMLP`, the default on CPU).
"""
from __future__ import annotations

import itertools
import math
import threading
from typing import Callable, Literal

import torch
from torch import nn
import torch.nn.functional as F

from .utils import compute_dtype
from .validation import check_int, check_number

Activation = Literal["gelu", "swiglu"]
ACTIVATIONS = ("gelu", "swiglu")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def fused_grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` supports these operands on this machine.

    CPU: float32 or bf16 with 16-byte aligned rows. CUDA: bf16 with 16-byte aligned rows on sm90+.
    :func:`grouped_mm` uses it by default on CUDA only (see there).
    """
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], w.shape[-1]))
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16) and aligned
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects expanded (stride-0) gradients such as the one ``out.sum()`` sends.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _takes_fused(x: torch.Tensor, w: torch.Tensor, fused: bool | None) -> bool:
    """Whether :func:`grouped_mm` runs ``F.grouped_mm`` for these operands (``fused=None``: CUDA when usable)."""
    if fused is None:
        return x.device.type != "cpu" and fused_grouped_mm_usable(x, w)
    if fused and not hasattr(F, "grouped_mm"):
        raise ValueError(f"fused=True needs torch.nn.functional.grouped_mm (torch {torch.__version__} has none); "
                         "use fused=None or False")
    return bool(fused)


def check_counts(counts, num_groups: int, num_rows: int) -> list[int] | None:
    """Check ``counts``: a 1-D integer tensor of ``num_groups`` non-negative entries summing to ``num_rows``.

    Its shape and dtype are always checked; its values only where reading them is free of a host-device sync (a
    CPU tensor, or any tensor under ``torch.autograd.set_detect_anomaly(True)``). Returns the counts as a list
    when the values were read (None otherwise).
    """
    expected = (f"counts must have {num_groups} entries summing to the {num_rows} rows of x "
                "(a 1-D integer tensor, entries >= 0)")
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{expected}, got {type(counts).__name__}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(f"{expected}, got dtype {counts.dtype}")
    if counts.shape != (num_groups,):
        raise ValueError(f"{expected}, got shape {tuple(counts.shape)}")
    if counts.device.type != "cpu" and not torch.is_anomaly_enabled():
        return None
    values = counts.tolist()
    if min(values, default=0) < 0 or sum(values) != num_rows:
        raise ValueError(f"{expected}, got {values}")
    return values


def grouped_mm_kernel(x: torch.Tensor, w: torch.Tensor, fused: bool | None = None) -> str:
    """In words, what ``grouped_mm(x, w, counts, fused=fused)`` runs on these operands on this machine."""
    if _takes_fused(x, w, fused):
        return "torch.nn.functional.grouped_mm (one fused kernel)"
    return "per-expert matmuls on contiguous slices"


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
    """Multiply consecutive row groups of ``x`` by their own matrix.

    Args:
        x: ``[S, d_in]`` rows sorted by group; group ``e`` has ``counts[e]`` rows.
        w: ``[E, d_in, d_out]`` one matrix per group.
        counts: ``[E]`` int rows per group (may contain zeros), summing to ``S`` (checked by
            :func:`check_counts`: a ``ValueError`` naming ``counts`` otherwise).
        fused: use ``F.grouped_mm`` (True) or the per-group fallback (False). ``None``: fused on CUDA when
            usable (one kernel, no host sync); the fallback on CPU, where per-group matmuls are as fast as
            torch's CPU kernel with one thread or passive OpenMP waiting, and up to 2x faster on a busy
            machine with OpenMP's default spin-waiting. Both give the same results up to float rounding.
            :func:`grouped_mm_kernel` names the choice.
    Returns:
        ``[S, d_out]`` with rows of group ``e`` equal to ``x_e @ w[e]``.
    """
    host_counts = check_counts(counts, w.shape[0], x.shape[0])
    if _takes_fused(x, w, fused):
        offsets = counts.cumsum(0).to(torch.int32)
        return _contiguous_grad(F.grouped_mm(x, w, offs=offsets))
    # Fallback: one matmul per group on contiguous slices (needs the counts on the host).
    if host_counts is None:  # read now anyway (a sync on CUDA): check the values too
        host_counts = check_counts(counts.cpu(), w.shape[0], x.shape[0])
    pieces = [xe @ we for xe, we in zip(torch.split(x, host_counts), w)]
    return torch.cat(pieces) if pieces else x.new_empty(0, w.shape[-1])


Group = tuple[int, slice]  # an expert and the slice of its consecutive rows


def _groups(counts: list[int]) -> list[Group]:
    """``(e, rows)`` for every expert that has rows."""
    ends = itertools.accumulate(counts)
    return [(e, slice(end - n, end)) for e, (n, end) in enumerate(zip(counts, ends)) if n]


def _split_groups(groups: list[Group], parts: int) -> list[list[Group]]:
    """Share experts among ``parts`` workers with about equal rows each (largest first, each to the least
    loaded worker; deterministic). Returns the non-empty shares."""
    shares: list[list[Group]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for group in sorted(groups, key=lambda g: g[1].start - g[1].stop):  # stable: ties keep expert order
        i = loads.index(min(loads))
        shares[i].append(group)
        loads[i] += group[1].stop - group[1].start
    return [share for share in shares if share]


def _run_shares(work: Callable[[list[Group]], None], groups: list[Group], threads: int) -> None:
    """``work(share)`` for the experts' shares on ``threads`` OS threads, each with one intra-op thread.

    Expert-level parallelism: on a CPU one single-threaded expert per core beats splitting every small GEMM
    and element-wise op over the cores, each split a parallel region whose wake-up (OpenMP passive waiting)
    costs about as much as the op. Shares write disjoint outputs, so results do not depend on timing.
    """
    shares = _split_groups(groups, threads)
    if len(shares) <= 1:
        for share in shares:
            work(share)
        return
    errors: list[BaseException] = []

    def run(share: list[Group]) -> None:
        try:
            torch.set_num_threads(1)
            with torch.no_grad():  # grad mode is per thread
                work(share)
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    helpers = [threading.Thread(target=run, args=(share,)) for share in shares[1:]]
    try:
        for helper in helpers:
            helper.start()
        work(shares[0])
    finally:
        for helper in helpers:
            helper.join()
        torch.set_num_threads(saved)  # the helpers' setting is process-wide
    if errors:
        raise errors[0]


def _views(t: torch.Tensor | None, counts: list[int], dim: int = 0) -> list | tuple:
    """``t``'s consecutive row groups (``dim=1``: column groups), as views made in one operation (not one per
    expert); a list of None for a missing tensor."""
    return [None] * len(counts) if t is None else t.split(counts, dim=dim)


def _each(w: torch.Tensor | None, num_experts: int, transpose: bool = False) -> list | tuple:
    """``w[e]`` (or ``w[e].T``) of every expert, as views made in one operation; a list of None without ``w``."""
    if w is None:
        return [None] * num_experts
    return (w.transpose(1, 2) if transpose else w).unbind(0)


class _ExpertMLP(torch.autograd.Function):
    """Every expert's MLP on its consecutive rows, one expert at a time, with a hand-written backward.

    ``y_s = scale_s * act(x_s w1[e], x_s w3[e]) w2[e]`` for the rows ``s`` of expert ``e``. Each expert's
    ``[n, d_ff]`` activations stay small enough for the CPU caches, outputs go straight into one buffer (no
    ``cat``), only the inputs and pre-activations are saved (backward recomputes the activation), and the
    experts are shared among ``threads`` threads (:func:`_run_shares`). Every per-expert view (rows, weights,
    transposes) is made by one ``split`` / ``unbind`` per tensor, so an expert costs only its arithmetic:
    6 operations forward, about 16 backward.
    """

    @staticmethod
    def forward(ctx, x, scale, counts, threads, w1, w3, w2):
        num_rows, d_ff = x.shape[0], w1.shape[-1]
        h1 = x.new_empty(num_rows, d_ff)
        h3 = None if w3 is None else x.new_empty(num_rows, d_ff)
        y = x.new_empty(num_rows, w2.shape[-1])
        xs, h1s, h3s, ys = (_views(t, counts) for t in (x, h1, h3, y))
        scales = _views(None if scale is None else scale[:, None], counts)
        w1s, w3s, w2s = (_each(w, len(counts)) for w in (w1, w3, w2))

        def work(share: list[Group]) -> None:
            for e, _ in share:
                h = torch.mm(xs[e], w1s[e], out=h1s[e])
                a = F.gelu(h) if w3 is None else F.silu(h).mul_(torch.mm(xs[e], w3s[e], out=h3s[e]))
                out = torch.mm(a, w2s[e], out=ys[e])
                if scale is not None:
                    out.mul_(scales[e])

        ctx.groups, ctx.threads, ctx.counts = _groups(counts), threads, counts
        _run_shares(work, ctx.groups, threads)
        ctx.save_for_backward(x, scale, w1, w3, w2, h1, h3)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, scale, w1, w3, w2, h1, h3 = ctx.saved_tensors
        need_x, need_scale, _, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        counts = ctx.counts
        gx = torch.empty_like(x) if need_x else None
        gs = torch.empty_like(scale) if need_scale else None
        gw1, gw3, gw2 = (torch.empty_like(w) if need else None for w, need in
                         ((w1, need_w1), (w3, need_w3), (w2, need_w2)))
        grad = grad.contiguous()
        gos, h1s, h3s, gxs, gss = (_views(t, counts) for t in (grad, h1, h3, gx, gs))
        scales = _views(None if scale is None else scale[:, None], counts)
        xts = _views(x.T, counts, dim=1)  # x[rows].T of every expert
        w1ts, w3ts, w2ts = (_each(w, len(counts), transpose=True) for w in (w1, w3, w2))
        gw1s, gw3s, gw2s = (_each(w, len(counts)) for w in (gw1, gw3, gw2))

        def work(share: list[Group]) -> None:
            for e, _ in share:
                go, pre = gos[e], h1s[e]
                silu = None if w3 is None else F.silu(pre)
                a = F.gelu(pre) if w3 is None else silu * h3s[e]
                ga = torch.mm(go, w2ts[e])  # d loss / d a for an unscaled output
                if scale is not None:
                    s = scales[e]
                    if need_scale:  # <go, unscaled output> = <go w2^T, a>, added in float32
                        gss[e].copy_(torch.linalg.vecdot(ga.float(), a.float()))
                    go = go * s
                    ga.mul_(s)
                if need_w2:
                    torch.mm(a.T, go, out=gw2s[e])
                if w3 is None:
                    g1 = torch.ops.aten.gelu_backward(ga, pre)
                else:
                    g3 = ga * silu
                    g1 = torch.ops.aten.silu_backward(ga.mul_(h3s[e]), pre)
                    if need_w3:
                        torch.mm(xts[e], g3, out=gw3s[e])
                if need_w1:
                    torch.mm(xts[e], g1, out=gw1s[e])
                if need_x:
                    gxe = torch.mm(g1, w1ts[e], out=gxs[e])
                    if w3 is not None:
                        gxe.addmm_(g3, w3ts[e])

        _run_shares(work, ctx.groups, ctx.threads)
        present = {e for e, _ in ctx.groups}
        for gw in (gw1, gw3, gw2):
            if gw is not None:
                for e in range(gw.shape[0]):
                    if e not in present:
                        gw[e].zero_()  # an expert without rows gets zero gradient
        return gx, gs, None, None, gw1, gw3, gw2


class Experts(nn.Module):
    """``E`` expert FFNs stored as stacked weight tensors (no biases). ``dropout``: probability of dropping a
    hidden activation in training mode (Switch's expert dropout; 0 = off)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: Activation = "swiglu", *,
                 dropout: float = 0.0):
        super().__init__()
        _check_activation(activation)
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_int(name, value, 1)
        check_number("dropout", dropout, 0, 1, high_open=True)
        self.num_experts, self.d_model, self.d_ff, self.activation = num_experts, d_model, d_ff, activation
        self.dropout = dropout
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default scale: uniform(+-1/sqrt(fan_in)) per expert."""
        for w in (self.w1, self.w3, self.w2):
            if w is not None:
                bound = 1 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)

    def _act(self, h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(h1) * h3 if self.activation == "swiglu" else F.gelu(h1)
        return F.dropout(h, self.dropout, training=True) if self.dropout and self.training else h

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        w3 = None if self.w3 is None else self.w3.to(dtype)
        return self.w1.to(dtype), w3, self.w2.to(dtype)

    def expert_weights(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """``(w1[e], w3[e], w2[e])`` of every expert in ``dtype`` (``w3[e]`` None for GELU), split with one
        ``unbind`` per weight: backward then builds each weight's gradient once, where indexing ``w1[e]``
        per expert would build a full-size zero gradient for every expert."""
        w1, w3, w2 = self._weights(dtype)
        return list(zip(w1.unbind(0), [None] * self.num_experts if w3 is None else w3.unbind(0), w2.unbind(0)))

    def mlp(self, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
        """One expert with the given weights (see :meth:`expert_weights`). x: ``[n, d_model]`` -> ``[n, d_model]``."""
        return self._act(x @ w1, None if w3 is None else x @ w3) @ w2

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens. x: ``[n, d_model]`` -> ``[n, d_model]``."""
        dtype = compute_dtype(x)
        w3 = None if self.w3 is None else self.w3[e].to(dtype)
        return self.mlp(x.to(dtype), self.w1[e].to(dtype), w3, self.w2[e].to(dtype))

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, *, fused: bool | None = None,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
        """All experts at once on expert-sorted rows.

        x: ``[S, d_model]`` sorted by expert, ``counts: [E]`` rows per expert -> ``[S, d_model]``; with
        ``scale: [S]`` each output row is multiplied by its scale (the gate: folded into the expert pass).
        ``fused`` as in :func:`grouped_mm`; the per-expert path runs :class:`_ExpertMLP` (one expert at a time,
        hand-written backward).
        """
        dtype = compute_dtype(x)
        w1, w3, w2 = self._weights(dtype)
        x = x.to(dtype)
        scale = None if scale is None else scale.to(dtype)
        if scale is not None and scale.shape != x.shape[:1]:
            raise ValueError(f"scale must have shape [{x.shape[0]}] (one per row), got {tuple(scale.shape)}")
        host_counts = check_counts(counts, self.num_experts, x.shape[0])
        use_fused = _takes_fused(x, w1, fused)
        if not use_fused and not (self.dropout and self.training):  # _ExpertMLP has no dropout: autograd below does
            if host_counts is None:  # read now anyway (a sync on CUDA): check the values too
                host_counts = check_counts(counts.cpu(), self.num_experts, x.shape[0])
            with torch.autocast(x.device.type, enabled=False):  # operands are in the compute dtype already
                threads = torch.get_num_threads() if x.device.type == "cpu" else 1
                return _ExpertMLP.apply(x, scale, host_counts, threads, w1, w3, w2)
        h3 = None if w3 is None else grouped_mm(x, w3, counts, fused=use_fused)
        y = grouped_mm(self._act(grouped_mm(x, w1, counts, fused=use_fused), h3), w2, counts, fused=use_fused)
        return y if scale is None else y * scale.unsqueeze(-1)

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own fixed-size buffer. x: ``[E, C, d_model]`` -> ``[E, C, d_model]``."""
        dtype = compute_dtype(x)
        w1, w3, w2 = self._weights(dtype)
        x = x.to(dtype)
        h3 = None if w3 is None else torch.bmm(x, w3)
        return torch.bmm(self._act(torch.bmm(x, w1), h3), w2)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class FFN(nn.Module):
    """A dense FFN with the same activation conventions as :class:`Experts` (one expert, every token)."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "swiglu"):
        super().__init__()
        self.experts = Experts(1, d_model, d_ff, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., d_model]`` -> ``[..., d_model]``."""
        return self.experts.forward_one(0, x.reshape(-1, x.shape[-1])).reshape(x.shape)
