"""A lower bound on the rest of a chain of distinct devices that counts the devices left.

The label DP of ties.py prunes a label (device set S, last device k, cut e, latency L) when
L plus a lower bound on finishing units [e, n) cannot beat a known plan. Letting devices
recur makes that bound weak: the fastest device (the cloud) is used again and again, so
it misses most hops. Here the devices other than the source are grouped into clusters of
similar ones (same longest range, same runnable units, similar speed) and a DP over
(cut, cluster, devices left per cluster) runs on each cluster's best member per range:
  segc[c, x, y] = min over members of seg; hops: min over distinct member pairs;
  return: min over members.
Any chain from (S, k, e) on devices outside S maps to a cluster chain that uses no more
devices of a cluster than S leaves, each cost at least its cluster's: a lower bound, and
a tight one when the members are alike (the count forces as many stages and hops as a
real chain needs). Costs are first reduced: a potential per device for its hop in and
one for its hop out are moved into its stages (any potentials leave every chain's latency
unchanged), so that each member's own links count in its cluster's minimum. When the hops
are alike at every cut (one activation width) the potentials are the assignment
problem's duals over the cycle source -> ... -> last -> (return) source (the Hungarian
method, 20 x 20 here), else the least hop into, then out of, each device.
Tables: n x devices x prod(size + 1) floats; the clusters are coarsened until that fits.
"""

from __future__ import annotations

import numpy as np

INF = np.inf


def clusters(far, unit_s, src: int, max_states: int, n1: int) -> list[list[int]]:
    """Non-source devices grouped: fine keys first (longest range, runnable units, speed
    within 30%), coarser while n1 x max(clusters, m) x prod(size + 1) exceeds max_states
    (the tables' cells); [] when not even one cluster fits."""
    m = far.shape[0]
    x = np.arange(far.shape[1])
    cap = (far - x[None, :]).max(axis=1)
    runs = far > x[None, :]
    speed = np.array(
        [np.median(u[np.isfinite(u)]) if np.isfinite(u).any() else INF for u in unit_s]
    )
    others = [d for d in range(m) if d != src]

    def by(key_of, split_speed: bool):
        groups: dict = {}
        for d in others:
            groups.setdefault(key_of(d), []).append(d)
        out = []
        for g in groups.values():
            if not split_speed:
                out.append(g)
                continue
            g = sorted(g, key=lambda d: speed[d])
            cur = [g[0]]
            for d in g[1:]:
                if speed[d] > speed[cur[0]] * 1.3 or not np.isfinite(speed[d]):
                    out.append(cur)
                    cur = [d]
                else:
                    cur.append(d)
            out.append(cur)
        return out

    tries = [
        by(lambda d: (int(cap[d]), runs[d].tobytes()), True),
        by(lambda d: int(cap[d]), True),
        by(lambda d: 0, True),
        [others] if others else [],
    ]
    for cl in tries:
        states = n1 * max(len(cl), m) * int(np.prod([len(c) + 1 for c in cl]))
        if states <= max_states:
            return cl
    return []


