"""Paired statistics over seeds: Student's t quantiles (exact, no SciPy) and the mean paired difference with its
confidence interval.

Seeds are paired when both arms of a comparison use the same seed for initialisation and data order; then the
per-seed differences ``a - b`` carry the comparison, and their mean, its interval and how many seeds agree in sign
are what a claim may say (never the overlap of two spreads).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..validation import check_int, check_number, is_number

VERDICTS = ("lower", "higher", "unresolved")


def t_within(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with ``df`` degrees of freedom (Abramowitz & Stegun 26.7.3-4: a finite
    series in ``cos(theta)``, ``theta = atan(t / sqrt(df))``, exact for integer ``df``)."""
    check_int("df", df, 1)
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    total = term = 1.0
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for j in range(1, (df - 1) // 2):  # 2/pi (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
        term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``), by bisection on
    :func:`t_within` to about 1e-12: ``t_quantile(0.975, 4) = 2.776...``."""
    check_number("p", p, 0, 1, low_open=True, high_open=True)
    check_int("df", df, 1)
    if p == 0.5:
        return 0.0
    target = abs(2 * p - 1)
    low, high = 0.0, 1.0
    while t_within(high, df) < target:
        low, high = high, 2 * high
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if t_within(mid, df) < target else (low, mid)
    return math.copysign((low + high) / 2, p - 0.5)


@dataclass(frozen=True)
class PairedDifference:
    """The per-seed differences ``a - b`` of a paired comparison and what follows from them: ``mean``, the
    sample standard deviation ``sd`` (``statistics.stdev``), the two-sided ``confidence`` interval
    ``[low, high]`` of the mean (Student's t, ``n - 1`` degrees of freedom), ``agree`` (seeds whose difference
    has the sign of the mean) and the ``verdict``: ``"lower"`` (a below b: the interval is below 0), ``"higher"``
    or ``"unresolved"`` (the interval contains 0)."""

    differences: tuple[float, ...]
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.differences)

    @property
    def half_width(self) -> float:
        return t_quantile(0.5 + self.confidence / 2, self.n - 1) * self.sd / math.sqrt(self.n)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def agree(self) -> int:
        sign = math.copysign(1.0, self.mean)
        return sum(1 for d in self.differences if d * sign > 0)

    @property
    def verdict(self) -> str:
        return "lower" if self.high < 0 else "higher" if self.low > 0 else "unresolved"


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """``a - b`` per seed (``a[i]`` and ``b[i]`` from the same seed; at least 2 seeds)."""
    if len(a) != len(b):
        raise ValueError(f"a and b must hold one value per seed each, got {len(a)} and {len(b)} values")
    if len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds for an interval, got {len(a)}")
    for name, values in (("a", a), ("b", b)):
        if not all(is_number(v) for v in values):
            raise ValueError(f"{name} must hold finite numbers, got {list(values)!r}")
    check_number("confidence", confidence, 0, 1, low_open=True, high_open=True)
    return PairedDifference(tuple(float(x) - float(y) for x, y in zip(a, b)), confidence)
