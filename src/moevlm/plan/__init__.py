"""``moevlm plan``: what a training run holds in memory per rank, before any weight is read."""

from moevlm.plan.memory import Plan, Row, make_plan, parse_bytes
from moevlm.plan.table import render

__all__ = ["Plan", "Row", "make_plan", "parse_bytes", "render"]
