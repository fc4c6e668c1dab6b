"""The exact chain DP behind EdgeShard's solvers: every selected device holds one
contiguous range of units within its memory, unit 0 stays on the source.

State: (cut i, device k, mask): units [0, i) are placed and the last range, ending at i, is
on k. Forbidding a device to appear twice would need the set of used devices in the state
(2^M). Instead, decremental state-space relaxation (Righini & Salani, 2008): solve with
repeats allowed, then track in the mask only the devices the best path repeated, and solve
again. The relaxation bounds the true optimum from below, so the first path without a
repeat is optimal. In practice the mask stays empty or tiny.

Objectives: "latency" minimizes the sum (compute + hops + return); "throughput" minimizes
(bottleneck, sum) lexicographically: the max of stages and hops first, the sum among ties
(ties are common with max, and an arbitrary tie-break would invite needless repeats).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from .plan import Plan, Stage
from .problem import Infeasible, PlannerLimit, Problem

INF = np.inf
MEMORY_LIMIT = 2e9  # bytes of DP temporaries the general solver may use


def segment_costs(prob: Problem, devices: list[int]) -> np.ndarray:
    """seg[k, i, j]: seconds of units [i, j) on devices[k]; inf if it cannot run a unit of
    the range or the range exceeds its memory budget."""
    c = prob.compute[devices]  # [D, N]
    bad = ~np.isfinite(c)
    n = prob.n_units
    cp = np.concatenate([np.zeros((len(devices), 1)), np.cumsum(np.where(bad, 0, c), 1)], 1)
    bp = np.concatenate([np.zeros((len(devices), 1)), np.cumsum(bad, 1)], 1)
    mp = np.concatenate([[0.0], np.cumsum(prob.memory)])
    seg = cp[:, None, :] - cp[:, :, None]  # [D, i, j]
    ok = (bp[:, None, :] == bp[:, :, None]) & np.triu(np.ones((n + 1, n + 1), bool), 1)[None]
    mem = mp[None, :] - mp[:, None]  # [i, j]
    ok &= mem[None] <= prob.profile.memory_budget[devices][:, None, None]
    return np.where(ok, seg, INF)


def _relaxed(seg, hop, ret, s0: int, theta: list[int], lexi: bool):
    """One DP pass; devices in theta may not repeat, the others may. Returns the best path
    as [(device, start, end)] in chain order, or None."""
    d, n1 = seg.shape[0], seg.shape[1]
    n = n1 - 1
    nm = 1 << len(theta)
    bit = np.zeros(d, dtype=np.int64)
    for t, dev in enumerate(theta):
        bit[dev] = 1 << t
    masks = np.arange(nm)
    valid = (bit[:, None] & masks[None, :]) == 0  # [k, mask]: k may still be used
    tgt = np.where(valid, masks[None, :] | bit[:, None], nm)  # nm = a trash column
    kk = np.broadcast_to(np.arange(d)[:, None], (d, nm))
    pri = np.full((n1, d, nm + 1), INF)
    sec = np.full((n1, d, nm + 1), INF) if lexi else None
    back = np.full((n1, d, nm + 1, 3), -1, dtype=np.int64)
    m0 = int(bit[s0])
    pri[1:, s0, m0] = seg[s0, 0, 1:]
    if lexi:
        sec[1:, s0, m0] = seg[s0, 0, 1:]
    back[1:, s0, m0] = (0, -1, -1)
    eye = np.eye(d, dtype=bool)
    for i in range(1, n):
        f = pri[i, :, :nm]  # [j, mask]
        if not np.isfinite(f).any():
            continue
        h = hop[i]  # [j, k]
        segs = seg[:, i, i + 1 :]  # [k, L]
        if lexi:
            base_p = np.maximum(f[:, None, :], h[:, :, None])  # [j, k, mask]
            base_p = np.where(eye[:, :, None] | ~valid[None], INF, base_p)
            base_s = sec[i, :, None, :nm] + h[:, :, None]
            cand_p = np.maximum(base_p[..., None], segs[None, :, None, :])  # [j, k, mask, L]
            cand_s = base_s[..., None] + segs[None, :, None, :]
            best_p = cand_p.min(axis=0)  # [k, mask, L]
            cs = np.where(cand_p == best_p[None], cand_s, INF)
            jbest = cs.argmin(axis=0)  # [k, mask, L]
            best_s = np.take_along_axis(cs, jbest[None], 0)[0]
            cur_p = np.moveaxis(pri[i + 1 :][:, kk, tgt], 0, -1)  # [k, mask, L]
            cur_s = np.moveaxis(sec[i + 1 :][:, kk, tgt], 0, -1)
            better = (best_p < cur_p) | ((best_p == cur_p) & (best_s < cur_s))
            new_p, new_s = np.where(better, best_p, cur_p), np.where(better, best_s, cur_s)
            sec[i + 1 :, kk, tgt] = np.moveaxis(new_s, -1, 0)
        else:
            base = f[:, None, :] + h[:, :, None]  # [j, k, mask]
            base = np.where(eye[:, :, None] | ~valid[None], INF, base)
            jb = base.argmin(axis=0)  # [k, mask]
            bp = np.take_along_axis(base, jb[None], 0)[0]
            best_p = bp[:, :, None] + segs[:, None, :]  # [k, mask, L]
            jbest = np.broadcast_to(jb[:, :, None], best_p.shape)
            cur_p = np.moveaxis(pri[i + 1 :][:, kk, tgt], 0, -1)
            better = best_p < cur_p
            new_p = np.where(better, best_p, cur_p)
        pri[i + 1 :, kk, tgt] = np.moveaxis(new_p, -1, 0)
        # Back pointers of the improved entries: (previous cut, device, mask).
        ks, ms, ls = np.nonzero(better & valid[:, :, None])
        back[i + 1 + ls, ks, tgt[ks, ms]] = np.stack(
            [np.full(len(ks), i), jbest[ks, ms, ls], ms], axis=1
        )
    final_p = pri[n, :, :nm]
    if lexi:
        fp = np.maximum(final_p, ret[:, None])
        fs = sec[n, :, :nm] + ret[:, None]
        if not np.isfinite(fp).any():
            return None
        fs = np.where(fp == fp.min(), fs, INF)
        k, m = np.unravel_index(np.argmin(fs), fs.shape)
    else:
        fp = final_p + ret[:, None]
        if not np.isfinite(fp).any():
            return None
        k, m = np.unravel_index(np.argmin(fp), fp.shape)
    path, end = [], n
    k, m = int(k), int(m)
    while k >= 0:
        i, j, pm = back[end, k, m]
        path.append((k, int(i), end))
        end, k, m = int(i), int(j), int(pm)
    return path[::-1]


def solve_chain(
    prob: Problem,
    objective: str,
    devices: list[int] | None = None,
    strategy: str = "edgeshard",
    method: str = "auto",
) -> Plan:
    """The optimal plan over `devices` (default: all) for 'latency' or 'throughput'.

    method: 'uniform' (alike decoder layers: Held-Karp over device sets, uniform.py),
    'general' (any per-unit costs: the relaxation below), or 'auto' (uniform when it
    applies)."""
    from .uniform import solve_uniform, uniform_structure

    u = uniform_structure(prob) if method in ("auto", "uniform") else None
    if method == "uniform" and u is None:
        raise ValueError("the problem's decoder layers are not alike; use method='general'")
    if u is not None:
        plan = solve_uniform(prob, objective, devices, strategy, u)
        if plan is None:
            from .baselines import explain_infeasible

            all_dev = sorted(
                set(range(prob.n_devices) if devices is None else devices) | {prob.source}
            )
            raise Infeasible(explain_infeasible(prob, all_dev, strategy))
        return plan
    return _solve_general(prob, objective, devices, strategy)


def _solve_general(prob: Problem, objective: str, devices: list[int] | None, strategy: str) -> Plan:
    t0 = time.perf_counter()
    src = prob.source
    devices = sorted(set(range(prob.n_devices) if devices is None else devices) | {src})
    seg = segment_costs(prob, devices)
    idx = np.asarray(devices)
    hop = prob.hop_matrix()[:, idx][:, :, idx]
    ret = prob.return_s()[idx]
    s0 = devices.index(src)
    theta: list[int] = []
    passes = 0
    while True:
        passes += 1
        path = _relaxed(seg, hop, ret, s0, theta, objective == "throughput")
        if path is None:
            from .baselines import explain_infeasible

            raise Infeasible(explain_infeasible(prob, devices, strategy))
        repeated = [dev for dev, c in Counter(p[0] for p in path).items() if c > 1]
        if not repeated:
            break
        theta += repeated
        d, n1 = seg.shape[0], seg.shape[1]
        need = 8 * d * d * (1 << len(theta)) * n1 * (4 if objective == "throughput" else 1)
        if need > MEMORY_LIMIT:
            raise PlannerLimit(
                f"the general exact solver would need {need / 1e9:.0f} GB for this "
                f"profile ({len(devices)} devices, {len(theta)} tracked); it is meant for "
                "profiles whose decoder layers differ, and alike layers take the fast path"
            )
    stages = tuple(Stage(int(devices[k]), a, b) for k, a, b in path)
    return Plan(
        stages,
        strategy,
        objective,
        {
            "algorithm": "exact-dp",
            "passes": passes,
            "tracked_devices": len(theta),
            "solve_s": time.perf_counter() - t0,
        },
    )
