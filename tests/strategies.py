"""Hypothesis strategies and helpers shared by the property-based tests (``tests/test_properties_*.py``).

Tensors are drawn as a shape plus a seed for ``torch.randn`` (fast, and ties have probability 0); values that
stress the edges (huge logits, exact ties, zeros) come from explicit strategies where a test needs them.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import strategies as st

NOT_FLOAT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.complex64, torch.complex128)
"""Dtypes a floating-point argument (logits, probabilities, x) must reject."""

NOT_ID_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.complex64)
"""Dtypes an expert-id argument must reject (a float id would otherwise be truncated: 0.9 -> 0)."""

ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
"""Integer dtypes expert ids may have (uint8 / int16 hold the small ids drawn here)."""

NON_FINITE = (math.nan, math.inf, -math.inf)

seeds = st.integers(0, 2**31 - 1)


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def not_ints() -> st.SearchStrategy:
    """Values that are not integers: floats (integral ones too, like 2.0), NaN, strings, bools, None."""
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                     st.integers(-5, 50).map(str), st.booleans(), st.none())


def bad_ints(low: int, high: int | None = None) -> st.SearchStrategy:
    """Anything an integer argument in ``low .. high`` must reject."""
    out = [not_ints(), st.integers(low - 10**6, low - 1)]
    if high is not None:
        out.append(st.integers(high + 1, high + 10**6))
    return st.one_of(*out)


def bad_positive_numbers(zero_ok: bool = False) -> st.SearchStrategy:
    """Anything a finite number ``> 0`` (``>= 0`` with ``zero_ok``) must reject."""
    below = st.floats(max_value=-1e-300) if zero_ok else st.floats(max_value=0.0)
    return st.one_of(below, st.sampled_from(NON_FINITE), st.text(max_size=3), st.booleans(), st.none())


@st.composite
def poisoned(draw, t: torch.Tensor) -> torch.Tensor:
    """``t`` with one element (drawn) set to NaN, +inf or -inf."""
    out = t.clone()
    out.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(NON_FINITE))
    return out


def names(message: str, name: str) -> bool:
    """Whether an error message names ``name`` as a whole word."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) is not None


def raises_naming(name: str, fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` raises ``ValueError`` / ``TypeError`` with a message that names ``name``."""
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    assert names(str(info.value), name), str(info.value)
