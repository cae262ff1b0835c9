"""Benchmarks: ``python -m moe_lab.bench`` times MoE implementations side by side on one input.

- :mod:`~moe_lab.bench.core`: configs, rows, timing and memory, the table (:func:`run_benchmark`);
- :mod:`~moe_lab.bench.hf`: Hugging Face's Mixtral block with a ``moe_lab`` layer's weights (the peer rows);
- :mod:`~moe_lab.bench.sweep`: ``--sweep`` over tokens, experts and k, ratio to dense, ``--plot PATH``;
- :mod:`~moe_lab.bench.gpu`: ``--gpu-suite --out DIR``, the CUDA tests + GPU benchmark + profile as one job;
- :mod:`~moe_lab.bench.cli`: the command line.
"""
from .cli import main
from .core import (
    DTYPES,
    HF_ROWS,
    IMPLEMENTATIONS,
    BenchConfig,
    BenchRow,
    build,
    expert_flops,
    format_table,
    machine_description,
    onehot_bytes,
    peak_memory,
    run_benchmark,
)

__all__ = ["DTYPES", "HF_ROWS", "IMPLEMENTATIONS", "BenchConfig", "BenchRow", "build", "expert_flops",
           "format_table", "machine_description", "main", "onehot_bytes", "peak_memory", "run_benchmark"]
