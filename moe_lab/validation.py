"""Argument checks shared by the library: each raises a ``ValueError`` that names the argument and the allowed
values (a ``TypeError`` where a tensor is required and something else is given).

Checks that read a tensor's values (NaN, ranges) run only where :func:`reads_values` allows, so a CUDA forward
pass never waits for the GPU; shape and dtype checks read metadata only and run everywhere.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

KINDS = {"float": "floating-point", "real": "real (integer or floating-point, not bool)", "int": "integer (not bool)",
         "bool": "bool"}
"""Dtype kinds :func:`check_tensor` accepts, and how its messages name them."""


def reads_values(t: torch.Tensor) -> bool:
    """Whether input checks may read ``t``'s values: always on CPU; on other devices (where a read is a host-device
    sync) only under PyTorch's debug mode, ``torch.autograd.set_detect_anomaly(True)``."""
    return t.device.type == "cpu" or torch.is_anomaly_enabled()


def is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (Python or NumPy, integer or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, low: int = 0, high: int | None = None) -> None:
    """``value`` is an integer in ``low .. high`` (``high=None``: no upper bound)."""
    if not is_int(value) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"with {low} <= {name} <= {high}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real number between ``low`` and ``high`` (excluded where ``*_open``)."""
    ok = is_number(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low:g}"] if low > -math.inf else []
        bounds += [f"{'<' if high_open else '<='} {high:g}"] if high < math.inf else []
        raise ValueError(f"{name} must be a finite number{' ' if bounds else ''}{' and '.join(bounds)}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _is_choice(value: Any, choice: Any) -> bool:
    """``value`` is ``choice``: equal, and of its kind (a bool for a bool, an integer for an integer: ``True`` is
    not ``1`` and ``8.0`` is not ``8``)."""
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(choice, bool) or isinstance(value, bool):
        return value is choice
    if is_int(choice):
        return is_int(value) and value == choice
    return value == choice


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """``value`` is one of ``allowed`` (see :func:`_is_choice`)."""
    if not any(_is_choice(value, choice) for choice in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_type(name: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    """``value`` is an instance of ``types``; else a ``TypeError`` saying ``name`` must be ``what``."""
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def check_ids(name: str, values: Any, num: int) -> list[int]:
    """``values`` is a sequence of integer ids in ``0 .. num - 1`` (a list or tuple of integers, or a 1-D integer
    tensor or NumPy array; never floats, which would truncate, or bools) -> the ids as a list of ``int``."""
    if isinstance(values, torch.Tensor) or hasattr(values, "__array__"):
        t = torch.as_tensor(values)
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor (or a list) of ids in 0..{num - 1}, got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
        values = t.tolist()
    elif isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of integer ids in 0..{num - 1}, got {type(values).__name__}")
    ids = list(values)
    bad = [v for v in ids if not is_int(v) or not 0 <= v < num]
    if bad:
        raise ValueError(f"{name} must hold integer ids in 0..{num - 1}, got {bad[:5]!r}")
    return [int(v) for v in ids]


def check_tensor(name: str, t: Any, shape: str, dims: int | tuple[int, ...] | None = None,
                 kind: str | None = "float") -> None:
    """``t`` is a tensor with ``dims`` dimensions (one of them, for a tuple) and a dtype of ``kind`` (a key of
    :data:`KINDS`; None: any); ``shape`` describes the expected shape in messages (e.g. ``"[tokens, num_experts]"``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if dims is not None and t.dim() not in (dims if isinstance(dims, tuple) else (dims,)):
        raise ValueError(f"{name} must have shape {shape}, got shape {tuple(t.shape)}")
    if kind is None:
        return
    is_float, is_bool = t.is_floating_point(), t.dtype == torch.bool
    is_int_ = not (is_float or is_bool or t.is_complex())
    ok = {"float": is_float, "real": is_float or is_int_, "int": is_int_, "bool": is_bool}[kind]
    if not ok:
        raise ValueError(f"{name} must be a {KINDS[kind]} tensor, got {t.dtype}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or infinity (reads its values: a host sync on a GPU).

    One reduction: a sum of finite values is finite unless it overflows, so only a non-finite sum (NaN or inf
    present, or an overflow) pays for the exact elementwise test (``torch.isfinite(t).all()`` costs ~40x more)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    t = t.detach()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(name: str, t: torch.Tensor) -> None:
    """No NaN or infinity in ``t`` (checked where :func:`reads_values` allows)."""
    if reads_values(t) and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s) (NaN or inf) of {t.numel()}")
