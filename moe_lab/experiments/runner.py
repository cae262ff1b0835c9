"""Run a budget-matched comparison: arms x paired seeds, each model trained to the end of its own schedule and
scored on the corpus's fixed validation windows; the result is plain JSON-serialisable data with provenance.

Result layout (``run_comparison``'s return value, the stored reference files)::

    {"name", "description",
     "setup": {"budget": {"kind", "amount"}, "seeds", "device", and the fields of Setup},
     "arms": {arm: {"config": {...}, "steps", "tokens_per_step", "flops_per_step", "total_params", "active_params"}},
     "runs": {arm: [{"seed", "train_ce": [per step], "step_time": [s per step], "val": [[step, CE], ...],
                     "val_ce", "wall_s", and for MoE arms "max_vio", "drop_rate": [per step] and
                     "expert_load": [MoE layer][expert] token-slots over the last 10% of steps}, ...]},
     "provenance": {"date", "git_commit", "git_dirty", "python", "torch", "platform", "cpu", "cpu_capability",
                    "gpu", "threads", "load_before", "load_after", "wall_s", "env"}}
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calculator import count_params
from ..data import CORPORA, load_corpus
from ..hooks import TrainHook, TrainState
from ..model import ModelConfig, MoETransformer
from ..train import EVAL_TOKENS, History, evaluate, train
from ..utils import seed_everything
from ..validation import check_int, check_number
from .budget import Budget, flops_per_step
from .results import end_steps

ENV_SETTINGS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")
"""Environment variables that change which kernels run; recorded in the provenance when set."""
DIGITS = 6
"""Significant digits kept for losses in a result (the replay test compares the training CE)."""
SHORT_DIGITS = 4
"""Significant digits kept for the other per-step values (times, MaxVio, drop rates)."""
EVAL_BATCH = 64
"""Validation windows per forward pass (the result does not depend on it)."""


def config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg``'s fields as JSON values (a dtype by its name)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in values.items()}


def _round(values, digits: int = DIGITS) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values]


def _val(step: int, ce: float) -> list:
    return [step, *_round([ce])]


class _EvaluateAt(TrainHook):
    """Records the validation CE after the given steps (1-based) into ``history.val``."""

    def __init__(self, steps: set[int], val: torch.Tensor, seq_len: int, tokens: int):
        self.steps, self.val, self.seq_len, self.tokens = steps, val, seq_len, tokens

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.step + 1 in self.steps:
            state.history.val.append((state.step + 1, evaluate(state.model, self.val, seq_len=self.seq_len,
                                                                tokens=self.tokens, batch_size=EVAL_BATCH)))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict[str, Any]:
    """Where and with what a run is made (git commit, versions, CPU / GPU, threads, load, date)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in ENV_SETTINGS if k in os.environ},
            "load_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


@dataclass(frozen=True)
class Setup:
    """How every arm of a comparison trains and is scored: ``batch_size`` sequences of ``seq_len`` tokens of
    ``load_corpus(corpus).train`` per step, AdamW at peak ``lr`` with ``warmup`` warm-up steps and cosine decay to
    the arm's last step; validation CE on ``eval_tokens`` tokens of the fixed windows of ``corpus.val`` at the
    end, plus ``eval_points`` evenly spaced earlier evaluations (for curves, never for comparisons)."""

    corpus: str = "python"
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 10
    eval_tokens: int = EVAL_TOKENS
    eval_points: int = 0

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA}, got {self.corpus!r}")
        for name in ("batch_size", "seq_len"):
            check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0, low_open=True)
        check_int("warmup", self.warmup, 0)
        check_int("eval_tokens", self.eval_tokens, self.seq_len)
        check_int("eval_points", self.eval_points, 0)


def train_arm(cfg: ModelConfig, steps: int, seed: int, setup: Setup, *, data: torch.Tensor, device: torch.device,
              hooks: Sequence[TrainHook] = ()):
    """One run of a comparison: seed ``seed`` initialises the model and draws its batches (so arms are paired),
    then :func:`moe_lab.train.train` runs ``steps`` steps of ``setup`` with warm-up + cosine ending at
    ``steps``. Returns ``(model, history)``."""
    seed_everything(seed)
    model = MoETransformer(cfg).to(device)
    history = train(model, data, steps=steps, batch_size=setup.batch_size, seq_len=setup.seq_len, lr=setup.lr,
                    warmup=setup.warmup, seed=seed, hooks=hooks, progress=False)
    return model, history


