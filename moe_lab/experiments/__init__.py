"""Fair experiments as a library feature (the course's "Evidence" rules, ``shared/COURSE_DESIGN.md`` section 6).

- :mod:`.budget`: :class:`Budget` (steps, tokens or training FLOPs; each model its own steps and schedule),
  :func:`matched_dense` (the equal-FLOPs / equal-parameters dense baseline, from the calculator);
- :mod:`.runner`: :func:`run_comparison` (arms x paired seeds -> plain JSON data with provenance), :class:`Setup`;
- :mod:`.stats`: :func:`paired_difference` (mean paired difference, Student-t interval, seeds that agree);
- :mod:`.results`: metrics of a result, :func:`paired`, :func:`summary`, :func:`load_result` / :func:`save_result`;
- :mod:`.claims`: :func:`compare` / :func:`claim`, sentences whose wording follows the interval;
- :mod:`.registry` and :mod:`.reference`: named reference runs (``python -m moe_lab.experiments``) and
  :func:`replay`, which re-runs their first steps.
"""
from .budget import BUDGET_KINDS, MATCHES, Budget, flops_per_step, matched_dense
from .claims import Claim, claim, compare
from .registry import REFERENCE_RUNS, ReferenceRun, reference_run, register, replay
from .results import METRICS, load_result, metric_values, paired, provenance_text, save_result, summary
from .runner import Setup, run_comparison, train_arm
from .stats import PairedDifference, paired_difference, t_quantile
from . import reference  # noqa: F401  (registers the course's reference runs)

__all__ = ["BUDGET_KINDS", "MATCHES", "METRICS", "REFERENCE_RUNS", "Budget", "Claim", "PairedDifference",
           "ReferenceRun", "Setup", "claim", "compare", "flops_per_step", "load_result", "matched_dense",
           "metric_values", "paired", "paired_difference", "provenance_text", "reference_run", "register", "replay",
           "run_comparison", "save_result", "summary", "t_quantile", "train_arm"]
