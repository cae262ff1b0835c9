"""Model-level rows: one training step of the MoE language model against the dense model with the same active
FLOPs, through :func:`moe_lab.train.train` (what a student runs) and through a bare step.

Rows (same width, depth, attention, data and optimiser; only the FFN differs):

- ``dense``: :func:`moe_lab.model.toy_config` ``"dense"`` with ``d_ff = k * d_expert`` (equal active FLOPs);
- ``moe``: the ``"mixtral"`` preset (``E`` experts of width ``d_expert``, top-``k``, the Switch aux loss weighted);
- ``moe_all_stats``: the same MoE model with every statistic on: every auxiliary loss term of
  :data:`moe_lab.losses.AUX_LOSSES` recorded each step (``train(record=...)``) and a
  :class:`moe_lab.hooks.RouterMonitor`.

Per row: ``train_ms``, the wall time of a ``train(...)`` call per optimiser step (everything the loop does), and
``step_ms``, a bare step (batch, forward and loss, backward, clipping, AdamW) on the same model and data; their
difference over ``train_ms`` is the loop's per-step bookkeeping (``bookkeeping``: history, statistics, hooks).
Rows run interleaved, ``steps`` steps per row and round, medians over ``rounds`` after one warm-up round.
``clock="cpu"`` times with the process's CPU time instead of the wall clock: with one thread it hardly changes
when other processes share the cores (a shared machine), which the wall clock does.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from ..data import get_batch
from ..hooks import RouterMonitor
from ..losses import AUX_LOSSES
from ..model import ModelConfig, MoETransformer, toy_config
from ..train import train
from ..utils import seed_everything

MODEL_ROWS = ("dense", "moe", "moe_all_stats")


@dataclass
class ModelBenchConfig:
    """Model sizes (the capstone's by default: notebook 13) and timing settings."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    experts: int = 8
    k: int = 2
    d_expert: int = 128
    batch_size: int = 16
    seq_len: int = 64
    steps: int = 10
    rounds: int = 5
    seed: int = 0
    clock: str = "wall"
    device: str = "cpu"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


MODEL_SIZES = {"capstone": ModelBenchConfig(),
               "4x": ModelBenchConfig(d_model=128, n_layers=4, d_expert=256)}
"""The sizes of issue 26: notebook 13's capstone models, and 4x their width times depth (FFN widths scaled with
``d_model``)."""


@dataclass
class ModelBenchRow:
    """One model's step times (ms, medians) and the loop's bookkeeping share of a ``train`` step."""

    row: str
    d_model: int
    n_layers: int
    train_ms: float
    step_ms: float
    bookkeeping: float


def model_config(row: str, cfg: ModelBenchConfig) -> ModelConfig:
    """The :class:`moe_lab.model.ModelConfig` of one row."""
    if row not in MODEL_ROWS:
        raise ValueError(f"row must be one of {MODEL_ROWS}, got {row!r}")
    size = dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    if row == "dense":
        return toy_config("dense", d_ff=cfg.k * cfg.d_expert, **size)
    return toy_config("mixtral", num_experts=cfg.experts, k=cfg.k, d_expert=cfg.d_expert, **size)


def _train_kwargs(row: str, model: MoETransformer, cfg: ModelBenchConfig) -> dict:
    if row != "moe_all_stats":
        return {}
    layer = model.cfg.layer_config()
    return dict(record=tuple(name for name, term in AUX_LOSSES.items() if term.applies(layer)),
                hooks=[RouterMonitor()])


def _bare_steps(model: MoETransformer, data: torch.Tensor, cfg: ModelBenchConfig, g: torch.Generator) -> float:
    """Median seconds of ``cfg.steps`` bare optimiser steps (what ``train`` does minus its bookkeeping)."""
    clock, device = CLOCKS[cfg.clock], torch.device(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(cfg.steps):
        start = clock()
        x, y = get_batch(data, cfg.batch_size, cfg.seq_len, g)
        opt.zero_grad(set_to_none=True)
        model.loss(x.to(device), y.to(device)).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - start)
    return statistics.median(times)


def run_model_benchmark(cfg: ModelBenchConfig = ModelBenchConfig(), rows: tuple[str, ...] = MODEL_ROWS
                        ) -> list[ModelBenchRow]:
    """Time every row on the same random byte data (on ``cfg.device``; a CPU with the current thread setting)."""
    if cfg.clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {cfg.clock!r}")
    clock = CLOCKS[cfg.clock]
    seed_everything(cfg.seed)
    data = torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(cfg.seed))
    models = {}
    for row in rows:
        seed_everything(cfg.seed)
        models[row] = MoETransformer(model_config(row, cfg)).to(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    trained: dict[str, list[float]] = {row: [] for row in rows}
    bare: dict[str, list[float]] = {row: [] for row in rows}
    for round_ in range(cfg.rounds + 1):  # round 0 warms up
        for row, model in models.items():
            start = clock()
            train(model, data, steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=1e-3,
                  seed=round_, progress=False, **_train_kwargs(row, model, cfg))
            per_step = (clock() - start) / cfg.steps  # train() waits for the device at its last step
            step = _bare_steps(model, data, cfg, g)
            if round_:
                trained[row].append(per_step)
                bare[row].append(step)
    out = []
    for row in rows:
        t, s = statistics.median(trained[row]), statistics.median(bare[row])
        out.append(ModelBenchRow(row, cfg.d_model, cfg.n_layers, round(t * 1e3, 3), round(s * 1e3, 3),
                                 round(1 - s / t, 4)))
    return out


def format_model_table(rows: list[ModelBenchRow]) -> str:
    """A plain-text table; ``/dense``: this row's ``train`` step time over the dense model's."""
    dense = next((r for r in rows if r.row == "dense"), None)
    header = (f"{'model':<14} {'d_model':>7} {'layers':>6} {'train ms/step':>13} {'bare ms/step':>12} "
              f"{'bookkeeping':>11} {'/dense':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r.train_ms / dense.train_ms:.2f}x" if dense else "-"
        lines.append(f"{r.row:<14} {r.d_model:>7} {r.n_layers:>6} {r.train_ms:>13.2f} {r.step_ms:>12.2f} "
                     f"{100 * r.bookkeeping:>10.1f}% {ratio:>7}")
    return "\n".join(lines)


def quick(cfg: ModelBenchConfig) -> ModelBenchConfig:
    """A smoke-test size of ``cfg``."""
    return replace(cfg, d_model=16, n_heads=2, n_layers=1, d_expert=16, batch_size=2, seq_len=16, steps=2, rounds=1)
