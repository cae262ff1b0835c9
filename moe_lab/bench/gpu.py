"""The GPU check as one short job: ``python -m moe_lab.bench --gpu-suite --out DIR``.

1. the CUDA tests and the dispatch / layer / permutation tests on the GPU (pytest, from the repository's
   ``tests/``);
2. the benchmark at DeepSeekMoE-16B's routed-expert size in bf16 (:data:`GPU_SIZE`), every row, with the
   achieved expert TFLOP/s next to one plain bf16 GEMM of the dense FFN's first shape (the ceiling);
3. a short profile of the ``sorted`` row (the CUDA kernels taking the most time);
4. the model-level rows (:mod:`moe_lab.bench.model`): a training step of the MoE LM against the dense LM with the
   same active FLOPs through ``moe_lab.train``, at the capstone's size and 4x, on the GPU in fp32.

Writes ``DIR/gpu_report.md`` (tables to paste into an issue) and ``DIR/gpu_report.json``; returns pytest's
exit status. Sized for a few minutes on one H100 / H200.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import model
from .core import DTYPES, BenchConfig, _sync, build, format_table, machine_description, run_benchmark

GPU_SIZE = BenchConfig(tokens=16384, d_model=2048, d_ff=1408, experts=64, k=6, device="cuda", dtype="bf16",
                       warmup=3, repeats=15)
TEST_FILES = ("tests/test_cuda.py", "tests/test_dispatch.py", "tests/test_layer.py", "tests/test_permute.py")


def run_tests(root: Path) -> tuple[int, str]:
    """pytest over :data:`TEST_FILES` (the ``device`` fixture adds CUDA cases); -> (exit status, last lines)."""
    files = [str(root / f) for f in TEST_FILES if (root / f).exists()]
    if not files:
        return 0, f"no tests found under {root} (an installed package has none): tests not run"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-o", "addopts=", "-p", "no:cacheprovider", *files]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])


def gemm_tflops(cfg: BenchConfig, repeats: int = 20) -> float:
    """TFLOP/s of one ``[tokens, d_model] @ [d_model, k * d_ff]`` GEMM in the config's dtype (a ceiling)."""
    a = torch.randn(cfg.tokens, cfg.d_model, device=cfg.device, dtype=DTYPES[cfg.dtype])
    b = torch.randn(cfg.d_model, cfg.k * cfg.d_ff, device=cfg.device, dtype=DTYPES[cfg.dtype])
    device = torch.device(cfg.device)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * repeats / (time.perf_counter() - start) / 1e12


def profile_sorted(cfg: BenchConfig, steps: int = 3, rows: int = 15) -> str:
    """The kernels of ``steps`` forward+backward steps of the ``sorted`` row, by total device time."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cfg.device)
    cuda = device.type == "cuda"

    layer = build("sorted", cfg)
    x = torch.randn(cfg.tokens, cfg.d_model, device=cfg.device, dtype=DTYPES[cfg.dtype], requires_grad=True)
    for _ in range(2):
        layer(x)[0].float().sum().backward()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            layer(x)[0].float().sum().backward()
        _sync(device)
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=rows, max_name_column_width=60)


def run_gpu_suite(out: Path, cfg: BenchConfig = GPU_SIZE,
                  model_sizes: dict[str, model.ModelBenchConfig] = model.MODEL_SIZES) -> int:
    """Run the tests, the benchmark, the profile and the model-level rows (``model_sizes``); write the report into
    ``out``; -> pytest's status."""
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu-suite needs a CUDA GPU (torch.cuda.is_available() is False)")
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    status, test_tail = run_tests(root)
    rows = run_benchmark(cfg)
    ceiling = gemm_tflops(cfg)
    table = format_table(rows)
    profile_text = profile_sorted(cfg)
    model_rows = {size: model.run_model_benchmark(replace(m, device=cfg.device, rounds=3))
                  for size, m in model_sizes.items()}
    header = (f"{machine_description(cfg.device)}; {cfg.dtype}, tokens={cfg.tokens}, d_model={cfg.d_model}, "
              f"d_ff={cfg.d_ff}, experts={cfg.experts}, k={cfg.k}, {cfg.activation}; median of {cfg.repeats} "
              f"after {cfg.warmup} warm-up")
    report = "\n\n".join([
        "# moe_lab GPU report",
        f"## Tests (exit status {status})\n\n```\n{test_tail}\n```",
        f"## Benchmark\n\n```\n{header}\n{table}\n```\n\nOne {cfg.dtype} GEMM [{cfg.tokens}, {cfg.d_model}] @ "
        f"[{cfg.d_model}, {cfg.k * cfg.d_ff}]: {ceiling:.3g} TFLOP/s (the ceiling for the TFLOP/s column).",
        f"## Profile of `sorted` (3 steps)\n\n```\n{profile_text}\n```",
        "## Model-level rows (fp32, a training step through moe_lab.train; median of 3 rounds)\n\n" + "\n\n".join(
            f"{size}:\n```\n{model.format_model_table(rows)}\n```" for size, rows in model_rows.items()),
    ])
    (out / "gpu_report.md").write_text(report + "\n")
    (out / "gpu_report.json").write_text(json.dumps({
        "machine": machine_description(cfg.device), "config": asdict(cfg), "tests_exit_status": status,
        "rows": [asdict(r) for r in rows], "gemm_tflops": ceiling,
        "model_rows": {size: [asdict(r) for r in rows] for size, rows in model_rows.items()}}, indent=1))
    print(report)
    return status
