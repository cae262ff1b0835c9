"""Calling a graded function: the one place where the checker runs a student's code. Each case runs under the
integrity guard, and what comes back is turned into plain, bounded data (tensors, numbers, strings, tuples and
lists) before anything else looks at it, so a returned object cannot run code when it is compared or described.

``check`` uses it in-process; the grader's kernel loads this file before any student code runs (it imports only
torch and the standard library, never ``moe_lab``)."""
from __future__ import annotations

import linecache
import os
import sys
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


def _name(cls) -> str:
    """A class's name, even when its metaclass makes ``__name__`` raise."""
    try:
        return str(type.__dict__["__name__"].__get__(cls, type))[:100]
    except BaseException:  # noqa: BLE001  (a broken class: checks never raise)
        return "an exception"


def _message(err: BaseException) -> str:
    """``str(err)``, or ``""`` if that raises or is not text."""
    try:
        text = str(err)
        return str.__str__(text) if isinstance(text, str) else ""
    except BaseException:  # noqa: BLE001
        return ""


_LIBRARY_DIRS = tuple(os.path.join(os.path.realpath(p), "") for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}
                      | {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})


def _cell_label(filename: str) -> str:
    """``Cell In[5]`` for a notebook cell (IPython's own label, as its tracebacks show it), else the file name."""
    shell = getattr(sys.modules.get("IPython.core.getipython"), "get_ipython", lambda: None)()
    try:
        label = shell.compile.format_code_name(filename) if shell is not None else None
    except Exception:  # noqa: BLE001  (a shell without cell names)
        label = None
    return " ".join(label) if label else os.path.basename(filename)


def where(err: BaseException) -> str:
    """Where in the student's own code ``err`` came from: the innermost frame of its traceback that is not in
    ``moe_lab``, the checker, or an installed library (``"Cell In[5], line 3: y = x @ w"``); ``""`` if none."""
    found, tb = None, getattr(err, "__traceback__", None)
    try:
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if not name.startswith("<frozen") and not os.path.realpath(name).startswith(_LIBRARY_DIRS):
                found = (name, tb.tb_lineno)
            tb = tb.tb_next
        if found is None:
            return ""
        line = linecache.getline(found[0], found[1]).strip()
        return f"{_cell_label(found[0])}, line {found[1]}" + (f": {line[:120]}" if line else "")
    except Exception:  # noqa: BLE001  (checks never raise)
        return ""


def _text(err: BaseException) -> str:
    """``"KeyError: 'x' (at Cell In[5], line 3: ...)"``: the exception, and where in the student's code it came
    from. Never raises, whatever the exception does."""
    message = _message(err)
    text = f"{_name(type(err))}: {message}"[:300] if message else _name(type(err))
    location = where(err)
    return f"{text} (at {location})" if location else text


FINAL = ("not_implemented", "raised", "too_large")  # a record with one of these fails whatever the reference


def _view(got, args: list) -> list[int] | None:
    """``[output index, argument index]`` of the first output tensor that shares memory with an argument
    (``-1``: with itself, a stride of 0 as ``expand`` makes); ``None`` if every output is a tensor of its own."""
    import torch

    outs = got if isinstance(got, (tuple, list)) else [got]
    for i, out in enumerate(outs):
        if not isinstance(out, torch.Tensor):
            continue
        if any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
            return [i, -1]
        memory = out.untyped_storage().data_ptr()
        for j, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == memory:
                return [i, j]
    return None


