"""Notebook dashboards: one module per widget, each a builder over a pure, unit-tested compute function."""
from .balance import balance_dashboard
from .bias_balancing import bias_balancing_dashboard
from .calculator import calculator_dashboard, calculator_report
from .capacity import capacity_dashboard, capacity_snapshot
from .comm_cost import comm_cost_dashboard, comm_cost_sweep
from .comparison import comparison_curves, comparison_dashboard
from .expert_load import expert_load_dashboard, routing_snapshot
from .noise import noise_dashboard, noise_snapshot
from .precision import precision_dashboard, precision_snapshot

__all__ = [
    "balance_dashboard", "bias_balancing_dashboard", "calculator_dashboard", "calculator_report",
    "capacity_dashboard", "capacity_snapshot", "comm_cost_dashboard", "comm_cost_sweep",
    "comparison_curves", "comparison_dashboard",
    "expert_load_dashboard", "noise_dashboard", "noise_snapshot", "precision_dashboard", "precision_snapshot",
    "routing_snapshot",
]
