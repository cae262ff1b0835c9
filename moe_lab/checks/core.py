"""The exercise checker: run a student's function on visible (notebook) or hidden (grader) cases and
compare it with the library's reference, never raising on a wrong or unfinished answer."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..utils import seed_everything


@dataclass
class Case:
    """One input to an exercise: positional and keyword arguments, and which positional arguments to
    differentiate through (the checker then compares ``d(sum(out * r))/d arg`` too)."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    grad_wrt: tuple[int, ...] = ()


@dataclass
class Exercise:
    """A graded exercise: the function the student writes and how to check it.

    ``cases(hidden)`` builds the cases (hidden ones only for the grader) after the checker seeds the RNGs.

    Feedback and integrity:
    - ``hint``: the first hint, shown with a failing case; it names the idea, not the code.
    - ``hints``: further hints, each more concrete than the last, revealed on request; only an exercise that is
      mechanical may end with code.
    - ``mistakes``: known wrong variants, ``description -> function`` with the reference's signature; when the
      student's output on a failing case matches one, the verdict says "this looks like <description>".
    - ``allow``: the ``moe_lab`` code the student's function may call, as qualified names
      (``"moe_lab.routing.softmax_topk"``) or module prefixes (``"moe_lab.balancing"``); any other call into
      ``moe_lab`` while the function runs scores 0.
    """

    id: str
    function: str
    title: str
    points: int
    reference: Callable
    cases: Callable[[bool], list[Case]]
    hint: str
    hints: tuple[str, ...] = ()
    mistakes: dict[str, Callable] = field(default_factory=dict)
    allow: tuple[str, ...] = ()
    rtol: float = 1e-5
    atol: float = 1e-6


def with_weights(module: torch.nn.Module, **tensors: torch.Tensor) -> torch.nn.Module:
    """Replace parameters of ``module`` by the given tensors themselves (``router__weight=`` sets
    ``router.weight``), so a reference forward pass is differentiable with respect to the student's inputs."""
    for name, value in tensors.items():
        owner, attr = name.replace("__", ".").rsplit(".", 1)
        delattr(module.get_submodule(owner), attr)
        setattr(module.get_submodule(owner), attr, value)
    return module


REGISTRY: dict[str, Exercise] = {}
STUB_MESSAGE = "replace this line with your code"  # what an unfinished exercise raises (see course.py)


def exercise(id: str, *, function: str, title: str, points: int, reference: Callable, hint: str, **options):
    """Decorator registering a case builder ``cases(hidden: bool) -> list[Case]`` as exercise ``id``.

    ``options``: ``hints``, ``mistakes``, ``allow``, ``rtol``, ``atol`` (see :class:`Exercise`)."""

    def register(cases: Callable[[bool], list[Case]]) -> Callable[[bool], list[Case]]:
        if id in REGISTRY:
            raise ValueError(f"exercise id {id!r} is registered twice")
        REGISTRY[id] = Exercise(id, function, title, points, reference, cases, hint, **options)
        return cases

    return register


@dataclass
class CheckResult:
    """The verdict on one exercise. ``status``: ``passed``, ``failed``, ``not implemented`` or ``error``."""

    exercise_id: str
    function: str
    status: str
    points: float
    max_points: int
    passed_cases: int
    total_cases: int
    message: str = ""

    def __str__(self) -> str:
        mark = {"passed": "PASS", "failed": "FAIL", "not implemented": "TODO"}.get(self.status, "ERROR")
        head = f"[{mark}] {self.exercise_id} {self.function}: "
        if self.status == "passed":
            return head + f"all {self.total_cases} cases passed ({self.points:g}/{self.max_points} points)"
        if self.status == "not implemented":
            return head + f"not implemented yet (0/{self.max_points} points)"
        return head + f"{self.message} (0/{self.max_points} points)"


def _fresh(value: Any, grad: bool = False) -> Any:
    value = copy.deepcopy(value)
    if grad and isinstance(value, torch.Tensor):
        value = value.detach().requires_grad_(True)
    return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        text = str(value.detach().cpu().tolist())
        return text if len(text) <= 120 else text[:117] + "..."
    return repr(value)


