"""Notebook 10: the statements its prose generates from measured data agree with the data it stores."""
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "notebooks" / "10_stability.ipynb"


def _outputs(nb) -> list[str]:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text") or out.get("data", {}).get("text/markdown") or "")
    return texts


def _scaling_table(texts: list[str]) -> list[dict]:
    """The stored table 'scaling the router weights' (weights x -> prob. error, flipped tokens %)."""
    text = next(t for t in texts if "scaling the router weights" in t)
    lines = text.split("scaling the router weights\n", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, map(float, line.split()))) for line in lines[1:]]


def test_the_probability_error_statement_is_what_the_table_shows():
    texts = _outputs(nbformat.read(NB, as_version=4))
    rows = _scaling_table(texts)
    assert [r["weights x"] for r in rows] == [1, 3, 10, 30, 100]
    statement = next(t for t in texts if t.startswith("How to read it:"))
    errors = [r["prob. error"] for r in rows]
    peak = max(range(len(rows)), key=errors.__getitem__)
    assert 0 < peak < len(rows) - 1, "the stored table no longer peaks inside the range: the prose must change"
    expected = (f"rises from {errors[0]:.4f} at ×1 to a peak of {errors[peak]:.4f} at ×{rows[peak]['weights x']:g} "
                f"and then falls, to {errors[-1]:.4f} at ×100")
    assert expected in " ".join(statement.split())
    flips = [r["flipped tokens %"] for r in rows]
    assert f"between {min(flips):.2f}% and {max(flips):.2f}%" in statement


def test_no_hand_typed_statement_about_the_probability_error_remains():
    nb = nbformat.read(NB, as_version=4)
    prose = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "absolute error of the probabilities" not in prose
    assert "ST-MoE (Sec. 2.4)" not in prose and "NaNGuard" in prose
