"""Claims as code: sentences rendered from paired differences, whose wording follows the confidence interval.

A notebook states a measured comparison only through :func:`compare` (or :func:`claim`), e.g.::

    compare(result, "mixtral", "dense", subject="the Mixtral preset", other="the dense model").text
    # "the validation cross-entropy of the Mixtral preset is lower than that of the dense model by 0.047 nats
    #  (95% CI [0.041, 0.053]; lower in 5 of 5 seeds)"

and when the interval contains 0 the same call says that the seeds cannot resolve a difference. With
``expected`` (the direction a paper reports) and ``source`` it also says whether the run reproduces it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .results import METRICS, paired
from .stats import PairedDifference


@dataclass(frozen=True)
class Claim:
    """``text``: the sentence; ``verdict``: what ``diff`` supports (``"lower"``, ``"higher"``, ``"unresolved"``:
    the subject's value relative to the other's); ``expected``: the direction the source reports (or None)."""

    text: str
    verdict: str
    diff: PairedDifference
    expected: str | None = None

    @property
    def reproduces(self) -> bool | None:
        """Whether the run shows the ``expected`` direction (None without one)."""
        return None if self.expected is None else self.verdict == self.expected


def claim(diff: PairedDifference, *, subject: str, other: str, quantity: str, unit: str = "", digits: int = 3,
          scale: float = 1.0, expected: str | None = None, source: str | None = None) -> Claim:
    """The sentence for ``diff`` (subject minus other, per seed; values multiplied by ``scale`` for display,
    e.g. 100 with ``unit="percentage points"``): "the <quantity> of <subject> is lower than that of <other> by
    ..." when the interval is below 0, "... higher ..." above 0, else "<n> seeds cannot resolve a difference".
    ``expected`` (``"lower"`` / ``"higher"``) with ``source`` adds whether the run reproduces the source."""
    if expected not in (None, "lower", "higher"):
        raise ValueError(f"expected must be None, 'lower' or 'higher', got {expected!r}")
    if (expected is None) != (source is None):
        raise ValueError("expected and source go together: give both or neither")

    def num(x: float, sign: str = "") -> str:
        return f"{scale * x:{sign}.{digits}f}"

    unit = f" {unit}" if unit else ""
    conf, n, verdict = f"{diff.confidence:.0%} CI", diff.n, diff.verdict
    if verdict == "unresolved":
        side = "lower" if diff.mean < 0 else "higher"
        text = (f"{n} seeds cannot resolve a difference in {quantity} between {subject} and {other}: the mean "
                f"difference is {num(diff.mean, '+')}{unit} ({conf} [{num(diff.low, '+')}, {num(diff.high, '+')}] "
                f"contains 0; {side} in {diff.agree} of {n} seeds)")
    else:
        sign = -1 if verdict == "lower" else 1
        low, high = sorted((sign * diff.low, sign * diff.high))
        text = (f"the {quantity} of {subject} is {verdict} than that of {other} by {num(sign * diff.mean)}{unit} "
                f"({conf} [{num(low)}, {num(high)}]; {verdict} in {diff.agree} of {n} seeds)")
    if expected is not None:
        if verdict == expected:
            text += f"; this reproduces the direction reported by {source}"
        elif verdict == "unresolved":
            text += f"; these seeds can neither confirm nor rule out that it is {expected}, as reported by {source}"
        else:
            text += f"; this is the opposite of the direction reported by {source}: not reproduced"
    return Claim(text, verdict, diff, expected)


def compare(result: dict[str, Any], a: str, b: str, metric: str = "val_ce", *, subject: str | None = None,
            other: str | None = None, digits: int = 3, scale: float = 1.0, unit: str | None = None,
            expected: str | None = None, source: str | None = None) -> Claim:
    """:func:`claim` for ``metric`` (a key of :data:`moe_lab.experiments.results.METRICS`) of arm ``a`` against
    arm ``b`` of ``result``, paired by seed; ``subject`` / ``other`` name the arms in the sentence (default: the
    arm names), ``unit`` defaults to the metric's."""
    diff = paired(result, a, b, metric)
    quantity, metric_unit = METRICS[metric]
    return claim(diff, subject=subject or a, other=other or b, quantity=quantity,
                 unit=metric_unit if unit is None else unit, digits=digits, scale=scale, expected=expected,
                 source=source)
