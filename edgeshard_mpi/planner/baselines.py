"""Strategies, named as in the paper: each one a plan (or Infeasible with the numbers).

edge-solo        the whole model on the source device;
cloud-edge-even  the layers split evenly between the source and the cloud server;
cloud-edge-opt   the optimal split between the source and the cloud (the DP restricted to
                 those two devices);
edgeshard-even   the devices EdgeShard selects, in its order, with the layers split evenly;
edgeshard        the joint device selection and partition DP.
"""

from __future__ import annotations

import numpy as np

from .infeasible import check_fits, explain_infeasible
from .plan import Plan, Stage, even_plan
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
    if algorithm == "paper":
        alg = paper_algorithm1 if objective == "latency" else paper_algorithm2
        if strategy == "cloud-edge-opt":  # the paper's DP over the source and the cloud
            sub, keep = _sub_problem(prob, [src, cloud])
            plan = alg(sub, strategy)
            plan = Plan(
                tuple(Stage(keep[st.rank], st.start, st.end) for st in plan.stages),
                strategy,
                objective,
                plan.info,
            )
            _refuse_recurring(plan, prob)
            return plan
        plan = alg(prob, strategy)
        _refuse_recurring(plan, prob)
    elif strategy == "cloud-edge-opt":
        return exact(prob, [src, cloud], strategy)
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


def _sub_problem(prob: Problem, devices: list[int]) -> tuple[Problem, list[int]]:
    """The problem over `devices` alone (the source first), and new index -> old."""
    from dataclasses import replace

    from .problem import make_problem

    keep = sorted(set(devices), key=lambda d: d != prob.source)
    p, ix = prob.profile, np.asarray(keep)
    sub = replace(
        p,
        names=tuple(p.names[d] for d in keep),
        memory_budget=p.memory_budget[ix],
        prefill_s=p.prefill_s[:, ix],
        decode_s=p.decode_s[:, ix],
        latency_s=p.latency_s[np.ix_(ix, ix)],
        bandwidth=p.bandwidth[np.ix_(ix, ix)],
        source=0,
        cloud=keep.index(p.cloud) if p.cloud in keep else None,
        meta=p.meta_for(keep),
    )
    return make_problem(sub, prob.batch, prob.strategy, prob.slots), keep


def _refuse_recurring(plan: Plan, prob: Problem) -> None:
    """Algorithm 1 may give one device two stages (A -> B -> A), legal in the paper's
    formulation (eqs. 2-6); the runtime gives each rank one stage, so such a plan is
    refused here, with the plan, rather than run wrongly."""
    seen = [st.rank for st in plan.stages]
    again = [r for r in dict.fromkeys(seen) if seen.count(r) > 1]
    if again:
        names = ", ".join(prob.profile.names[r] for r in again)
        raise Infeasible(
            f"{plan.strategy}: paper Algorithm 1 gives {names} more than one stage "
            f"({plan.describe()}); the runtime runs one stage per rank: use algorithm "
            "'exact' (its chains never repeat a device)"
        )


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
