"""Timing MoE implementations side by side on one input: configs, rows, memory, the table.

Rows (same sizes, same input, same weights where the layouts allow):

- ``dense``: a dense FFN of width ``k * d_ff``: the same active expert FLOPs per token, the ceiling to approach;
- ``sorted``: ``moe_lab``'s fast path (sort by expert + grouped GEMM, :func:`moe_lab.dispatch.dispatch_sorted`);
- ``loop``: ``moe_lab``'s reference loop over the experts that got tokens (the eager style of model code);
- ``onehot``: GShard's one-hot einsum dispatch, skipped when its ``[T, E, C]`` tensors would not fit;
- ``hf_eager``, ``hf_grouped_mm``: Hugging Face's ``MixtralSparseMoeBlock`` with the ``sorted`` layer's
  weights and its ``"eager"`` / ``"grouped_mm"`` experts implementation (:mod:`moe_lab.bench.hf`), skipped
  with the reason when ``transformers`` or that implementation is missing.

Each row reports the forward time (autograd on, as in training), the forward+backward time (gradients for the
input and every parameter), tokens/s (tokens / forward+backward time), the achieved expert TFLOP/s
(:func:`expert_flops` / forward+backward time) and the peak memory one forward+backward allocates on top of
what was allocated before it (activations, temporaries and gradients; CUDA: the caching allocator's peak; CPU:
the profiler's allocation events). Times are medians over ``repeats`` after ``warmup`` untimed runs, with
device synchronisation; the implementations are timed in interleaved rounds so that load changes on a shared
machine hit every row alike. ``dtype="bf16"`` puts the expert / FFN weights and activations in bfloat16;
``moe_lab``'s router stays in float32 (Hugging Face's block is all in the dtype, its softmax in float32).
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..experts import FFN
from ..layer import MoELayer
from ..metrics import tokens_per_expert
from ..routing import softmax_topk
from ..utils import seed_everything
from . import hf

HF_ROWS = {f"hf_{name}": name for name in hf.EXPERTS_IMPLEMENTATIONS}  # row -> experts implementation
IMPLEMENTATIONS = ("dense", "sorted", "loop", "onehot", *HF_ROWS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchConfig:
    """Sizes and timing settings of one benchmark run."""

    tokens: int = 4096
    d_model: int = 256
    d_ff: int = 512
    experts: int = 32
    k: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    activation: str = "swiglu"
    warmup: int = 2
    repeats: int = 7
    onehot_max_bytes: int | None = None  # None: half the free memory of the device
    seed: int = 0


@dataclass
class BenchRow:
    """One implementation's measurements (``None`` when skipped; ``note`` says why)."""

    implementation: str
    device: str
    dtype: str
    tokens: int
    d_model: int
    d_ff: int
    experts: int
    k: int
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    tokens_per_s: float | None
    tflops: float | None
    peak_mem_bytes: int | None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, cfg: BenchConfig) -> nn.Module:
    """The module behind one row; its forward maps ``x: [T, d_model]`` to ``[T, d_model]`` (an MoE layer also
    returns its routing info). Every MoE row has the same router and expert weights (seeded)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    dtype = DTYPES[cfg.dtype]
    seed_everything(cfg.seed)
    if name == "dense":
        return FFN(cfg.d_model, cfg.k * cfg.d_ff, cfg.activation).to(cfg.device, dtype)
    layer = MoELayer(cfg.d_model, cfg.d_ff, cfg.experts, cfg.k, activation=cfg.activation,
                     dispatch="sorted" if name in HF_ROWS else name)
    layer.experts.to(cfg.device, dtype)  # the router keeps float32 weights
    layer = layer.to(cfg.device)
    return hf.mixtral_block(layer, HF_ROWS[name]) if name in HF_ROWS else layer


def expert_flops(cfg: BenchConfig) -> int:
    """Multiply-add FLOPs of one forward+backward through the experts (or the dense FFN): per token-slot,
    ``2 * d_model * d_ff`` per weight matrix (3 for SwiGLU, 2 for GELU), times 3 for forward + backward.
    The router, the permutations and the element-wise ops are not counted."""
    matrices = 3 if cfg.activation == "swiglu" else 2
    return 3 * 2 * cfg.tokens * cfg.k * matrices * cfg.d_model * cfg.d_ff


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def onehot_bytes(cfg: BenchConfig, max_load: int) -> int:
    """Rough bytes of the one-hot path's big tensors: ~6 ``[T, E, C]`` tensors (dispatch, combine, their
    one-hot factors and gradients) with ``C`` the largest expert load."""
    return 6 * cfg.tokens * cfg.experts * max_load * torch.finfo(DTYPES[cfg.dtype]).bits // 8


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 * 2**30


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines); Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while ``step()`` runs, above what was allocated when it started."""
    _sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some torch versions warn about profiler cycles
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def run_benchmark(cfg: BenchConfig, implementations: tuple[str, ...] = IMPLEMENTATIONS) -> list[BenchRow]:
    """Measure every implementation on the same input; returns one :class:`BenchRow` each, in order."""
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    seed_everything(cfg.seed)
    x = torch.randn(cfg.tokens, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(cfg.tokens, cfg.d_model, device=device, dtype=dtype)
    shape = {k: getattr(cfg, k) for k in ("device", "dtype", "tokens", "d_model", "d_ff", "experts", "k")}
    modules, notes = {}, {}
    for name in implementations:
        reason = hf.unavailable(HF_ROWS[name], cfg.activation) if name in HF_ROWS else None
        if reason:
            notes[name] = reason
            continue
        module = build(name, cfg)
        if name == "onehot":
            with torch.no_grad():  # the load from the router alone: never run the one-hot dispatch to size it
                _, _, experts = softmax_topk(module.router(x), cfg.k)
                max_load = int(tokens_per_expert(experts, cfg.experts).max())
            need = onehot_bytes(cfg, max_load)
            limit = cfg.onehot_max_bytes if cfg.onehot_max_bytes is not None else _free_bytes(device) // 2
            if need > limit:
                notes[name] = (f"skipped: needs ~{need / 2**30:.1f} GiB for [T, E, C] tensors "
                               f"(limit {limit / 2**30:.1f} GiB)")
                continue
        modules[name] = module

    def fwd(m: nn.Module) -> None:
        _forward(m, x)

    def clear_grads(m: nn.Module) -> None:
        for p in m.parameters():
            p.grad = None
        x.grad = None

    def fwd_bwd(m: nn.Module) -> None:
        _forward(m, x).backward(grad_out)

    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in modules}
    for round_ in range(cfg.warmup + cfg.repeats):
        for name, module in modules.items():
            for kind, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                clear_grads(module)
                _sync(device)
                start = time.perf_counter()
                step(module)
                _sync(device)
                if round_ >= cfg.warmup:
                    times[name][kind].append(time.perf_counter() - start)
    rows = []
    for name in implementations:
        if name not in modules:
            rows.append(BenchRow(name, **shape, fwd_ms=None, fwd_bwd_ms=None, tokens_per_s=None, tflops=None,
                                 peak_mem_bytes=None, note=notes[name]))
            continue
        fwd_s = statistics.median(times[name]["fwd"])
        fwd_bwd_s = statistics.median(times[name]["fwd_bwd"])
        clear_grads(modules[name])
        peak = peak_memory(lambda: fwd_bwd(modules[name]), device)
        rows.append(BenchRow(name, **shape, fwd_ms=round(fwd_s * 1e3, 4), fwd_bwd_ms=round(fwd_bwd_s * 1e3, 4),
                             tokens_per_s=round(cfg.tokens / fwd_bwd_s, 1),
                             tflops=float(f"{expert_flops(cfg) / fwd_bwd_s / 1e12:.4g}"), peak_mem_bytes=int(peak)))
    return rows


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_description(device: str) -> str:
    """The device in words (GPU name, or CPU model, cores and threads; OpenMP's wait policy) and torch's
    version."""
    if torch.device(device).type == "cuda":
        what = torch.cuda.get_device_name(torch.device(device))
    else:
        policy = os.environ.get("OMP_WAIT_POLICY", "default")
        what = (f"{_cpu_model()} CPU ({os.cpu_count()} cores), {torch.get_num_threads()} threads, "
                f"OMP_WAIT_POLICY={policy}")
    return f"{what}, torch {torch.__version__}"


