"""Throughput objective: the paper's Algorithm 2 as published, and the fast exact solver.

Algorithm 2 (EdgeShard, Sec. IV): g(i, S, k) = the least bottleneck (slowest stage or link)
with the first i units placed on the device set S, the last range on k; a new range
[i, m) goes on a device j not in S within its memory:
    g(m, S + {j}, j) = min(g, max(g(i, S, k), t_comm(i, k, j), sum t_comp(i..m-1, j))).
O(N^2 2^M M^2) time and O(N 2^M M) memory: it finishes for up to ~12 devices here.
`exact_throughput` returns the same optimum far faster (chain.py).
"""

from __future__ import annotations

import time

import numpy as np

from .chain import segment_costs, solve_chain
from .plan import Plan, Stage
from .problem import Infeasible, PlannerLimit, Problem


def paper_algorithm2(
    prob: Problem,
    strategy: str = "edgeshard",
    max_devices: int = 15,
    deadline_s: float | None = None,
    devices: list[int] | None = None,
) -> Plan:
    """Algorithm 2 over `devices` (default: all; the source always)."""
    t0 = time.perf_counter()
    m, n, s0 = prob.n_devices, prob.n_units, prob.source
    allowed = sorted(set(range(m) if devices is None else devices) | {s0})
    if m > max_devices:
        raise PlannerLimit(
            f"paper Algorithm 2 over {m} devices needs 2^{m} device subsets; limit is {max_devices}"
        )
    need = (n + 1) * (1 << m) * m * 32.0  # g and its back pointers
    if need > 1e9:
        raise PlannerLimit(
            f"paper Algorithm 2 over {m} devices x {n} units would need {need / 1e9:.1f} GB "
            "(2^M device subsets per unit); use --algorithm exact"
        )
    full = 1 << m
    seg = segment_costs(prob, list(range(m)))
    seg[[d for d in range(m) if d not in allowed]] = np.inf
    hop, ret = prob.hop_matrix(), prob.return_s()
    g = np.full((n + 1, full, m), np.inf)
    back = np.full((n + 1, full, m, 3), -1, dtype=np.int64)  # previous (i, S, k)
    g[1:, 1 << s0, s0] = seg[s0, 0, 1:]
    subsets = np.arange(full)
    for i in range(1, n):
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            raise PlannerLimit(f"paper Algorithm 2 passed its {deadline_s:.0f} s deadline")
        for k in range(m):
            col = g[i, :, k]
            live = np.isfinite(col)
            if not live.any():
                continue
            sl, vals = subsets[live], col[live]
            for j in range(m):
                free = ((sl >> j) & 1) == 0
                if j == k or not free.any():
                    continue
                s_from, base = sl[free], np.maximum(vals[free], hop[i, k, j])
                cand = np.maximum(base[:, None], seg[j, i, i + 1 :][None, :])  # [S, L]
                t = s_from | (1 << j)
                cur = g[i + 1 :, t, j].T
                better = cand < cur
                g[i + 1 :, t, j] = np.where(better, cand, cur).T
                rows, ls = np.nonzero(better)
                back[i + 1 + ls, t[rows], j] = np.stack(
                    [np.full(len(rows), i), s_from[rows], np.full(len(rows), k)], 1
                )
    final = np.maximum(g[n], ret[None, :])
    if not np.isfinite(final).any():
        from .infeasible import explain_infeasible

        raise Infeasible(
            explain_infeasible(prob, list(range(m)), strategy) + " (paper Algorithm 2)"
        )
    sset, k = np.unravel_index(np.argmin(final), final.shape)
    path, end, sset, k = [], n, int(sset), int(k)
    while k >= 0:
        i, ps, pk = back[end, sset, k]
        path.append(Stage(k, int(i) if i >= 0 else 0, end))
        if i < 0:
            break
        end, sset, k = int(i), int(ps), int(pk)
    return Plan(
        tuple(path[::-1]),
        strategy,
        "throughput",
        {"algorithm": "paper-algorithm-2", "solve_s": time.perf_counter() - t0},
    )


def exact_throughput(
    prob: Problem, devices: list[int] | None = None, strategy: str = "edgeshard"
) -> Plan:
    return solve_chain(prob, "throughput", devices, strategy)
