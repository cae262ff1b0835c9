"""Runnable examples: ``python -m moe_lab.examples.<name> --help``."""