def compare(expected: Any, got: Any, rtol: float, atol: float, what: str = "output") -> str | None:
    """``None`` if ``got`` matches ``expected`` (recursively, tensors to tolerance), else why not."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{what} should be a torch.Tensor, got {type(got).__name__}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"{what} should have shape {tuple(expected.shape)}, got {tuple(got.shape)}"
        if got.dtype != expected.dtype:
            return f"{what} should have dtype {expected.dtype}, got {got.dtype}"
        if expected.numel() == 0:
            return None
        exp, act = expected.detach().cpu().double(), got.detach().cpu().double()
        close = torch.isclose(act, exp, rtol=rtol, atol=atol, equal_nan=True)
        if bool(close.all()):
            return None
        idx = tuple(int(i) for i in torch.nonzero(~close)[0])
        return (
            f"{what} differs at index {list(idx)}: expected {exp[idx].item():.6g}, got {act[idx].item():.6g}"
            f" (expected {_describe(expected)}, got {_describe(got)})"
        )
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{what} should be a {type(expected).__name__} of {len(expected)} items, got {_describe(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = compare(e, g, rtol, atol, f"{what}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, float):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)) or not math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
            return f"{what}: expected {expected!r}, got {_describe(got)}"
        return None
    if isinstance(expected, int) and isinstance(got, torch.Tensor) and got.numel() == 1 and not got.is_floating_point():
        got = got.item()
    if type(got) is not type(expected) and not (isinstance(expected, int) and isinstance(got, int)):
        return f"{what}: expected {_describe(expected)} ({type(expected).__name__}), got {_describe(got)} ({type(got).__name__})"
    if got != expected:
        return f"{what}: expected {_describe(expected)}, got {_describe(got)}"
    return None


NOT_DIFFERENTIABLE = ("output is not differentiable: gradients must reach the inputs "
                      "(no .detach(), .item() or in-place tricks)")


@dataclass
class Reference:
    """The reference answer to a case: the output and, for gradient cases, the fixed random cotangent
    ``weights`` and the gradients of ``sum(output * weights)`` with respect to ``case.grad_wrt``."""

    expected: Any
    weights: torch.Tensor | None = None
    grads: tuple = ()


def exercise_cases(ex: Exercise, seed: int, hidden: bool) -> list[tuple[Case, bool]]:
    """``(case, is_hidden)`` pairs: the visible cases, then (if ``hidden``) the hidden ones, for ``seed``."""
    cases = []
    for is_hidden in (False, True) if hidden else (False,):
        seed_everything(seed + (1000 if is_hidden else 0))
        cases += [(case, is_hidden) for case in ex.cases(is_hidden)]
    return cases


def first_output(value: Any) -> Any:
    """The output that gradients are checked on: the first item of a tuple or list, else the value."""
    return value[0] if isinstance(value, (tuple, list)) and value else value


def _call(fn: Callable, case: Case) -> tuple[Any, list[torch.Tensor]]:
    args = [_fresh(a, grad=i in case.grad_wrt) for i, a in enumerate(case.args)]
    return fn(*args, **_fresh(case.kwargs)), [args[i] for i in case.grad_wrt]


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def reference_answer(ex: Exercise, case: Case) -> Reference:
    """Run the exercise's reference on (copies of) the case's inputs."""
    with torch.random.fork_rng():
        expected, inputs = _call(ex.reference, case)
    ref = Reference(_detached(expected))
    if case.grad_wrt:
        out = first_output(expected)
        ref.weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        ref.grads = torch.autograd.grad((out * ref.weights).sum(), inputs, allow_unused=True)
    return ref


def compare_gradients(ex: Exercise, case: Case, ref: Reference, grads: list) -> str | None:
    """``None`` if the student's input gradients match the reference's, else why not."""
    for i, expected, got in zip(case.grad_wrt, ref.grads, grads):
        if got is None:
            return f"no gradient reaches argument {i}: it should influence the output differentiably"
        problem = compare(expected, got, ex.rtol * 10, ex.atol * 10, f"gradient w.r.t. argument {i}")
        if problem:
            return problem
    return None


def _run_case(ex: Exercise, fn: Callable, case: Case) -> str | None:
    ref = reference_answer(ex, case)
    got, inputs = _call(fn, case)
    problem = compare(ref.expected, got, ex.rtol, ex.atol)
    if problem or not case.grad_wrt:
        return problem
    out = first_output(got)
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        return NOT_DIFFERENTIABLE
    grads = torch.autograd.grad((out * ref.weights.to(out.dtype)).sum(), inputs, allow_unused=True)
    return compare_gradients(ex, case, ref, grads)


def run_check(exercise_id: str, fn: Callable, *, hidden: bool = False, seed: int = 0) -> CheckResult:
    """Check ``fn`` against exercise ``exercise_id``: visible cases, plus hidden ones if ``hidden``.

    Never raises for anything the student's function does; all-or-nothing points per exercise.
    """
    ex = REGISTRY.get(exercise_id)
    if ex is None:
        return CheckResult(exercise_id, "?", "error", 0, 0, 0, 0, f"unknown exercise id; known: {sorted(REGISTRY)}")
    result = CheckResult(ex.id, ex.function, "failed", 0, ex.points, 0, 0)
    if not callable(fn):
        result.message = f"expected a function named {ex.function}, got {type(fn).__name__}"
        return result
    cases = [case for case, _ in exercise_cases(ex, seed, hidden)]
    result.total_cases = len(cases)
    for case in cases:
        try:
            with torch.random.fork_rng():
                problem = _run_case(ex, fn, case)
        except NotImplementedError as err:
            if str(err) in ("", STUB_MESSAGE):  # a stub; torch's NotImplementedError (with a message) is an error
                result.status = "not implemented"
                return result
            problem = f"raised NotImplementedError: {err}"
        except Exception as err:  # the student's code raised: report it, never re-raise
            problem = f"raised {type(err).__name__}: {err}"
        if problem:
            result.message = f"case '{case.name}' failed: {problem}. Hint: {ex.hint}"
            return result
        result.passed_cases += 1
    result.status, result.points = "passed", ex.points
    return result


def check(exercise_id: str, fn: Callable) -> None:
    """Notebook check cell: print one line with the verdict on the visible cases."""
    print(run_check(exercise_id, fn))