def format_table(rows: list[BenchRow]) -> str:
    """A plain-text table; ratio columns compare forward+backward times: ``/dense`` this row's over the dense
    FFN's, ``HF/x`` the faster Hugging Face row's over this row's (> 1: faster than HF), ``loop/x`` the
    loop's over this row's."""
    by_name = {r.implementation: r for r in rows if r.fwd_bwd_ms}
    dense, loop = by_name.get("dense"), by_name.get("loop")
    hf_times = [by_name[n].fwd_bwd_ms for n in HF_ROWS if n in by_name]
    header = (f"{'implementation':<14} {'fwd ms':>10} {'fwd+bwd ms':>11} {'tokens/s':>12} {'TFLOP/s':>8} "
              f"{'peak MiB':>9} {'/dense':>7} {'HF/x':>6} {'loop/x':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.fwd_ms is None:
            lines.append(f"{r.implementation:<14} {r.note}")
            continue
        vs_dense = f"{r.fwd_bwd_ms / dense.fwd_bwd_ms:.2f}x" if dense else "-"
        vs_hf = f"{min(hf_times) / r.fwd_bwd_ms:.2f}x" if hf_times else "-"
        vs_loop = f"{loop.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x" if loop else "-"
        lines.append(f"{r.implementation:<14} {r.fwd_ms:>10.2f} {r.fwd_bwd_ms:>11.2f} {r.tokens_per_s:>12,.0f} "
                     f"{r.tflops:>8.3f} {r.peak_mem_bytes / 2**20:>9.1f} {vs_dense:>7} {vs_hf:>6} {vs_loop:>7}")
    return "\n".join(lines)
