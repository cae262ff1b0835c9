"""Command line of ``python -m moe_lab.bench``: one side-by-side run, a scaling sweep, the model-level rows, or
the GPU suite."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import model, sweep
from .core import DTYPES, IMPLEMENTATIONS, BenchConfig, format_table, machine_description, run_benchmark

QUICK = {"tokens": 256, "d_model": 32, "d_ff": 64, "experts": 8, "k": 2, "warmup": 1, "repeats": 2}
SWEEP_IMPLEMENTATIONS = ("dense", "sorted", "hf_grouped_mm", "hf_eager")

DESCRIPTION = """Time MoE implementations side by side: a dense FFN with the same active FLOPs, moe_lab's sorted
fast path, its loop reference, GShard's one-hot dispatch, and Hugging Face's Mixtral block (eager and
grouped_mm experts; skipped with the reason when transformers or that implementation is missing).
On a CPU shared with other busy processes, run with OMP_WAIT_POLICY=PASSIVE (or --threads 1): with OpenMP's
default spin-waiting, the many small parallel regions of an MoE layer slow down several-fold when the cores
are oversubscribed, far more than the dense FFN's few large ones."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_lab.bench", description=DESCRIPTION,
                                epilog="Columns: /dense = fwd+bwd time over the dense FFN's; HF/x = the faster "
                                       "Hugging Face row's fwd+bwd time over this row's; loop/x = the loop's.")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512, help="hidden width of one expert (dense FFN: k * d_ff)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--activation", choices=("swiglu", "gelu"), default="swiglu")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=None,
                   help=f"rows (default: all; with --sweep: {' '.join(SWEEP_IMPLEMENTATIONS)})")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--onehot-max-gib", type=float, default=None,
                   help="skip the one-hot row above this estimate (default: half the free memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a small smoke run: " + str(QUICK))
    p.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    p.add_argument("--sweep", action="store_true",
                   help="vary one size at a time around the given sizes: " + str(sweep.AXES)
                        + " (with --quick: " + str(sweep.QUICK_AXES) + ")")
    p.add_argument("--plot", type=Path, default=None, help="with --sweep: save the ratio-to-dense plot here")
    p.add_argument("--max-load", type=float, default=None,
                   help="with --sweep: before each point wait (up to 10 minutes) for the 1-minute load average to "
                        "fall to this (the sweep's own threads count: e.g. threads + 0.5); the table shows the load")
    p.add_argument("--pin", action="store_true", help="pin the process to the first --threads CPUs (Linux)")
    p.add_argument("--model", nargs="*", choices=tuple(model.MODEL_SIZES), default=None,
                   help="the model-level rows: a training step of the MoE LM vs the dense LM with equal active "
                        f"FLOPs through moe_lab.train, at these sizes (default: all of {tuple(model.MODEL_SIZES)}); "
                        "--repeats sets the rounds")
    p.add_argument("--clock", choices=tuple(model.CLOCKS), default="wall",
                   help="with --model: time with the wall clock or the process's CPU time (one thread on a shared "
                        "machine)")
    p.add_argument("--gpu-suite", action="store_true",
                   help="on a CUDA GPU: the CUDA tests, the benchmark at DeepSeekMoE-16B's expert size and a "
                        "profile, written to --out")
    p.add_argument("--out", type=Path, default=None, help="with --gpu-suite: folder for gpu_report.md/.json")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` the flags describe (validated)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    cfg = BenchConfig(tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff, experts=args.experts, k=args.k,
                      device=device, dtype=dtype, activation=args.activation, warmup=args.warmup,
                      repeats=args.repeats, seed=args.seed,
                      onehot_max_bytes=None if args.onehot_max_gib is None else int(args.onehot_max_gib * 2**30))
    if args.quick:
        cfg = replace(cfg, **QUICK)
    for name in ("tokens", "d_model", "d_ff", "experts", "k", "repeats"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup}")
    if cfg.k > cfg.experts and not args.sweep:
        raise ValueError(f"k must be <= experts={cfg.experts}, got {cfg.k}")
    return cfg


def _header(cfg: BenchConfig) -> str:
    return (f"{machine_description(cfg.device)}; {cfg.dtype}, tokens={cfg.tokens}, d_model={cfg.d_model}, "
            f"d_ff={cfg.d_ff}, experts={cfg.experts}, k={cfg.k}, {cfg.activation}; "
            f"median of {cfg.repeats} after {cfg.warmup} warm-up")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: torch.get_num_threads()])
    if args.plot is not None and not args.sweep:
        raise ValueError("--plot needs --sweep")
    if args.gpu_suite:
        if args.out is None:
            raise ValueError("--gpu-suite needs --out DIR for its report")
        from .gpu import run_gpu_suite

        return run_gpu_suite(args.out)
    if args.model is not None:
        return _model_rows(args)
    cfg = config_from_args(args)
    if args.sweep:
        points = sweep.run_sweep(cfg, tuple(args.impl or SWEEP_IMPLEMENTATIONS),
                                 sweep.QUICK_AXES if args.quick else sweep.AXES, max_load=args.max_load)
        if args.json:
            for p in points:
                for r in p.rows:
                    print(json.dumps({"axis": p.axis, "value": p.value, "load": p.load, **asdict(r)}))
        else:
            print(f"sweep around: {_header(cfg)}")
            print(sweep.format_sweep(points))
        if args.plot is not None:
            sweep.plot_sweep(points, str(args.plot), title=f"around {_header(cfg)}")
            print(f"plot saved to {args.plot}", file=sys.stderr if args.json else sys.stdout)
        return 0
    rows = run_benchmark(cfg, tuple(args.impl or IMPLEMENTATIONS))
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
        return 0
    print(_header(cfg))
    print(format_table(rows))
    return 0


def _model_rows(args: argparse.Namespace) -> int:
    """``--model``: the model-level rows at each size (CPU, fp32, the current thread setting)."""
    for size in args.model or model.MODEL_SIZES:
        cfg = replace(model.MODEL_SIZES[size], rounds=args.repeats, seed=args.seed, clock=args.clock)
        cfg = model.quick(cfg) if args.quick else cfg
        load = os.getloadavg()[0]
        rows = model.run_model_benchmark(cfg)
        for r in rows:
            if args.json:
                print(json.dumps({"size": size, **asdict(r)}))
        if not args.json:
            print(f"\n{size}: {machine_description('cpu')}; fp32, {cfg.clock} clock, {cfg.steps} steps per round, "
                  f"median of {cfg.rounds} rounds after one warm-up; load average {load:.2f} before, "
                  f"{os.getloadavg()[0]:.2f} after")
            print(model.format_model_table(rows))
    return 0
