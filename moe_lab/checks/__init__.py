"""Graded exercises: ``check("02.2", topk_gating)`` in a notebook; ``run_check(..., hidden=True)`` for grading.

Each ``nbNN`` module registers the exercises of ``solutions/NN_*.ipynb``.
"""
from . import nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb11  # noqa: F401  (registers the exercises)
from .core import REGISTRY, Case, CheckResult, Exercise, check, run_check

__all__ = ["REGISTRY", "Case", "CheckResult", "Exercise", "check", "run_check"]
