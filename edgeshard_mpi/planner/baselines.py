"""Strategies, named as in the paper: each one a plan (or Infeasible with the numbers).

edge-solo        the whole model on the source device;
cloud-edge-even  the layers split evenly between the source and the cloud server;
cloud-edge-opt   the optimal split between the source and the cloud (the DP restricted to
                 those two devices);
edgeshard-even   the devices EdgeShard selects, in its order, with the layers split evenly;
edgeshard        the joint device selection and partition DP.
"""

from __future__ import annotations

from .infeasible import check_fits, explain_infeasible
from .plan import Plan, even_plan
from .problem import Infeasible, Problem

__all__ = ["check_fits", "explain_infeasible", "make_plan", "plan_all"]

STRATEGIES = ("edgeshard", "edgeshard-even", "edge-solo", "cloud-edge-even", "cloud-edge-opt")
OBJECTIVES = ("latency", "throughput")
ALGORITHMS = ("exact", "paper")


def make_plan(
    prob: Problem, strategy: str, objective: str = "latency", algorithm: str = "exact"
) -> Plan:
    """One strategy's plan, or Infeasible with the numbers."""
    from .latency import exact_latency, paper_algorithm1
    from .throughput import exact_throughput, paper_algorithm2

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if objective not in OBJECTIVES or algorithm not in ALGORITHMS:
        raise ValueError(f"objective in {OBJECTIVES}, algorithm in {ALGORITHMS}")
    src, cloud, n = prob.source, prob.profile.cloud, prob.n_units
    exact = exact_latency if objective == "latency" else exact_throughput
    if strategy in ("cloud-edge-even", "cloud-edge-opt") and cloud is None:
        raise Infeasible(f"{strategy}: the profile names no cloud device ('cloud' entry)")
    if strategy == "edge-solo":
        return check_fits(Plan(tuple(even_plan(n, [src]).stages), strategy, objective), prob)
    if strategy == "cloud-edge-even":
        return check_fits(even_plan(n, [src, cloud], strategy, objective), prob)
    if strategy == "cloud-edge-opt":
        return exact(prob, [src, cloud], strategy)
    if algorithm == "paper":
        plan = (
            paper_algorithm1(prob, strategy)
            if objective == "latency"
            else paper_algorithm2(prob, strategy)
        )
    else:
        plan = exact(prob, None, strategy)
    if strategy == "edgeshard":
        return plan
    chosen = [st.rank for st in plan.stages]
    if len(chosen) > n - 2:
        raise Infeasible(
            f"{strategy}: EdgeShard uses {len(chosen)} devices, more than the "
            f"{n - 2} layers an even split can share"
        )
    return check_fits(even_plan(n, chosen, strategy, objective), prob)


def plan_all(
    prob: Problem, objective: str = "latency", algorithm: str = "exact"
) -> dict[str, Plan | Infeasible]:
    out: dict[str, Plan | Infeasible] = {}
    for s in STRATEGIES:
        try:
            out[s] = make_plan(prob, s, objective, algorithm)
        except Infeasible as e:
            out[s] = e
    return out
