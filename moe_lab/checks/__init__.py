"""Graded exercises: ``check("02.2", topk_gating)`` in a notebook; ``hint("02.2")`` for the next hint;
``run_check(..., hidden=True)`` for grading.

Each ``nbNN`` module registers the exercises of ``solutions/NN_*.ipynb``.
"""
from . import nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb08, nb09, nb10, nb11, nb12, nb13  # noqa: F401  (registers the exercises)
from .core import REGISTRY, Case, CheckResult, Exercise, check, hint, run_check

__all__ = ["REGISTRY", "Case", "CheckResult", "Exercise", "check", "hint", "run_check"]
