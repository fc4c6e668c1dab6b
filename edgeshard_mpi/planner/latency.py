"""Latency objective: the paper's Algorithm 1 as published, and the exact solver.

Algorithm 1 (EdgeShard, Sec. IV): DP(i, j) = min_k DP(i-1, k) + t_comp(i, j) + t_comm(i-1,
k, j), one unit at a time, with layer 0 forced onto the source and the token's return added
at the end. As published it lets a device recur (A -> B -> A) and tracks memory greedily:
each state keeps the remaining memory of the single path that reached it, so a cheaper
prefix that used up a device's memory can hide a feasible better plan. Kept for fidelity
and comparison; `exact_latency` is the solver to use.
"""

from __future__ import annotations

import time

import numpy as np

from .chain import solve_chain
from .plan import Plan
from .problem import Infeasible, PlannerLimit, Problem


def paper_algorithm1(
    prob: Problem, strategy: str = "edgeshard", devices: list[int] | None = None
) -> Plan:
    """Algorithm 1 over `devices` (default: all; the source always)."""
    t0 = time.perf_counter()
    c, mem, budget = prob.compute, prob.memory, prob.profile.memory_budget
    if devices is not None:  # the others cannot run anything
        allowed = np.zeros(prob.n_devices, dtype=bool)
        allowed[sorted(set(devices) | {prob.source})] = True
        c = np.where(allowed[:, None], c, np.inf)
    m, n, s = prob.n_devices, prob.n_units, prob.source
    need = 8.0 * n * m * m * 2  # the memory-left table and the hops
    if need > 1e9:
        raise PlannerLimit(
            f"paper Algorithm 1 over {m} devices x {n} units would need {need / 1e9:.1f} GB; "
            "use --algorithm exact"
        )
    hop = prob.hop_matrix()  # hop[i, k, j]: output of unit i-1 from k to j (0 if k == j)
    dp = np.full((n, m), np.inf)
    pred = np.full((n, m), -1)
    left = np.zeros((n, m, m))  # remaining memory of every device along the kept path
    if mem[0] <= budget[s]:
        dp[0, s] = c[s, 0]
        left[0, s] = budget
        left[0, s, s] -= mem[0]
    extra = prob.source_layers_wake_s()  # a source stage past the embedding (problem.py)
    for i in range(1, n):
        for j in range(m):
            if not np.isfinite(c[j, i]):
                continue
            val = dp[i - 1] + c[j, i] + hop[i, :, j]
            if i == 1 and j == s:
                val[s] += extra
            val[left[i - 1, :, j] < mem[i]] = np.inf
            k = int(np.argmin(val))
            if np.isfinite(val[k]):
                dp[i, j], pred[i, j] = val[k], k
                left[i, j] = left[i - 1, k]
                left[i, j, j] -= mem[i]
    final = dp[n - 1] + prob.return_s()
    # The source alone pays no `extra` (return_s charges its own wake-up), but its path
    # above did at unit 1: price that one plan apart.
    alone = float(c[s].sum() + prob.return_s()[s]) if mem.sum() <= budget[s] else np.inf
    if extra > 0 and alone < final.min():
        owner = [s] * n
        return Plan.from_assignment(
            owner,
            strategy=strategy,
            objective="latency",
            info={"algorithm": "paper-algorithm-1", "solve_s": time.perf_counter() - t0},
        )
    j = int(np.argmin(final))
    if not np.isfinite(final[j]):
        from .infeasible import explain_infeasible

        raise Infeasible(
            explain_infeasible(prob, list(range(m)), strategy) + " (paper Algorithm 1)"
        )
    owner = [0] * n
    for i in range(n - 1, -1, -1):
        owner[i] = j
        j = int(pred[i, j])
    return Plan.from_assignment(
        owner,
        strategy=strategy,
        objective="latency",
        info={"algorithm": "paper-algorithm-1", "solve_s": time.perf_counter() - t0},
    )


def exact_latency(
    prob: Problem, devices: list[int] | None = None, strategy: str = "edgeshard"
) -> Plan:
    return solve_chain(prob, "latency", devices, strategy)
