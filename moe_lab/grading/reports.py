"""Reports: the grades CSV, one feedback file per submission, and the summary printed at the end."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from ..checks import REGISTRY
from .runner import Submission, _exercise_key, exercises_of

MAX_CELL = 32_000  # spreadsheets hold at most 32,767 characters in a cell
MAX_NAME_BYTES = 200


def exercise_columns(subs: list[Submission]) -> list[str]:
    """Exercise ids of every notebook among ``subs``, in order."""
    prefixes = {s.notebook[:2] for s in subs if s.notebook}
    return [ex.id for p in sorted(prefixes) for ex in exercises_of(p)]


def _num(x: float) -> str:
    return f"{x:g}"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula


def _cell(text: str) -> str:
    """A text cell: at most ``MAX_CELL`` characters, and never a formula (a leading ``'`` keeps it text, as
    OWASP's CSV-injection advice says)."""
    if text.startswith(FORMULA_STARTS):
        text = "'" + text
    if len(text) <= MAX_CELL:
        return text
    return text[: MAX_CELL - 60] + " ... (cut here: the feedback file has every note)"


def write_csv(subs: list[Submission], path: Path) -> None:
    """One row per submission, sorted by its label (UTF-8; no cell longer than ``MAX_CELL`` characters, none
    that a spreadsheet reads as a formula)."""
    columns = exercise_columns(subs)
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", "notebook", "status", *columns, "total", "max_total", "note"])
        for s in sorted(subs, key=lambda s: s.label):
            points = [_num(s.results[c].points) if c in s.results else "" for c in columns]
            max_total = "" if s.max_total is None else s.max_total
            writer.writerow([_cell(s.label), _cell(s.notebook), s.status, *points, _num(s.total), max_total,
                             _cell("; ".join(s.notes))])


def feedback_text(sub: Submission, seed: int) -> str:
    """A readable report for the student: every exercise's verdict, the failing case and the hint."""
    lines = [f"MoE Lab feedback for {sub.label}", ""]
    if sub.notebook:
        lines.append(f"Notebook: {sub.notebook}")
    lines.append(f"Status:   {sub.status}")
    if sub.max_total is not None:
        lines.append(f"Score:    {_num(sub.total)} / {sub.max_total}")
        lines += ["", "Each function was checked by the grader on the visible cases and on hidden cases",
                  f"(seed {seed}), independently of what your notebook printed.", ""]
        for ex_id in sorted(sub.results, key=_exercise_key):
            lines += [f"{ex_id} {REGISTRY[ex_id].title}", str(sub.results[ex_id]), ""]
    if sub.notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in sub.notes]
    return "\n".join(lines) + "\n"


def _encoded(label: str) -> str:
    out = []
    for i, ch in enumerate(label):
        if (ch.isascii() and ch.isalnum()) or ch in " -_+=,@()" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "backslashreplace")))
    return "".join(out)


def feedback_names(labels: list[str]) -> dict[str, str]:
    """A file name for the feedback on each label: distinct labels get distinct names, also on case-insensitive
    file systems, and every name is safe: letters, digits, spaces and ``.-_+=,@()`` are kept, ``/`` and every
    other character become ``%XX`` (their UTF-8 bytes), a leading ``.`` too; a name longer than
    ``MAX_NAME_BYTES``, or one that differs from another only in case, gets a hash of its label."""
    encoded = {label: _encoded(label) for label in labels}
    folded: dict[str, int] = {}
    for name in encoded.values():
        folded[name.casefold()] = folded.get(name.casefold(), 0) + 1
    names = {}
    for label, name in encoded.items():
        if folded[name.casefold()] > 1 or len(name.encode()) > MAX_NAME_BYTES:
            digest = hashlib.sha256(label.encode("utf-8", "backslashreplace")).hexdigest()[:12]
            name = f"{name[:MAX_NAME_BYTES - 20]}~{digest}"
        names[label] = name + ".txt"
    return names


def write_feedback(subs: list[Submission], folder: Path, seed: int) -> None:
    """``folder/<name>`` per submission, named by :func:`feedback_names`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = feedback_names([sub.label for sub in subs])
    for sub in subs:
        (folder / names[sub.label]).write_text(feedback_text(sub, seed), encoding="utf-8", errors="backslashreplace")


def summary(subs: list[Submission]) -> str:
    """Per-exercise mean score and pass rate, and counts per status (pandas tables as text)."""
    import pandas as pd

    rows = []
    for ex_id in exercise_columns(subs):
        got = [s.results[ex_id] for s in subs if ex_id in s.results]
        if not got:  # only grader errors for this notebook
            continue
        ex = REGISTRY[ex_id]
        rows.append({"exercise": ex_id, "function": ex.function, "points": ex.points, "submissions": len(got),
                     "mean score": round(sum(r.points for r in got) / len(got), 2),
                     "pass rate": round(sum(r.status == "passed" for r in got) / len(got), 2)})
    counts = pd.Series([s.status for s in subs]).value_counts().rename_axis("status").rename("submissions")
    table = pd.DataFrame(rows).to_string(index=False) if rows else "(no exercise notebooks)"
    return f"{table}\n\n{counts.to_frame().to_string()}"