def run_comparison(arms: Mapping[str, ModelConfig], budget: Budget, *, seeds: Sequence[int] = (0, 1, 2),
                   setup: Setup = Setup(), device: str | torch.device | None = None, progress: bool = True,
                   name: str | None = None, description: str = "",
                   hooks: Callable[[str, int], Sequence[TrainHook]] | None = None,
                   on_run: Callable[[str, int, MoETransformer, History], None] | None = None) -> dict[str, Any]:
    """Train every arm (``{name: ModelConfig}``) with every seed within ``budget`` (each arm its own steps and
    schedule, :meth:`Budget.steps_for`) as ``setup`` says, and score it at the end of its schedule on the fixed
    validation windows. Seeds run in the outer loop, arms in the inner one, so slow phases of a shared machine hit
    every arm alike; a tqdm bar counts the runs. Returns the result described in the module docstring.

    For what the JSON does not hold: ``hooks(arm, seed)`` returns extra :class:`moe_lab.hooks.TrainHook` objects
    for that run (e.g. routing snapshots), and ``on_run(arm, seed, model, history)`` is called after each run with
    the trained model (e.g. to keep it for a specialisation probe)."""
    if not arms:
        raise ValueError("arms must name at least one model configuration")
    for arm, cfg in arms.items():
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"arms[{arm!r}] must be a moe_lab.model.ModelConfig, got {type(cfg).__name__}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {list(seeds)!r}")
    for s in seeds:
        check_int("seeds", s, 0)
    if not isinstance(setup, Setup):
        raise ValueError(f"setup must be a moe_lab.experiments.Setup, got {type(setup).__name__}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    text = load_corpus(setup.corpus)
    b, L = setup.batch_size, setup.seq_len
    result = {"name": name, "description": description,
              "setup": {"budget": dataclasses.asdict(budget), "seeds": list(seeds), "device": device.type,
                        **dataclasses.asdict(setup)},
              "arms": {}, "runs": {arm: [] for arm in arms}}
    for arm, cfg in arms.items():
        counts = count_params(cfg.arch())
        result["arms"][arm] = {"config": config_dict(cfg), "steps": budget.steps_for(cfg, batch_size=b, seq_len=L),
                               "tokens_per_step": b * L, "flops_per_step": flops_per_step(cfg, b, L),
                               "total_params": counts.total, "active_params": counts.active}
    prov = provenance(device)
    start = time.perf_counter()
    bar = tqdm(total=len(seeds) * len(arms), desc=name or "runs", disable=not progress)
    for seed in seeds:
        for arm, cfg in arms.items():
            bar.set_postfix_str(f"{arm}, seed {seed}")
            steps = result["arms"][arm]["steps"]
            points = {round(steps * (i + 1) / (setup.eval_points + 1)) for i in range(setup.eval_points)} - {0, steps}
            t0 = time.perf_counter()
            extra = list(hooks(arm, seed)) if hooks else []
            model, history = train_arm(cfg, steps, seed, setup, data=text.train, device=device,
                                       hooks=[_EvaluateAt(points, text.val, L, setup.eval_tokens), *extra])
            val_ce = evaluate(model, text.val, seq_len=L, tokens=setup.eval_tokens, batch_size=EVAL_BATCH)
            run = {"seed": seed, "train_ce": _round(history.ce), "step_time": _round(history.step_time, SHORT_DIGITS),
                   "val": [_val(s, v) for s, v in history.val] + [_val(steps, val_ce)],
                   "val_ce": val_ce, "wall_s": round(time.perf_counter() - t0, 2)}
            if cfg.num_experts:
                run["max_vio"] = _round(history.max_violation().mean(-1).tolist(), SHORT_DIGITS)
                run["drop_rate"] = _round(history.drop_rate, SHORT_DIGITS)
                run["expert_load"] = history.expert_load()[-end_steps(steps):].sum(0).tolist()
            result["runs"][arm].append(run)
            if on_run:
                on_run(arm, seed, model, history)
            bar.update()
    bar.close()
    prov["wall_s"] = round(time.perf_counter() - start, 1)
    prov["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["provenance"] = prov
    return result
