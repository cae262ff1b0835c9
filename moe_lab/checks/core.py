"""The exercise checker: run a student's function on visible (notebook) or hidden (grader) cases and
compare it with the library's reference, never raising on a wrong or unfinished answer.

The same judging serves ``check`` (in the notebook) and the instructor's grader: the student's function is called
by :func:`moe_lab.checks.calls.run_case` under the integrity guard (:mod:`moe_lab.checks.integrity`), and what
it returned (plain data) is judged here by :func:`judge_case`.
"""
from __future__ import annotations

import copy
import inspect
import math
import reprlib
import textwrap
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..utils import seed_everything
from . import calls, integrity
from .calls import run_case

integrity.trust(integrity.trusted_codes(vars(calls)))  # the calling code is the checker's, not moe_lab's library

RULE = ("a graded function may not call into moe_lab (its references, its checks or its library code) unless "
        "its exercise allows it")
GRADING_BUILD = False  # True in the grader's answer-free build of moe_lab (moe_lab.grading.build): no references
WIDTH = 96             # verdict lines are wrapped at spaces to this width (JupyterLab wraps long lines mid-word)


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
    - ``hint``: the first hint (tier 1), shown with a failing case; it names the idea, not the code.
    - ``hints``: further hints (tiers 2, 3, ...), each more concrete than the last, revealed one at a time by
      ``moe_lab.checks.hint(id)``; only an exercise that is mechanical may end with code.
    - ``mistakes``: known wrong variants, ``description -> function`` with the reference's signature; when the
      student's result on a failing case matches one (the checker's tolerances), the verdict says
      "this looks like <description>".
    - ``new_tensors``: the outputs must be tensors of their own (not views of the inputs, nor ``expand``-ed).
    - ``drive``: the student writes a class, not a function: the checker builds and uses it with this driver of
      :data:`moe_lab.checks.calls.DRIVERS` (e.g. ``"train_block"``: its own training loop) and compares what that
      returns with ``reference`` (a function of the case's arguments).
    - ``allow``: the ``moe_lab`` code the student's function may call, as qualified names
      (``"moe_lab.routing.softmax_topk"``, ``"moe_lab.layer.MoELayer.forward"``) or prefixes of them (a module
      ``"moe_lab.balancing"`` or a class ``"moe_lab.layer.MoELayer"``); whatever such code calls in turn is
      allowed too. Any other call into ``moe_lab`` while the function runs scores 0.
    - ``no_autograd``: the function may not use autograd (an exercise that asks for gradients by hand): a graph
      it builds and differentiates while it runs scores 0. Cases with ``grad_wrt`` cannot be combined with it.
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
    new_tensors: bool = False
    drive: str | None = None
    no_autograd: bool = False

    def __post_init__(self):
        self.hints, self.allow = tuple(self.hints), tuple(self.allow)
        if not all(isinstance(h, str) and h for h in (self.hint, *self.hints)):
            raise TypeError(f"{self.id}: hint and hints must be non-empty strings")
        if not (isinstance(self.mistakes, dict) and all(isinstance(k, str) and callable(v)
                                                        for k, v in self.mistakes.items())):
            raise TypeError(f"{self.id}: mistakes must be a dict of description -> function")
        for entry in self.allow:
            if not (isinstance(entry, str) and entry.startswith("moe_lab.")
                    and all(part.isidentifier() for part in entry.split("."))):
                raise ValueError(f"{self.id}: allow entries are dotted names under moe_lab "
                                 f"('moe_lab.routing.softmax_topk', 'moe_lab.balancing'), got {entry!r}")

    @property
    def tiers(self) -> tuple[str, ...]:
        """All hints in order: tier 1 is ``hint``."""
        return (self.hint, *self.hints)

    def parameter(self, i: int) -> str:
        """The name of positional argument ``i`` in the reference's signature, as `name`."""
        try:
            params = [p.name for p in inspect.signature(self.reference).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        return f"`{params[i]}`" if i < len(params) else f"argument {i}"


def with_weights(module: torch.nn.Module, **tensors: torch.Tensor) -> torch.nn.Module:
    """Replace parameters of ``module`` by the given tensors themselves (``router__weight=`` sets
    ``router.weight``), so a reference forward pass is differentiable with respect to the student's inputs."""
    for name, value in tensors.items():
        owner, attr = name.replace("__", ".").rsplit(".", 1)
        delattr(module.get_submodule(owner), attr)
        setattr(module.get_submodule(owner), attr, value)
    return module


REGISTRY: dict[str, Exercise] = {}


def exercise(id: str, *, function: str, title: str, points: int, reference: Callable, hint: str, **options):
    """Decorator registering a case builder ``cases(hidden: bool) -> list[Case]`` as exercise ``id``.

    ``options``: ``hints``, ``mistakes``, ``allow``, ``rtol``, ``atol``, ``new_tensors``, ``no_autograd``, ``drive``
    (see :class:`Exercise`)."""

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
        """One line for a pass or a stub; for a failure, the verdict line then the reason, the known mistake it
        looks like and the hint, each wrapped at spaces (a long line would wrap mid-word in JupyterLab)."""
        mark = {"passed": "PASS", "failed": "FAIL", "not implemented": "TODO"}.get(self.status, "ERROR")
        head = f"[{mark}] {self.exercise_id} {self.function}"
        points = f"({self.points:g}/{self.max_points} points)"
        if self.status == "passed":
            return f"{head}: all {self.total_cases} cases passed {points}"
        if self.status == "not implemented":
            return f"{head}: not implemented yet {points}"
        body = [textwrap.fill(part, WIDTH, initial_indent="    ", subsequent_indent="    ", break_long_words=False,
                              break_on_hyphens=False) for part in self.message.split("\n") if part]
        return "\n".join([f"{head}: {points}", *body])


# --------------------------------------------------------------------------------------------- describing values

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 60, 60
_REPR.maxlong = 40


def scalar(value: Any) -> str:
    """A number or boolean as a person writes it: ``True``, ``3``, ``0.885``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return f"{value:.6g}"
    return describe(value)


def _nested(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_nested(v) for v in value) + "]"
    return scalar(value)


def describe(value: Any, limit: int = 120) -> str:
    """A short description of a value, never longer than about ``limit`` characters nor materialising a big
    tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dim() == 0:
            return scalar(value.item())
        if value.numel() <= 32:
            text = _nested(value.tolist())
            if len(text) <= limit:
                return text
        head = value[(0,) * (value.dim() - 1)][:6].tolist() if value.dim() and value.numel() else []
        return (f"tensor of shape {tuple(value.shape)}, {value.dtype}"
                + (f", starting {', '.join(scalar(v) for v in head)}, ..." if head else ""))
    if isinstance(value, (bool, int, float)):
        return scalar(value)
    if isinstance(value, _Unsupported):
        return f"a {type(value).__name__} object"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Unsupported:
    """Stands for a returned object of a type the checker does not load (its name shows in the verdict)."""


def revive(value: Any) -> Any:
    """Plain data from :func:`moe_lab.checks.calls.plain`, with unsupported objects as stand-ins named like them."""
    if isinstance(value, dict) and set(value) == {"__unsupported__"}:
        return type(str(value["__unsupported__"]), (_Unsupported,), {})()
    if isinstance(value, (tuple, list)):
        return type(value)(revive(v) for v in value)
    return value


def _kind(value: Any) -> str:
    return "a torch.Tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def compare(expected: Any, got: Any, rtol: float, atol: float, what: str = "output") -> str | None:
    """``None`` if ``got`` matches ``expected`` (recursively, tensors to tolerance), else why not."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{what} should be a torch.Tensor, got {_kind(got)} ({describe(got)})"
        if tuple(got.shape) != tuple(expected.shape):
            return f"{what} should have shape {tuple(expected.shape)}, got {tuple(got.shape)}"
        if got.dtype != expected.dtype:
            return f"{what} should have dtype {expected.dtype}, got {got.dtype}"
        if expected.numel() == 0:
            return None
        exp, act = expected.detach().cpu(), got.detach().cpu()
        close = torch.isclose(act.double(), exp.double(), rtol=rtol, atol=atol, equal_nan=True)
        if bool(close.all()):
            return None
        if expected.numel() == 1:
            return f"{what}: expected {scalar(exp.flatten()[0].item())}, got {scalar(act.flatten()[0].item())}"
        idx = tuple(int(i) for i in torch.nonzero(~close)[0])
        return (f"{what} differs at index {list(idx)}: expected {scalar(exp[idx].item())}, got "
                f"{scalar(act[idx].item())} (expected {describe(expected)}, got {describe(got)})")
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{what} should be a {type(expected).__name__} of {len(expected)} items, got {describe(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = compare(e, g, rtol, atol, f"{what}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(got, torch.Tensor) and got.numel() == 1 and isinstance(expected, (bool, int, float)):
        if isinstance(expected, float) or (got.dtype == torch.bool) == isinstance(expected, bool):
            got = got.item()
    if isinstance(expected, float):
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isclose(
                got, expected, rel_tol=rtol, abs_tol=atol):
            return f"{what}: expected {scalar(expected)}, got {describe(got)}"
        return None
    if type(got) is not type(expected) and not (isinstance(expected, int) and isinstance(got, int)
                                                and not isinstance(got, bool) and not isinstance(expected, bool)):
        return (f"{what}: expected {describe(expected)} ({type(expected).__name__}), "
                f"got {describe(got)} ({_kind(got)})")
    if got != expected:
        return f"{what}: expected {describe(expected)}, got {describe(got)}"
    return None


# --------------------------------------------------------------------------------------------- cases and references


@dataclass
class Reference:
    """The reference answer to a case: the output and, for gradient cases, the fixed random cotangent
    ``weights`` and the gradients of ``sum(output * weights)`` with respect to ``case.grad_wrt``."""

    expected: Any
    weights: torch.Tensor | None = None
    grads: tuple = ()


def _fresh(value: Any, grad: bool = False) -> Any:
    value = copy.deepcopy(value)
    if grad and isinstance(value, torch.Tensor):
        value = value.detach().requires_grad_(True)
    return value


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def first_output(value: Any) -> Any:
    """The output that gradients are checked on: the first item of a tuple or list, else the value."""
    return value[0] if isinstance(value, (tuple, list)) and value else value


def reference_answer(fn: Callable, case: Case, weights: torch.Tensor | None = None) -> Reference:
    """Run a reference (or a known mistake) on copies of the case's inputs; gradient cases use the cotangent
    ``weights`` (default: drawn from a fixed seed, the same for every function with that output shape)."""
    args = [_fresh(a, grad=i in case.grad_wrt) for i, a in enumerate(case.args)]
    with torch.random.fork_rng():
        expected = fn(*args, **_fresh(case.kwargs))
    ref = Reference(_detached(expected))
    if case.grad_wrt:
        out = first_output(expected)
        ref.weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype) \
            if weights is None else weights
        ref.grads = torch.autograd.grad((out * ref.weights).sum(), [args[i] for i in case.grad_wrt],
                                        allow_unused=True)
    return ref


_MISTAKES_LOCK = threading.Lock()


@dataclass
class GradedCase:
    """A case (visible or hidden) of exercise ``ex`` with its reference answer; the answers of the exercise's
    known mistakes are computed when first needed (thread-safe)."""

    ex: Exercise
    case: Case
    hidden: bool
    ref: Reference
    _mistakes: list | None = field(default=None, repr=False)

    def mistake_answers(self) -> list[tuple[str, Reference | None]]:
        with _MISTAKES_LOCK:
            if self._mistakes is None:
                answers = []
                for description, fn in self.ex.mistakes.items():
                    try:
                        answers.append((description, reference_answer(fn, self.case, self.ref.weights)))
                    except Exception:  # a mistake that does not apply to this case
                        answers.append((description, None))
                self._mistakes = answers
            return self._mistakes


def exercise_cases(ex: Exercise, seed: int, hidden: bool) -> list[tuple[Case, bool]]:
    """``(case, is_hidden)`` pairs: the visible cases (always the notebook's: drawn from seed 0, as ``check`` draws
    them), then (if ``hidden``) the hidden ones, drawn from ``seed``."""
    cases = []
    for is_hidden in (False, True) if hidden else (False,):
        seed_everything(seed + 1000 if is_hidden else 0)
        cases += [(case, is_hidden) for case in ex.cases(is_hidden)]
    return cases


def graded_case(ex: Exercise, case: Case, hidden: bool) -> GradedCase:
    return GradedCase(ex, case, hidden, reference_answer(ex.reference, case))


def case_input(item: GradedCase) -> dict:
    """What :func:`moe_lab.checks.calls.run_case` takes: fresh copies of the case's inputs and its cotangent."""
    return {"args": [_fresh(a) for a in item.case.args], "kwargs": _fresh(item.case.kwargs),
            "grad_wrt": list(item.case.grad_wrt), "weights": item.ref.weights, "new_tensors": item.ex.new_tensors,
            "no_autograd": item.ex.no_autograd, "drive": item.ex.drive}


# --------------------------------------------------------------------------------------------- judging


def _gradient_problem(ex: Exercise, item: GradedCase, expected_grads, rec: dict) -> str | None:
    if rec.get("grad_error"):
        return str(rec["grad_error"])
    grads = rec.get("grads")
    if not (isinstance(grads, list) and len(grads) == len(item.case.grad_wrt)):
        return "the checker could not read the gradients of your function"
    for i, expected, got in zip(item.case.grad_wrt, expected_grads, grads):
        if got is None:
            return f"no gradient reaches case input {ex.parameter(i)}: it should influence the output differentiably"
        if expected is None:
            expected = torch.zeros_like(item.case.args[i])
        problem = compare(expected, revive(got), ex.rtol * 10, ex.atol * 10, f"gradient w.r.t. {ex.parameter(i)}")
        if problem:
            return problem
    return None


def _looks_like(ex: Exercise, item: GradedCase, rec: dict, output_ok: bool) -> str:
    """``"\\nthis looks like <description>"`` if the failing result matches a known mistake, else ``""``."""
    if not ex.mistakes:
        return ""
    got = revive(rec.get("out"))
    for description, answer in item.mistake_answers():
        if answer is None or compare(answer.expected, got, ex.rtol, ex.atol) is not None:
            continue
        if output_ok and _gradient_problem(ex, item, answer.grads, rec) is not None:
            continue
        return f"\nthis looks like {description}"
    return ""


def judge_case(ex: Exercise, item: GradedCase, rec: dict) -> str | None:
    """Why the result ``rec`` (from :func:`~moe_lab.checks.calls.run_case`) fails the case; ``None`` if it
    passes. Raises nothing for anything a student's function returned."""
    if not isinstance(rec, dict):
        return "the checker could not read what your function returned"
    if "raised" in rec:
        return f"raised {rec['raised']}"
    if "too_large" in rec:
        return str(rec["too_large"])
    problem = compare(item.ref.expected, revive(rec.get("out")), ex.rtol, ex.atol)
    if problem:
        return problem + _looks_like(ex, item, rec, output_ok=False)
    view = rec.get("view")
    if ex.new_tensors and isinstance(view, list) and len(view) == 2 and all(isinstance(v, int) for v in view):
        shared = "memory of its own elements (a stride of 0, as expand() makes)" if view[1] < 0 else \
            f"memory with the input {ex.parameter(view[1])}"
        return (f"output[{view[0]}] has the right values but shares {shared}: return new tensors (stack, repeat or "
                "clone), so that changing one does not change another")
    if item.case.grad_wrt:
        problem = _gradient_problem(ex, item, item.ref.grads, rec)
        if problem:
            return problem + _looks_like(ex, item, rec, output_ok=True)
    return None


def failure_message(ex: Exercise, item: GradedCase, problem: str, say_visible: bool = False) -> str:
    """The reason, the known mistake it looks like and the hint, one per line (``CheckResult`` wraps them)."""
    kind = ("hidden " if item.hidden else "visible ") if say_visible else ""
    more = f" (more: hint({ex.id!r}))" if ex.hints else ""
    return f"{kind}case '{item.case.name}' failed: {problem}\nHint: {ex.hint}{more}"


def integrity_message(ex: Exercise, violation: str | None, tamper: str | None) -> str:
    allowed = f"this one allows {', '.join(ex.allow)}" if ex.allow else "this one allows none"
    if tamper:
        return (f"the integrity check was interfered with while {ex.function} ran ({tamper}); {RULE} "
                f"({allowed})")
    if violation == calls.AUTOGRAD_USED:
        return (f"{ex.function} {violation} while being graded; this exercise asks for the gradients by hand, "
                "so autograd (backward, torch.autograd.grad, torch.func) may not compute them")
    if violation.startswith("started a process"):
        return (f"{ex.function} {violation} while being graded; a graded function may not start processes "
                "(they run outside the integrity check)")
    return f"{ex.function} {violation} while being graded; {RULE} ({allowed})"


def run_check(exercise_id: str, fn: Callable, *, hidden: bool = False, seed: int = 0) -> CheckResult:
    """Check ``fn`` against exercise ``exercise_id``: visible cases, plus hidden ones if ``hidden``.

    Never raises for anything the student's function does; all-or-nothing points per exercise.
    """
    ex = REGISTRY.get(exercise_id)
    if ex is None:
        return CheckResult(exercise_id, "?", "error", 0, 0, 0, 0, f"unknown exercise id; known: {sorted(REGISTRY)}")
    result = CheckResult(ex.id, ex.function, "failed", 0, ex.points, 0, 0)
    if GRADING_BUILD:
        result.status, result.message = "error", "checked by the grader, outside this kernel"
        return result
    if not callable(fn):
        result.message = f"expected a function named {ex.function}, got {type(fn).__name__}"
        return result
    cases = exercise_cases(ex, seed, hidden)
    result.total_cases = len(cases)
    guard = integrity.Guard(ex.allow)
    for case, is_hidden in cases:
        item = graded_case(ex, case, is_hidden)
        with torch.random.fork_rng():
            rec = run_case(fn, case_input(item), guard)
        if guard.violation or guard.tamper:
            result.message = integrity_message(ex, guard.violation, guard.tamper)
            return result
        if rec.get("not_implemented"):
            result.status = "not implemented"
            return result
        problem = judge_case(ex, item, rec)
        if problem:
            result.message = failure_message(ex, item, problem)
            return result
        result.passed_cases += 1
    result.status, result.points = "passed", ex.points
    return result


# --------------------------------------------------------------------------------------------- the notebook

_REVEALED: dict[str, int] = {}  # exercise id -> hint tiers shown so far in this kernel


def check(exercise_id: str, fn: Callable) -> None:
    """Notebook check cell: print one line with the verdict on the visible cases."""
    result = run_check(exercise_id, fn)
    if result.status == "failed" and exercise_id in REGISTRY:
        _REVEALED[exercise_id] = max(_REVEALED.get(exercise_id, 0), 1)
    print(result)


def hint(exercise_id: str, tier: int | None = None) -> None:
    """Print the next hint of an exercise (tier 1 is the one a failing check shows), or hint number ``tier``."""
    ex = REGISTRY.get(exercise_id)
    if ex is None:
        raise ValueError(f"exercise_id must be one of {sorted(REGISTRY)}, got {exercise_id!r}")
    tiers = ex.tiers
    if tier is None:
        tier = min(_REVEALED.get(exercise_id, 0) + 1, len(tiers))
    if isinstance(tier, bool) or not isinstance(tier, int) or not 1 <= tier <= len(tiers):
        raise ValueError(f"tier must be an int from 1 to {len(tiers)} for {exercise_id}, got {tier!r}")
    _REVEALED[exercise_id] = max(_REVEALED.get(exercise_id, 0), tier)
    last = " (the last one)" if tier == len(tiers) else f" (next: hint({exercise_id!r}))"
    print(textwrap.fill(f"Hint {tier}/{len(tiers)} for {ex.id} {ex.function}{last}: {tiers[tier - 1]}", WIDTH,
                        subsequent_indent="    ", break_long_words=False, break_on_hyphens=False))
