"""The exact solvers' entry point (kept for its callers): see exact.py."""

from __future__ import annotations

from .dp import segment_costs
from .exact import solve
from .plan import Plan
from .problem import Problem

__all__ = ["segment_costs", "solve_chain"]


def solve_chain(
    prob: Problem,
    objective: str,
    devices: list[int] | None = None,
    strategy: str = "edgeshard",
    collapse: bool = True,
) -> Plan:
    """The optimal plan over `devices` (default: all; the source always) for 'latency' or
    'throughput' (ties: least latency); past the planner's budget a heuristic plan with
    info['exact'] False, info['lower_bound_s'] and info['gap']. `collapse=False` keeps
    alike devices apart (the tests compare both)."""
    return solve(prob, objective, devices, strategy, collapse)
