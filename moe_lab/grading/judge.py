"""Judging, grader side: the reference answers (computed in the grader process, from the ``moe_lab`` it imported
before any kernel started) and the verdict on a kernel's verified reply, with the checker's own judging
(:func:`moe_lab.checks.core.judge_case`: tolerances, known mistakes, messages)."""
from __future__ import annotations

from ..checks.calls import FINAL
from ..checks.core import (CheckResult, Exercise, GradedCase, exercise_cases, failure_message, graded_case,
                           integrity_message, judge_case)


def reference_cases(ex: Exercise, seed: int) -> list[GradedCase]:
    """The visible then hidden cases of ``ex`` for ``seed``, with the reference outputs and gradients
    (the same cases and cotangents as ``run_check(ex.id, fn, hidden=True, seed=seed)``)."""
    return [graded_case(ex, case, hidden) for case, hidden in exercise_cases(ex, seed, True)]


def judge(ex: Exercise, cases: list[GradedCase], records: list) -> CheckResult:
    """Compare what the student's function returned (``records``, one per case) with the references."""
    result = CheckResult(ex.id, ex.function, "failed", 0, ex.points, 0, len(cases))
    complete = isinstance(records, list) and 0 < len(records) <= len(cases) and all(isinstance(r, dict) for r in records)
    if not (complete and (len(records) == len(cases) or any(k in records[-1] for k in FINAL))):
        result.status, result.message = "error", "the grader could not read what your function returned"
        return result
    for item, rec in zip(cases, records):
        if rec.get("not_implemented"):
            result.status = "not implemented"
            return result
        problem = judge_case(ex, item, rec)
        if problem:
            result.message = failure_message(ex, item, problem, say_visible=True)
            return result
        result.passed_cases += 1
    result.status, result.points = "passed", ex.points
    return result


def verdict(ex: Exercise, cases: list[GradedCase], reply: dict | None, problem: str) -> CheckResult:
    """The result of one exercise from the kernel's verified ``reply`` (``None`` with ``problem`` if the call
    failed)."""
    result = CheckResult(ex.id, ex.function, "error", 0, ex.points, 0, len(cases), problem)
    if reply is None:
        return result
    if "missing" in reply:
        kind = reply["missing"]
        result.message = (f"no function named {ex.function} is defined (renamed, deleted, or its cell failed?)"
                          if kind == "NoneType" else f"{ex.function} should be a function, got {kind}")
        return result
    integrity = reply.get("integrity") if isinstance(reply.get("integrity"), dict) else {}
    if integrity.get("violation") or integrity.get("tamper"):
        result.status = "failed"
        violation, tamper = (str(integrity[k])[:300] if integrity.get(k) else None for k in ("violation", "tamper"))
        result.message = integrity_message(ex, violation, tamper)
        return result
    try:
        return judge(ex, cases, reply.get("records"))
    except Exception as err:  # data the grader cannot compare: the student's problem, not a grader crash
        result.message = f"the grader could not compare what your function returned ({type(err).__name__})"
    return result
