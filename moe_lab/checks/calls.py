"""Calling a graded function: the one place where the checker runs a student's code. Each case runs under the
integrity guard, and what comes back is turned into plain, bounded data (tensors, numbers, strings, tuples and
lists) before anything else looks at it, so a returned object cannot run code when it is compared or described.

``check`` uses it in-process; the grader's kernel loads this file before any student code runs (it imports only
torch and the standard library, never ``moe_lab``)."""
from __future__ import annotations

from typing import Any

STUB_MESSAGE = "replace this line with your code"  # what an unfinished exercise raises (see course.py)
NOT_DIFFERENTIABLE = ("output is not differentiable: gradients must reach the inputs "
                      "(no .detach(), .item() or in-place tricks)")
MAX_DEPTH = 20            # nesting of tuples and lists in one output
MAX_ITEMS = 100_000       # values (containers, numbers, strings, tensors) in one output
MAX_ELEMENTS = 2**22      # tensor elements in one output
MAX_CHARS = 1_000_000     # characters of strings in one output


class TooLarge(ValueError):
    """What the function returned exceeds the bounds above."""


class _Budget:
    def __init__(self):
        self.items, self.elements, self.chars = MAX_ITEMS, MAX_ELEMENTS, MAX_CHARS

    def spend(self, items: int = 1, elements: int = 0, chars: int = 0) -> None:
        self.items, self.elements, self.chars = self.items - items, self.elements - elements, self.chars - chars
        if self.items < 0:
            raise TooLarge(f"it holds more than {MAX_ITEMS} values")
        if self.elements < 0:
            raise TooLarge(f"its tensors hold more than {MAX_ELEMENTS} elements")
        if self.chars < 0:
            raise TooLarge(f"its strings hold more than {MAX_CHARS} characters")


def plain(value: Any, budget: _Budget | None = None, depth: int = 0) -> Any:
    """``value`` as plain data: tensors detached, cloned and of class ``torch.Tensor``; numbers, strings,
    ``None``; tuples and lists of those; any other object as ``{"__unsupported__": type name}``.
    Raises :class:`TooLarge` beyond the bounds (shared references count each time they appear)."""
    import torch

    budget = _Budget() if budget is None else budget
    if depth > MAX_DEPTH:
        raise TooLarge(f"it is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, torch.Tensor):
        budget.spend(elements=value.numel())
        return value.detach().as_subclass(torch.Tensor).clone()
    budget.spend()
    if value is None or isinstance(value, bool):
        return bool(value) if value is not None else None
    for kind in (int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, str):
        budget.spend(0, chars=len(value))
        return str.__str__(value)
    if isinstance(value, (tuple, list)):
        kind = tuple if isinstance(value, tuple) else list
        if kind.__len__(value) > budget.items:  # too many before looking inside
            raise TooLarge(f"it holds more than {MAX_ITEMS} values")
        items = [plain(v, budget, depth + 1) for v in kind.__iter__(value)]
        return tuple(items) if kind is tuple else items
    return {"__unsupported__": str(type(value).__name__)[:100]}


def _text(err: BaseException) -> str:
    try:
        return f"{type(err).__name__}: {err}"[:300]
    except Exception:
        return str(type(err).__name__)[:100]


FINAL = ("not_implemented", "raised", "too_large")  # a record with one of these fails whatever the reference


def run_case(fn, case: dict, guard) -> dict:
    """Call ``fn(*case["args"], **case["kwargs"])`` inside ``guard`` and record what happened (plain data):
    ``out``, and ``grads`` of ``sum(first output * case["weights"])`` w.r.t. the arguments ``case["grad_wrt"]``;
    or ``not_implemented`` (a stub), ``raised`` (the exception), ``too_large``, ``grad_error``."""
    import torch

    args, rec = list(case["args"]), {}
    for i in case["grad_wrt"]:
        args[i] = args[i].detach().requires_grad_(True)
    with guard:
        try:
            got = fn(*args, **case["kwargs"])
            rec["out"] = plain(got)
        except NotImplementedError as err:
            if str(err) in ("", STUB_MESSAGE):
                rec["not_implemented"] = True
            else:
                rec["raised"] = _text(err)
        except TooLarge as err:
            rec["too_large"] = f"what it returned is too large: {err}"
        except (Exception, SystemExit) as err:
            rec["raised"] = _text(err)
        else:
            if case["grad_wrt"]:
                _gradients(got, args, case, rec)
    return rec


def _gradients(got, args: list, case: dict, rec: dict) -> None:
    import torch

    out = got[0] if isinstance(got, (tuple, list)) and got else got
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        rec["grad_error"] = NOT_DIFFERENTIABLE
        return
    try:
        inputs = [args[i] for i in case["grad_wrt"]]
        grads = torch.autograd.grad((out * case["weights"].to(out.dtype)).sum(), inputs, allow_unused=True)
        rec["grads"] = [None if g is None else plain(g) for g in grads]
    except TooLarge as err:
        rec["grad_error"] = f"its gradients are too large: {err}"
    except (Exception, SystemExit) as err:
        rec["grad_error"] = f"computing the gradients raised {_text(err)}"
