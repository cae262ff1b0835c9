"""Reference runs: named comparisons too long for a notebook, registered here, run with one command and stored
with their provenance as package data (``experiments/results/<name>.json.gz``)::

    python -m moe_lab.experiments list
    python -m moe_lab.experiments run NAME [--seeds N] [--device cuda] [--quick] [--out PATH]
    python -m moe_lab.experiments show NAME

:func:`replay` re-runs the first steps of a registered run from its code and returns them beside the stored
curve (the replay test), so a stored result cannot drift from the code that made it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..data import load_corpus
from ..hooks import TrainHook, TrainState
from ..model import ModelConfig
from .budget import Budget
from .claims import Claim
from .results import load_result
from .runner import Setup, run_comparison, train_arm

QUICK = 0.02
"""``--quick`` runs this fraction of the budget with the first two seeds and a small validation set: a smoke test."""
QUICK_EVAL_TOKENS = 4096


@dataclass(frozen=True)
class ReferenceRun:
    """A named comparison: ``arms`` (``{name: ModelConfig}``) within ``budget`` over ``seeds``, trained and scored
    as ``setup`` says; ``claims(result)``: the ``{key: Claim}`` that the notebooks named in ``notebooks`` (file
    stems) state from the stored result (the claims test renders and checks them)."""

    name: str
    description: str
    arms: Mapping[str, ModelConfig]
    budget: Budget
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    setup: Setup = Setup()
    claims: Callable[[dict], dict[str, Claim]] | None = None
    notebooks: tuple[str, ...] = ()

    def run(self, *, seeds: int | None = None, device: str | None = None, quick: bool = False,
            progress: bool = True) -> dict[str, Any]:
        """Run it (``seeds``: how many, from 0; default the registered ones) and return the result."""
        chosen = self.seeds if seeds is None else tuple(range(seeds))
        budget, setup = self.budget, self.setup
        if quick:
            budget, chosen = Budget(budget.kind, budget.amount * QUICK), chosen[:2]
            setup = replace(setup, eval_tokens=QUICK_EVAL_TOKENS, eval_points=0)
        return run_comparison(self.arms, budget, seeds=chosen, setup=setup, device=device, progress=progress,
                              name=self.name, description=self.description)


REFERENCE_RUNS: dict[str, ReferenceRun] = {}


def register(run: ReferenceRun) -> ReferenceRun:
    """Add ``run`` to :data:`REFERENCE_RUNS` (names are unique)."""
    if run.name in REFERENCE_RUNS:
        raise ValueError(f"a reference run named {run.name!r} is already registered")
    REFERENCE_RUNS[run.name] = run
    return run


def reference_run(name: str) -> ReferenceRun:
    """The registered run ``name``."""
    if name not in REFERENCE_RUNS:
        raise ValueError(f"name must be one of {tuple(REFERENCE_RUNS)}, got {name!r}")
    return REFERENCE_RUNS[name]


class _StopAfter(TrainHook):
    def __init__(self, steps: int):
        self.steps = steps

    def after_optimizer_step(self, state: TrainState) -> None:
        state.stop = state.step + 1 >= self.steps


def replay(name: str, steps: int = 8, *, device: str = "cpu") -> dict[str, tuple[list[float], list[float]]]:
    """``{arm: (stored, replayed)}``: the per-step training CE of the first ``steps`` steps of the first seed of
    every arm, as stored and as the registered code makes it now (each arm on its full schedule, stopped early)."""
    run, result = reference_run(name), load_result(name)
    text, seed = load_corpus(run.setup.corpus), result["setup"]["seeds"][0]
    out = {}
    for arm, cfg in run.arms.items():
        total = run.budget.steps_for(cfg, batch_size=run.setup.batch_size, seq_len=run.setup.seq_len)
        _, history = train_arm(cfg, total, seed, run.setup, data=text.train, device=torch.device(device),
                               hooks=[_StopAfter(steps)])
        out[arm] = (result["runs"][arm][0]["train_ce"][:steps], history.ce)
    return out
