"""The exact solvers, both objectives, at scale; a labelled heuristic past their reach.

A plan is a chain of stages, each a contiguous range of units on a distinct device, unit 0
on the source. Alike devices are counted per type (devtypes.py); distinct devices are
types of count 1.

Latency: a chain DP over (cut, type) in which a type may be used more often than it has
devices: a relaxation, polynomial (N^2 T^2 cells). Then decremental state-space
relaxation (Righini & Salani, 2008): the types the best path over-uses get their use
counted in the state (mixed radix, prod(count + 1) states) and the DP runs again. Each
pass bounds the optimum from below, so the first path within the counts is optimal.
Where the tracked counts outgrow the budget over distinct devices (few enough for subset
tables, about 22), the label DP of ties.py with no bottleneck limit finishes, exactly.

Throughput: binary search over the finite set of candidate bottlenecks (every stage's
seconds, every hop, every return). A probe at T asks whether a chain keeps every stage,
hop and return within T: over distinct devices the furthest-reach DP (reach.py), else (or
where reach's "no" is not a proof) the latency DP above within T. At the optimum, ties go
to the least latency: over distinct devices the label DP of ties.py (exact, within its own
CPU and memory budget), over types the latency DP within the optimal bottleneck; when that
does not fit, info['tie_break_exact'] is False (the plan is bottleneck-optimal, its latency
not proven least).

Before every pass the solver estimates its memory and time. Past the budget it stops
being exact and answers with the best plan a bounded search finds: the same DP with
transitions only forward in a fixed order of types (a chain that cannot repeat a device),
over a few orders; labelled heuristic, with the relaxation's lower bound and the gap.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from .dp import (
    INF,
    MEMORY_BUDGET,
    TIME_BUDGET,
    Instance,
    Outcome,
    Solver,
    build,
    dp_pass,
    instance_bytes,
    to_plan,
)
from .infeasible import explain_infeasible
from .plan import Plan
from .problem import Infeasible, PlannerLimit, Problem

TIE_BUDGET = 0.5  # estimated seconds the latency tie-break at the optimum may add
# CPU seconds and bytes the label DP of the tie-break may take. Past 16 distinct devices
# less memory (the bottleneck search holds its own); the time is the same: 20 x 82 needs
# 0.6 CPU s on a quiet host and up to 1.8 s at load 30 (CPU time grows with contention).
TIE_SECONDS = {16: 3.0, None: 3.0}
TIE_MEMORY = {16: 6e8, None: 2e8}
# CPU seconds of swaps that improve the seed plan: the label DP's thresholds now rise from
# its bound, so the seed is only its last threshold (and the answer past the budget).
TIE_IMPROVE_S = 0.15
# The latency objective past the chain DP's budget, over distinct devices: the tie-break's
# label DP with no bottleneck limit (CPU seconds, bytes), exact where it ends in time.
LATENCY_LABEL_SECONDS = 6.0
LATENCY_LABEL_MEMORY = 6e8
TIE_REL = 1e-9  # bottlenecks within this relative gap are ties (then: least latency)


# -- solving ----------------------------------------------------------------------------


def solve(
    prob: Problem,
    objective: str,
    devices: list[int] | None = None,
    strategy: str = "edgeshard",
    collapse: bool = True,
    memory_budget: float = MEMORY_BUDGET,
    time_budget: float = TIME_BUDGET,
) -> Plan:
    """The optimal plan for 'latency' or 'throughput' (throughput ties: least latency), or,
    past the budget, the best plan found, with info['exact'] False, a lower bound and the
    gap. Raises Infeasible when no plan fits, PlannerLimit when not even the costs fit."""
    t0 = time.perf_counter()
    all_dev = sorted(set(range(prob.n_devices) if devices is None else devices) | {prob.source})
    if objective == "latency":
        plan = _alike_layers_latency(prob, all_dev, strategy, memory_budget)
        if plan is not None:
            return plan
    inst = build(prob, all_dev, collapse)
    sv = Solver(inst, memory_budget, time_budget)
    if objective == "latency":
        out = sv.exact(None)
        if not out.exact:
            heur = sv.ordered(None)
            out = Outcome(heur.value, heur.path, False, out.lower_bound, sv.passes)
            out = _latency_labels(sv, out)
        bound = out.lower_bound
    elif objective == "throughput":
        out, bound = _throughput(sv)
    else:
        raise ValueError(f"objective must be latency or throughput, got {objective!r}")
    if out.path is None:
        if out.exact:
            raise Infeasible(explain_infeasible(prob, all_dev, strategy))
        raise PlannerLimit(
            f"{strategy}: no plan found within the planner's budget ({len(inst.counts)} device "
            f"types x {inst.n} units); the lower bound is {bound * 1e3:.1f} ms"
        )
    info = {
        "algorithm": (
            ("exact-label-dp" if getattr(sv, "label_dp", False) else "exact-dp")
            if out.exact
            else "heuristic-ordered"
        ),
        "exact": bool(out.exact),
        "passes": sv.passes,
        "tracked_types": len(sv.tracked),
        "reach_probes": sv.reach_probes,
        "tie_break_exact": bool(sv.tie_break_exact),
        "types": len(inst.counts),
        "devices": len(all_dev),
        "estimated_peak_bytes": float(sv.peak_estimate + instance_bytes(len(inst.counts), inst.n)),
        "solve_s": time.perf_counter() - t0,
    }
    plan = to_plan(prob, inst, out.path, objective, strategy, info)
    if not out.exact:
        from .cost import evaluate

        ev = evaluate(plan, prob)
        got = ev.latency_s if objective == "latency" else ev.bottleneck_s
        info["lower_bound_s"] = float(bound)
        info["gap"] = float(got / bound - 1) if bound > 0 else None
    return plan


def _latency_labels(sv: Solver, out: Outcome) -> Outcome:
    """Where the chain DP stopped short (its tracked types outgrew the budget): over
    distinct devices, few enough for the label DP's subset tables, the least latency by
    the label DP of ties.py with no bottleneck limit (the stage, hop and return costs
    are the same arrays, so memory budgets, units a device cannot run and unit 0 on the
    source are honoured as there). Its answer is exact; past its own budget `out` stays."""
    from . import reach
    from .ties import improve_order, least_latency

    inst = sv.inst
    m = len(inst.counts)
    mem, secs = reach.probe_cost(m)
    if not np.all(inst.counts == 1) or mem > sv.memory_budget or secs >= 30:
        return out
    limit = float(np.finfo(float).max)  # every finite cost (inf: cannot) is within it
    deadline = time.process_time() + LATENCY_LABEL_SECONDS
    upper, start = INF, None
    if out.path is not None:
        upper, start = improve_order(inst.seg, inst.hop, inst.ret, out.path, limit, TIE_IMPROVE_S)
        if start is None:  # (cannot happen: the heuristic's order fits) keep its plan
            upper, start = _path_latency(inst, out.path), out.path
    got = least_latency(
        inst.seg,
        inst.hop,
        inst.ret,
        inst.src,
        limit,
        upper,
        min(sv.memory_budget, LATENCY_LABEL_MEMORY),
        deadline,
    )
    if got is None:
        return out
    value, path = got if got[1] is not None else (upper, start)
    sv.label_dp = True
    return Outcome(value, path, True, value, sv.passes)


def _alike_layers_latency(prob: Problem, devices, strategy: str, memory_budget: float):
    """When every decoder layer is alike (Llama profiles), latency has an exact fast path:
    Held-Karp over device subsets orders the devices, a closed form allocates the layers
    (uniform.py). Used when its 2^M tables fit the budget; None otherwise."""
    from .uniform import solve_uniform, uniform_structure

    m = len(devices)
    if m > 22 or (1 << m) * m * 40.0 > memory_budget:
        return None
    u = uniform_structure(prob)
    if u is None:
        return None
    plan = solve_uniform(prob, devices, strategy, u)
    if plan is None:
        raise Infeasible(explain_infeasible(prob, devices, strategy))
    plan.info.update(exact=True, devices=m)
    return plan


def _candidates(inst: Instance) -> np.ndarray:
    vals = [inst.seg[np.isfinite(inst.seg)], inst.hop[np.isfinite(inst.hop)], inst.ret]
    c = np.unique(np.concatenate(vals))
    return c[np.isfinite(c)]


def _path_bottleneck(inst: Instance, path) -> float:
    vals = [inst.seg[u, a, b] for u, a, b in path]
    vals += [inst.hop[b, u, v] for (u, _, b), (v, _, _) in itertools.pairwise(path)]
    return float(max([*vals, inst.ret[path[-1][0]]]))


def _path_latency(inst: Instance, path) -> float:
    vals = [inst.seg[u, a, b] for u, a, b in path]
    vals += [inst.hop[b, u, v] for (u, _, b), (v, _, _) in itertools.pairwise(path)]
    return float(sum(vals) + inst.ret[path[-1][0]])


def _capacity_bound(inst: Instance, cands: np.ndarray) -> int:
    """The least candidate index at which every unit has a type that can run it within
    the candidate and the types' longest ranges, times their counts, cover all units: a
    necessary condition (a lower bound on the bottleneck)."""
    n = inst.n
    diag = inst.seg[:, np.arange(n), np.arange(1, n + 1)]  # [T, N] each unit alone
    ii = np.arange(n + 1)
    length = np.where(ii[None, :] > ii[:, None], ii[None, :] - ii[:, None], 0)  # [i, j]

    def ok(k: int) -> bool:
        lim = cands[k] * (1 + TIE_REL)
        if not (diag <= lim).any(axis=0).all():
            return False
        longest = np.where(inst.seg <= lim, length[None], 0).max(axis=(1, 2))
        return int((longest * inst.counts).sum()) >= n

    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _throughput(sv: Solver) -> tuple[Outcome, float]:
    """Binary search on the bottleneck. A probe asks the furthest-reach DP (reach.py) when
    the devices are distinct and few enough, and the latency DP within the bottleneck
    otherwise, or when reach's "no" is not a proof. The final probe, at the optimum,
    is the latency DP: among bottleneck-optimal plans the least latency. Returns the
    outcome and a lower bound on the bottleneck."""
    from . import reach
    from .ties import order_cuts

    inst = sv.inst
    cands = _candidates(inst)
    if len(cands) == 0:
        return Outcome(INF, None, True, INF, sv.passes), INF
    m = len(inst.counts)
    mem, secs = reach.probe_cost(m)
    use_reach = bool(np.all(inst.counts == 1)) and mem <= sv.memory_budget and secs < 30
    sv.reach_probes = 0
    zero_hop = np.where(np.isfinite(inst.hop), 0.0, INF)
    zero_ret = np.zeros_like(inst.ret)

    def feasible(k: int):
        lim = cands[k] * (1 + TIE_REL)
        if use_reach:
            complete = reach.complete_at(inst.seg <= lim, inst.hop, inst.ret, inst.src, lim)
            if not complete:
                # Without the links (every hop and return free) the probe is complete:
                # a "no" there is a proof (time and memory alone do not fit).
                sv.reach_probes += 1
                if reach.probe(inst.seg, zero_hop, zero_ret, inst.src, lim) is None:
                    return "no", None
            sv.reach_probes += 1
            path = reach.probe(inst.seg, inst.hop, inst.ret, inst.src, lim)
            if path is not None:
                # The probe's cuts are greedy (furthest reach): re-cut its order for the
                # least bottleneck, which often lowers the search's upper end a lot.
                order = [d for d, _, _ in path]
                _, cut = order_cuts(inst.seg, inst.hop, inst.ret, order, lim, bottleneck=True)
                return "yes", cut if cut is not None else path
            if complete:
                return "no", None
        out = sv.exact(lim)
        if out.path is not None:
            return "yes", out.path
        if out.exact:
            return "no", None
        heur = sv.ordered(lim)
        return ("yes", heur.path) if heur.path is not None else ("unknown", None)

    # A cheap lower bound first (every unit runnable, and the longest range each device
    # can take within T adds up to all units), then gallop up from it: the probes near
    # the optimum are the costly ones, and the optimum is usually close to the bound.
    lo = _capacity_bound(inst, cands)
    max_no, no_exact, best, hi = lo - 1, True, None, len(cands) - 1
    step = 1
    while best is None:
        k = min(lo + step - 1, len(cands) - 1)
        status, path = feasible(k)
        if status == "yes":
            best, hi = path, k
        else:
            if status == "no":
                max_no = max(max_no, k)
            no_exact = no_exact and status == "no"
            if k == len(cands) - 1:
                return Outcome(INF, None, no_exact, INF, sv.passes), INF
            lo, step = k + 1, step * 4
    hi = min(hi, int(np.searchsorted(cands, _path_bottleneck(inst, best) * (1 - TIE_REL))))
    while lo < hi:
        mid = (lo + hi) // 2
        status, path = feasible(mid)
        if status == "yes":
            best = path
            b = _path_bottleneck(inst, path)
            hi = min(mid, int(np.searchsorted(cands, b * (1 - TIE_REL))))
        else:
            if status == "no":
                max_no = max(max_no, mid)
            no_exact = no_exact and status == "no"
            lo = mid + 1
    if not no_exact:
        # A lower bound: no plan below the least candidate at which the relaxation (a
        # device may recur) is feasible, nor at a proven "no".
        lo2, hi2 = max_no + 1, hi
        while lo2 < hi2:
            mid = (lo2 + hi2) // 2
            if dp_pass(inst, cands[mid] * (1 + TIE_REL), [])[1] is not None:
                hi2 = mid
            else:
                lo2 = mid + 1
        max_no = lo2 - 1
    bound = float(cands[max_no + 1]) if max_no + 1 < len(cands) else INF
    # Ties: the least latency within the optimal bottleneck. Distinct devices: the label
    # DP over device sets (ties.py); types (or past its budget): the latency DP, exact.
    lim = cands[hi] * (1 + TIE_REL)
    path, tie_exact = best, False
    if use_reach:
        from .ties import improve_order, least_latency

        size = 16 if m <= 16 else None
        deadline = time.process_time() + TIE_SECONDS[size]
        upper, start = improve_order(inst.seg, inst.hop, inst.ret, best, lim, TIE_IMPROVE_S)
        if start is None:  # (cannot happen: the order of `best` fits) keep the probe's plan
            upper, start = _path_latency(inst, best), best
        got = least_latency(
            inst.seg,
            inst.hop,
            inst.ret,
            inst.src,
            lim,
            upper,
            min(sv.memory_budget, TIE_MEMORY[size]),
            deadline,
        )
        path = start
        if got is not None:
            tie_exact, path = True, got[1] if got[1] is not None else start
    if not tie_exact and not use_reach:  # types: the latency DP (distinct: it cannot do better)
        budget, sv.time_budget = sv.time_budget, min(sv.time_budget, sv.spent + TIE_BUDGET)
        out = sv.exact(lim)
        sv.time_budget = budget
        tie_exact = out.exact and out.path is not None
        path = out.path if tie_exact else best
    sv.tie_break_exact = tie_exact
    # Exact when every "no" was proven, or when the proven bound meets the plan.
    exact = no_exact or _path_bottleneck(inst, path) <= bound * (1 + TIE_REL)
    return Outcome(_path_latency(inst, path), path, exact, bound, sv.passes), (
        float(cands[hi]) if exact else bound
    )
