"""The chain DP the exact solvers run (exact.py): an instance's arrays (segment costs per
unit range and device type, hops, returns), one DP pass over (cut, type) with the
over-used types tracked in the state, the pass's memory and time estimate, and the Solver
that runs passes within a budget (exact, or ordered: the bounded heuristic)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .devtypes import Types, device_types
from .plan import Plan, Stage
from .problem import PlannerLimit, Problem

INF = np.inf


MEMORY_BUDGET = 1.0e9  # bytes one solve may hold


TIME_BUDGET = 8.0  # estimated seconds of DP work one solve may spend on exact passes


CELL_S = 3e-8  # seconds per DP cell (numpy, measured on a shared 2-core machine)


CALL_S = 2e-5  # seconds of numpy overhead per cut and pass


@dataclass
class Instance:
    """A Problem over some devices, collapsed into types: the arrays the DP reads."""

    types: Types
    counts: np.ndarray  # [T]
    seg: np.ndarray  # [T, N+1, N+1] seconds of units [i, j) on the type; inf: cannot
    hop: np.ndarray  # [N+1, T, T] seconds after cut i from type a to type b; inf: not allowed
    ret: np.ndarray  # [T] the token's return to the source
    src: int
    n: int


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
    ok &= (mp[None, :] - mp[:, None])[None] <= prob.profile.memory_budget[devices][:, None, None]
    extra = prob.source_layers_wake_s()  # a source stage past the embedding (problem.py)
    if extra > 0 and prob.source in devices:
        seg[list(devices).index(prob.source), 0, 2:n] += extra
    return np.where(ok, seg, INF)


def instance_bytes(n_types: int, n_units: int) -> float:
    """Memory to build an Instance (segment costs and their temporaries, hops)."""
    return 8.0 * n_types * (n_units + 1) ** 2 * 5 + 8.0 * (n_units + 1) * n_types**2 * 2


def build(prob: Problem, devices: list[int] | None = None, collapse: bool = True) -> Instance:
    src = prob.source
    devices = sorted(set(range(prob.n_devices) if devices is None else devices) | {src})
    types = device_types(prob, devices, collapse)
    reps, counts = types.reps, types.counts
    t, n = len(reps), prob.n_units
    need = instance_bytes(t, n)
    if need > MEMORY_BUDGET:
        raise PlannerLimit(
            f"the planner would need {need / 1e9:.1f} GB just for the costs of {t} device "
            f"types x {n} units; plan for fewer devices (or group alike ones into types)"
        )
    p = prob.profile
    # A second device of the type stands in for "another member" on the diagonal.
    second = [m[1] if len(m) > 1 else m[0] for m in types.members]
    lat = p.latency_s[np.ix_(reps, reps)].copy()
    bw = p.bandwidth[np.ix_(reps, reps)].copy()
    idx = np.arange(t)
    lat[idx, idx] = p.latency_s[reps, second]
    bw[idx, idx] = p.bandwidth[reps, second]
    size = prob.w_prefill * prob.act_prefill + prob.w_decode * prob.act_decode  # [N]
    hop = np.full((n + 1, t, t), INF)
    hop[1:] = lat[None] + size[:, None, None] / bw[None]
    hop[:, idx[counts < 2], idx[counts < 2]] = INF  # one device: no hop to itself
    ret = prob.return_s()[reps]
    return Instance(types, counts, segment_costs(prob, reps), hop, ret, types.src, n)


def pass_cost(inst: Instance, tracked: list[int]) -> tuple[float, float]:
    """(bytes, seconds) one pass with `tracked` types counted will take."""
    t, n = len(inst.counts), inst.n
    r = float(np.prod([inst.counts[x] + 1 for x in tracked])) if tracked else 1.0
    states = (n + 1) * t * (r + 1)
    mem = states * 20 + 8 * r * t * (t + 3 * n)
    cells = n * t * t * r + t * r * n * n / 2
    return mem, cells * CELL_S + n * CALL_S * max(t / 8, 1)


def dp_pass(inst: Instance, limit: float | None, tracked: list[int], order=None):
    """Least latency over chains with every stage, hop and return <= limit; tracked types
    used at most `count` times, the others any number of times (the relaxation); with
    `order` (a position per type) only forward transitions, each type at most once.
    Returns (value, [(type, start, end)]) or (inf, None)."""
    n, t = inst.n, len(inst.counts)
    seg, hop, ret = inst.seg, inst.hop, inst.ret
    if limit is not None:
        seg = np.where(seg <= limit, seg, INF)
        hop = np.where(hop <= limit, hop, INF)
        ret = np.where(ret <= limit, ret, INF)
    if order is not None:
        pos = np.asarray(order)
        hop = np.where((pos[None, :, None] < pos[None, None, :]), hop, INF)
    caps = [int(inst.counts[x]) for x in tracked]
    strides = np.cumprod([1] + [c + 1 for c in caps])
    r_all = int(strides[-1])
    rs = np.arange(r_all)
    tgt = np.tile(rs, (t, 1))  # [type, r] -> state after using the type once more
    for x, c, s in zip(tracked, caps, strides[:-1], strict=False):
        used = (rs // s) % (c + 1)
        tgt[x] = np.where(used < c, rs + s, r_all)  # r_all: a trash column
    uu = np.broadcast_to(np.arange(t)[:, None], (t, r_all))
    dp = np.full((n + 1, t, r_all + 1), INF)
    b_cut = np.full((n + 1, t, r_all + 1), -1, dtype=np.int32)
    b_typ = np.full((n + 1, t, r_all + 1), -1, dtype=np.int32)
    b_r = np.zeros((n + 1, t, r_all + 1), dtype=np.int32)
    # Tracked runs: each type's move r -> r + stride is a slice of a reshaped view (no
    # fancy indexing): (block, digit, stride), digits 0..c-1 move to 1..c.
    views = []
    for u in range(t):
        if u in tracked:
            k = tracked.index(u)
            views.append((int(strides[k]), caps[k]))
        else:
            views.append(None)
    r0 = int(tgt[inst.src, 0])
    dp[1:, inst.src, r0] = seg[inst.src, 0, 1:]
    b_cut[1:, inst.src, r0] = 0
    for i in range(1, n):
        f = dp[i, :, :r_all]  # [from type, r]
        if not np.isfinite(f).any():
            continue
        base = f[:, None, :] + hop[i][:, :, None]  # [from, to, r]
        jb = base.argmin(axis=0)  # [to, r]
        bv = np.take_along_axis(base, jb[None], 0)[0]
        if not np.isfinite(bv).any():
            continue
        if tracked and order is None:
            _update_views(dp, b_cut, b_typ, b_r, views, bv, jb, seg, i, r_all)
            continue
        cand = bv[None, :, :] + seg[:, i, i + 1 :].T[:, :, None]  # [L, to, r]
        cur = dp[i + 1 :, uu, tgt]  # [L, to, r]
        better = cand < cur
        if not better.any():
            continue
        dp[i + 1 :, uu, tgt] = np.where(better, cand, cur)
        ls, us, rr = np.nonzero(better)
        keep = tgt[us, rr] < r_all
        ls, us, rr = ls[keep], us[keep], rr[keep]
        e, tg = i + 1 + ls, tgt[us, rr]
        b_cut[e, us, tg] = i
        b_typ[e, us, tg] = jb[us, rr]
        b_r[e, us, tg] = rr
    fin = dp[n, :, :r_all] + ret[:, None]
    if not np.isfinite(fin).any():
        return INF, None
    u, r = np.unravel_index(int(np.argmin(fin)), fin.shape)
    value = float(fin[u, r])
    path, e, u, r = [], n, int(u), int(r)
    while True:
        s = int(b_cut[e, u, r])
        path.append((u, s, e))
        pu, pr = int(b_typ[e, u, r]), int(b_r[e, u, r])
        if pu < 0:
            break
        e, u, r = s, pu, pr
    return value, path[::-1]


def _update_views(dp, b_cut, b_typ, b_r, views, bv, jb, seg, i, r_all) -> None:
    """One cut's relaxation for every target type, through views (see _pass)."""
    n1 = dp.shape[0]
    big = n1 - (i + 1)
    rs = np.arange(r_all)
    for u, v in enumerate(views):
        row = bv[u]
        if not np.isfinite(row).any():
            continue
        cand = row[None, :] + seg[u, i, i + 1 :][:, None]  # [L, r]
        dst, bc, bt, br = (a[i + 1 :, u, :r_all] for a in (dp, b_cut, b_typ, b_r))
        src_j, src_r = jb[u], rs
        if v is not None:
            stride, cap = v
            shape = (big, r_all // (stride * (cap + 1)), cap + 1, stride)
            cand = cand.reshape(shape)[:, :, :cap, :]
            dst, bc, bt, br = (a.reshape(shape)[:, :, 1:, :] for a in (dst, bc, bt, br))
            src_j = src_j.reshape(shape[1:])[:, :cap, :]
            src_r = src_r.reshape(shape[1:])[:, :cap, :]
        better = cand < dst
        if not better.any():
            continue
        np.copyto(dst, cand, where=better)
        np.copyto(bc, i, where=better)
        np.copyto(bt, src_j[None], where=better)
        np.copyto(br, src_r[None], where=better)


def _over_used(inst: Instance, path) -> list[int]:
    uses = Counter(u for u, _, _ in path)
    return sorted(u for u, c in uses.items() if c > inst.counts[u])


@dataclass
class Outcome:
    value: float  # inf: infeasible (proven when exact)
    path: list | None
    exact: bool
    lower_bound: float
    passes: int


class Solver:
    """Solves one Instance; the types the relaxation over-used stay tracked across calls
    (the probes of a binary search share them)."""

    def __init__(self, inst: Instance, memory_budget=MEMORY_BUDGET, time_budget=TIME_BUDGET):
        self.inst = inst
        self.tracked: list[int] = []
        self.memory_budget, self.time_budget = memory_budget, time_budget
        self.spent = 0.0  # estimated seconds of exact passes so far
        self.passes = 0
        self.peak_estimate = 0.0
        self.last_relaxed_path = None
        self.reach_probes = 0
        self.tie_break_exact = True

    def exact(self, limit: float | None) -> Outcome:
        """Least latency within `limit`, exactly, unless the budget runs out first."""
        lb = 0.0  # times are >= 0: a valid bound before any pass
        while True:
            mem, secs = pass_cost(self.inst, self.tracked)
            if mem > self.memory_budget or self.spent + secs > self.time_budget:
                return Outcome(INF, None, False, lb, self.passes)
            self.spent += secs
            self.peak_estimate = max(self.peak_estimate, mem)
            self.passes += 1
            value, path = dp_pass(self.inst, limit, self.tracked)
            if path is None:
                return Outcome(INF, None, True, INF, self.passes)
            lb = value
            over = _over_used(self.inst, path)
            if not over:
                return Outcome(value, path, True, value, self.passes)
            self.last_relaxed_path = path
            self.tracked = sorted(set(self.tracked) | set(over))

    def ordered(self, limit: float | None) -> Outcome:
        """The best chain found with transitions forward in a few fixed orders of types."""
        best = Outcome(INF, None, False, -INF, self.passes)
        for order in self._orders():
            value, path = dp_pass(self.inst, limit, [], order)
            self.passes += 1
            if path is not None and value < best.value:
                best = Outcome(value, path, False, -INF, self.passes)
        return best

    def _orders(self) -> list[list[int]]:
        inst = self.inst
        t = len(inst.counts)
        unit = inst.seg[:, np.arange(inst.n), np.arange(1, inst.n + 1)]  # each unit alone
        speed = np.where(np.isfinite(unit), unit, 0).sum(1) / np.maximum(
            np.isfinite(unit).sum(1), 1
        )
        speed = np.where(np.isfinite(unit).any(1), speed, INF)
        rest = sorted((x for x in range(t) if x != inst.src), key=lambda x: speed[x])
        by_speed = [inst.src, *rest]
        orders = [by_speed]
        if self.last_relaxed_path is not None:
            first = list(dict.fromkeys(u for u, _, _ in self.last_relaxed_path))
            orders.append(first + [x for x in by_speed if x not in first])
        out = []
        for o in orders:
            pos = np.empty(t, dtype=int)
            pos[o] = np.arange(t)
            out.append(pos)
        return out


def to_plan(prob: Problem, inst: Instance, path, objective, strategy, info) -> Plan:
    """Types -> devices: the k-th use of a type goes to its k-th member."""
    used: Counter = Counter()
    stages = []
    for u, s, e in path:
        stages.append(Stage(int(inst.types.members[u][used[u]]), s, e))
        used[u] += 1
    return Plan(tuple(stages), strategy, objective, info)