class CountBound:
    """bound(S, k, e): a lower bound on the latency of units [e, n) after k's range ends at
    e (the hop out of k included), on devices outside S (e < n)."""

    def __init__(
        self, seg, hop, ret, src: int, limit: float, far, max_states=4_000_000, assign=True
    ):
        m, n1, _ = seg.shape
        n = n1 - 1
        unit = seg[:, np.arange(n), np.arange(1, n1)]
        unit = np.where(unit <= limit, unit, INF)
        self.cl = clusters(far, unit, src, max_states, n1)
        self.ok = bool(self.cl)
        if not self.ok:
            return
        cl, C = self.cl, len(self.cl)
        size = np.array([len(c) for c in cl])
        radix = np.concatenate([[1], np.cumprod(size + 1)[:-1]]).astype(np.int64)
        R = int(np.prod(size + 1))
        self.size, self.radix, self.R = size, radix, R
        self.masks = np.array([sum(1 << d for d in c) for c in cl], dtype=np.int64)
        sg = np.where(seg <= limit, seg, INF)
        hp = np.where(hop <= limit, hop, INF)
        hp[:, np.arange(m), np.arange(m)] = INF  # a device never follows itself
        rt = np.where(ret <= limit, ret, INF)
        # Reduced costs (exact for any chain): the least hop into each device at each cut
        # is charged to the device's stage, then the least hop (or return) out of it; the
        # cluster minima then keep each device's own link costs.
        sg, hp, rt, self.prepaid = _reduce(sg, hp, rt, src, assign)
        segc = np.stack([sg[c].min(axis=0) for c in cl])  # [C, n1, n1]
        hopc = np.full((n1, C, C), INF)
        hopk = np.full((n1, m, C), INF)
        for b, cb in enumerate(cl):
            hopk[:, :, b] = hp[:, :, cb].min(axis=2)
            for a, ca in enumerate(cl):
                hopc[:, a, b] = hp[:, ca][:, :, cb].min(axis=(1, 2))
        retc = np.array([rt[c].min() for c in cl])
        digits = (np.arange(R)[None, :] // radix[:, None]) % (size[:, None] + 1)  # [C, R]
        ar = np.arange(R)
        # post[y][c, r]: the least cost after a stage on cluster c ends at cut y, with r
        # devices left per cluster once its device is taken (y = n: the return).
        post = np.full((n1, C, R), INF)
        post[n] = retc[:, None]
        hk = np.full((n1, m, R), INF)
        width = [int((far[c] - np.arange(n1)[None, :]).max()) for c in cl]
        for x in range(n - 1, 0, -1):
            g = np.full((C, R), INF)  # g[c, r]: a stage on c starting at x, r left incl. it
            for c in range(C):
                hi = min(n, x + width[c])
                s = segc[c, x, x + 1 : hi + 1]  # [w]
                if not np.isfinite(s).any():
                    continue
                valid = digits[c] >= 1
                src_r = ar[valid] - radix[c]
                g[c, valid] = (s[:, None] + post[x + 1 : hi + 1, c][:, src_r]).min(axis=0)
            post[x] = (hopc[x][:, :, None] + g[None, :, :]).min(axis=1)
            hk[x] = (hopk[x][:, :, None] + g[None, :, :]).min(axis=1)
        self.hk = hk + self.prepaid[:, :, None]  # back to the chain's own latency
        self.m = m

    def index(self, S: np.ndarray) -> np.ndarray:
        """Mixed-radix index of the devices left per cluster, for sets S (int64)."""
        r = np.zeros(len(S), dtype=np.int64)
        for c in range(len(self.cl)):
            used = np.bitwise_count((S & self.masks[c]).astype(np.uint64)).astype(np.int64)
            r += (self.size[c] - used) * self.radix[c]
        return r

    def bound(self, S, k, e) -> np.ndarray:
        return self.hk[e, k, self.index(S)]


def _reduce(sg, hp, rt, src: int, assign: bool = True):
    """Costs with the least hop into and out of each device moved into its stages:
    (seg, hop, ret, prepaid[y, k]) where prepaid is what a stage of k ending at y has
    already paid of what follows it. Every chain keeps its latency; hops stay >= 0."""
    n = sg.shape[1] - 1
    duals = None
    if assign and n > 1 and np.array_equal(hp[1:n], np.broadcast_to(hp[1], hp[1:n].shape)):
        # Hops alike at every cut (layers of one width): the assignment's potentials over
        # the cycle source -> ... -> last -> (return) source, a tighter reduction.
        a = hp[1].copy()
        a[:, src] = rt
        duals = _assignment_duals(a)
    if duals is not None:
        u, v = duals
        into = np.zeros((n + 1, len(rt)))
        into[1:n] = v
        into[:, src] = 0.0
        out = np.zeros((n + 1, len(rt)))
        out[1:n] = u
        out[n] = u + v[src]
        return (
            sg + into.T[:, :, None] + out.T[:, None, :],
            hp - into[:, None, :] - out[:, :, None],
            rt - out[n],
            out,
        )
    into = hp.min(axis=1)  # [x, b]
    into = np.where(np.isfinite(into), into, 0.0)
    into[0] = 0.0
    into[:, src] = 0.0  # the source's stage starts at 0: no hop in
    sg = sg + into.T[:, :, None]
    hp = hp - into[:, None, :]
    out = hp.min(axis=2)  # [y, a]
    out[n] = rt
    out = np.where(np.isfinite(out), np.maximum(out, 0.0), 0.0)
    sg = sg + out.T[:, None, :]
    hp = hp - out[:, :, None]
    rt = rt - out[n]
    return sg, hp, rt, out


def _assignment_duals(a: np.ndarray):
    """Potentials (u, v) with u[i] + v[j] <= a[i, j] whose sum is the least assignment's
    cost (the Hungarian method, O(n^3)); None when an entry needed is infinite."""
    n = a.shape[0]
    big = np.isfinite(a)
    cost = np.where(big, a, 0.0)
    fill = (np.abs(cost).max() + 1.0) * (n + 1)
    cost = np.where(big, a, fill)
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)  # p[j]: the row matched to column j (1-based)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            upd = free & (cur < minv[1:])
            minv[1:][upd] = cur[upd]
            way[1:][upd] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    rows = p[1:] - 1
    if not big[rows, np.arange(n)].all():
        return None  # the assignment needs a forbidden pair: keep the greedy reduction
    return u[1:], v[1:]
