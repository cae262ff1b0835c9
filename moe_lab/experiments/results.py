"""Reading comparison results (:func:`moe_lab.experiments.run_comparison`'s data): per-seed metrics, paired
differences, a summary table, and the stored reference results (package data in ``experiments/results/``)."""
from __future__ import annotations

import gzip
import json
import re
import statistics
from pathlib import Path
from typing import Any

from .stats import PairedDifference, paired_difference

RESULTS = Path(__file__).resolve().with_name("results")
"""Where the reference results live (``<name>.json.gz``: gzipped JSON, ``zcat`` or ``show`` prints it)."""
END_FRACTION = 0.1
"""Per-step metrics are read over the last 10% of a run's steps (at least one step)."""
METRICS = {
    "val_ce": ("validation cross-entropy", "nats"),
    "train_ce": ("training cross-entropy over the last 10% of steps", "nats"),
    "max_vio": ("MaxVio over the last 10% of steps", ""),
    "drop_rate": ("share of token-slots dropped over the last 10% of steps", ""),
    "step_ms": ("median time per training step", "ms"),
}
"""``name: (what it is, unit)`` of the metrics :func:`metric_values` reads."""


def end_steps(steps: int) -> int:
    """How many final steps per-step metrics are read over: :data:`END_FRACTION` of ``steps``, at least 1."""
    return max(1, round(END_FRACTION * steps))


def run_metric(run: dict[str, Any], metric: str) -> float:
    """One run's value of ``metric`` (a key of :data:`METRICS`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    if metric == "val_ce":
        return run["val_ce"]
    if metric == "step_ms":
        return 1000 * statistics.median(run["step_time"])
    if metric not in run:
        raise ValueError(f"metric {metric!r} is recorded for MoE arms only")
    values = run[metric]
    return statistics.fmean(values[-end_steps(len(values)):])


def metric_values(result: dict[str, Any], arm: str, metric: str) -> list[float]:
    """``metric`` of every run of ``arm``, in seed order."""
    if arm not in result["runs"]:
        raise ValueError(f"arm must be one of {tuple(result['runs'])}, got {arm!r}")
    return [run_metric(run, metric) for run in result["runs"][arm]]


def paired(result: dict[str, Any], a: str, b: str, metric: str = "val_ce") -> PairedDifference:
    """``metric`` of arm ``a`` minus arm ``b``, paired by seed."""
    seeds = {arm: [run["seed"] for run in result["runs"][arm]] for arm in (a, b) if arm in result["runs"]}
    if len(seeds) == 2 and seeds[a] != seeds[b]:
        raise ValueError(f"arms {a!r} and {b!r} were not run with the same seeds: {seeds[a]} vs {seeds[b]}")
    return paired_difference(metric_values(result, a, metric), metric_values(result, b, metric))


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm: steps, parameters, training FLOPs, and mean / sample SD over seeds of each metric it has."""
    rows = []
    for arm, info in result["arms"].items():
        row = {"arm": arm, "steps": info["steps"], "total params": info["total_params"],
               "active params": info["active_params"], "train TFLOPs": info["steps"] * info["flops_per_step"] / 1e12}
        for metric in METRICS:
            try:
                values = metric_values(result, arm, metric)
            except ValueError:
                continue
            row[f"{metric} mean"] = statistics.fmean(values)
            row[f"{metric} sd"] = statistics.stdev(values) if len(values) > 1 else float("nan")
        rows.append(row)
    return rows


def provenance_text(result: dict[str, Any]) -> str:
    """Where and how ``result`` was made, in words (for a notebook): date, machine, threads, load, wall time."""
    p = result["provenance"]
    machine = p["gpu"] or f"{p['cpu']} ({p['cpu_capability']} kernels, {p['threads']} thread{'s' * (p['threads'] > 1)})"
    commit = f", commit {p['git_commit'][:10]}{' + changes' * p['git_dirty']}" if p.get("git_commit") else ""
    return (f"made {p['date'][:10]} on {machine}, torch {p['torch']}, Python {p['python']}{commit}, in "
            f"{p['wall_s'] / 60:.1f} min at a load average of {p['load_before']:.1f} to {p['load_after']:.1f}")


def load_result(name_or_path: str | Path) -> dict[str, Any]:
    """A stored result: a reference run's name (``results/<name>.json.gz``) or a path to a ``.json`` or
    ``.json.gz`` file."""
    path = Path(name_or_path)
    if not path.name.endswith((".json", ".json.gz")):
        path = RESULTS / f"{name_or_path}.json.gz"
        if not path.exists():
            stored = sorted(p.name.removesuffix(".json.gz") for p in RESULTS.glob("*.json.gz"))
            raise ValueError(f"no stored result named {name_or_path!r}; stored: {stored}")
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.name.endswith(".gz") else data)


def save_result(result: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write ``result`` as JSON, gzipped when the name ends in ``.gz`` (default: ``results/<result
    name>.json.gz``, the package's reference results); lists of numbers stay on one line. Returns the path."""
    if path is None:
        if not result.get("name"):
            raise ValueError("result has no name: pass a path")
        path = RESULTS / f"{result['name']}.json.gz"
    path = Path(path)
    text = json.dumps(result, indent=1)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"
    path.write_bytes(gzip.compress(text.encode(), mtime=0) if path.name.endswith(".gz") else text.encode())
    return path


_NUMBER = r"-?[0-9][0-9.eE+-]*"
_NUMBER_LIST = re.compile(rf"\[\s*({_NUMBER}(?:,\s*{_NUMBER})*)\s*\]")
"""A JSON list of numbers spread over lines by ``indent``: written on one line."""