def train_block(block_class, x, target, router_weight, w1, w2, k: int, aux_coef: float, lr: float, steps: int):
    """The checker's own use of a student's MoE block class (exercise 13.5): build
    ``block_class(router_weight, w1, w2, k)``, check that it is an ``nn.Module`` whose registered parameters are
    exactly three, of the shapes of ``router_weight [E, d]``, ``w1 [E, d, d_ff]`` and ``w2 [E, d_ff, d]``, train it
    with ``torch.optim.SGD(lr)`` on ``mse(y, target) + aux_coef * aux`` (``y, aux = block(x)``) for ``steps`` steps.
    Returns ``(losses [steps]`` (each step's loss before its update), ``the router weight [E, d]`` and
    ``block(x)[0] [T, d]`` after training)."""
    import torch
    import torch.nn.functional as F

    block = block_class(router_weight, w1, w2, k)
    if not isinstance(block, torch.nn.Module):
        raise TypeError(f"{_name(block_class)}(...) must build a torch.nn.Module, got {_name(type(block))}")
    params = list(block.parameters())
    shapes = sorted(tuple(p.shape) for p in params)
    expected = sorted(tuple(t.shape) for t in (router_weight, w1, w2))
    if shapes != expected:
        raise ValueError(f"the block must register its weights as parameters (nn.Parameter), three of shapes "
                         f"{expected} (router_weight, w1, w2), got {len(shapes)} of shapes {shapes}")
    router = next(p for p in params if p.dim() == 2)
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        out = block(x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"forward must return (y, aux), got {_name(type(out))}")
        loss = F.mse_loss(out[0], target) + aux_coef * out[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        y = block(x)[0]
    return torch.tensor(losses), router.detach().clone(), y.detach().clone()


DRIVERS = {"train_block": train_block}
"""How the checker uses a student's class instead of calling a function (``Exercise.drive``): ``name:
driver(class, *case args)``, whose result is compared with the reference's."""


AUTOGRAD_USED = "used autograd (it saved a tensor for a backward pass)"


class _AutogradUse:
    """Saved-tensor hooks for an exercise without autograd: autograd saves tensors for its backward pass of every
    graph a function builds (``backward``, ``torch.autograd.grad`` and ``.functional`` do), so the first save is a
    violation of ``guard``; ``torch.func``'s transforms refuse to run under these hooks, and
    ``disable_saved_tensors_hooks`` raises while they are active."""

    def __init__(self, guard):
        self.guard = guard

    def pack(self, tensor):
        self.guard._violate(AUTOGRAD_USED)
        return tensor


def _unpack(tensor):
    return tensor


def run_case(fn, case: dict, guard) -> dict:
    """Call ``fn(*case["args"], **case["kwargs"])`` (or, with ``case["drive"]``, that driver of
    :data:`DRIVERS` on ``fn`` and the arguments) inside ``guard`` and record what happened (plain data):
    ``out``, and ``grads`` of ``sum(first output * case["weights"])`` w.r.t. the arguments ``case["grad_wrt"]``;
    with ``case["no_autograd"]``, any use of autograd by ``fn`` is a violation (see :class:`_AutogradUse`);
    or ``not_implemented`` (a stub), ``raised`` (the exception), ``too_large``, ``grad_error``; with
    ``case["new_tensors"]``, ``view`` (see :func:`_view`)."""
    import torch

    args, rec = list(case["args"]), {}
    for i in case["grad_wrt"]:
        args[i] = args[i].detach().requires_grad_(True)
    with guard:
        try:
            drive = DRIVERS[case["drive"]] if case.get("drive") else None

            def call():
                return drive(fn, *args, **case["kwargs"]) if drive else fn(*args, **case["kwargs"])

            if case.get("no_autograd"):
                with torch.autograd.graph.saved_tensors_hooks(_AutogradUse(guard).pack, _unpack):
                    got = call()
            else:
                got = call()
            rec["out"] = plain(got)
            if case.get("new_tensors"):
                rec["view"] = _view(got, args)
        except NotImplementedError as err:
            if _message(err) in ("", STUB_MESSAGE):
                rec["not_implemented"] = True
            else:
                rec["raised"] = _text(err)
        except TooLarge as err:
            rec["too_large"] = f"what it returned is too large: {err}"
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001  (whatever the function raises is its verdict)
            rec["raised"] = _text(err)
        else:
            if case["grad_wrt"]:
                _gradients(got, args, case, rec)
    return rec


def _gradients(got, args: list, case: dict, rec: dict) -> None:
    import torch

    try:
        out = got[0] if isinstance(got, (tuple, list)) and got else got
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            rec["grad_error"] = NOT_DIFFERENTIABLE
            return
        inputs = [args[i] for i in case["grad_wrt"]]
        grads = torch.autograd.grad((out * case["weights"].to(out.dtype)).sum(), inputs, allow_unused=True)
        rec["grads"] = [None if g is None else plain(g) for g in grads]
    except TooLarge as err:
        rec["grad_error"] = f"its gradients are too large: {err}"
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001
        rec["grad_error"] = f"computing the gradients raised {_text(err)}"
