"""Notebook dashboards: one module per widget, each a builder over a pure, unit-tested compute function."""
from .calculator import calculator_dashboard, calculator_report  # noqa: F401  (issue 4)
from .expert_load import expert_load_dashboard, routing_snapshot
from .noise import noise_dashboard, noise_snapshot  # noqa: F401  (issue 3)
from .balance import balance_dashboard  # noqa: F401  (issue 3)
from .capacity import capacity_dashboard, capacity_snapshot  # noqa: F401  (issue 3)

__all__ = ["expert_load_dashboard", "routing_snapshot"]
