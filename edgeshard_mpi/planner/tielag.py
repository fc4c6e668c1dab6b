"""A lower bound on the rest of a chain of distinct devices: per device, counted per
cluster, with a Lagrangian price per device.

The label DP of ties.py prunes a label (device set S, last device k, cut e, latency L)
when L plus a lower bound on finishing units [e, n) cannot beat a threshold. This bound
is a DP over (cut, last device, devices left per cluster of similar devices), on the
devices' own stage, hop and return costs: a relaxed chain never repeats its last device
and uses no more devices of a cluster than S leaves, but may come back to a device two
stages later. Each device d's stages are priced lam[d] >= 0 more, and the bound
subtracts the prices of the devices outside S:
    bound(S, k, e) = P[e, k, left(S)] - sum(lam[d] for d not in S).
Valid for every lam >= 0: a real chain uses each device outside S at most once, so its
priced cost minus those prices is at most its cost (Lagrangian relaxation of "each device
at most once"). The prices are chosen by subgradient steps at the root (a device the
relaxed chain uses twice is priced up, one it leaves out priced down): the bound at the
root closes most of its gap to the least latency (20 x 162: 3.33 s -> 3.45 s of 3.467).
Tables: (n + width) x devices x prod(cluster size + 1) floats, clusters as tiebound.py
(coarsened until n x devices x prod(size + 1) <= 1 M).
"""

from __future__ import annotations

import time

import numpy as np

from .tiebound import clusters

INF = np.inf
CHUNK_BITS = 11  # the set-to-index tables: one gather per 11 devices


class DeviceBound:
    # Cells n x max(clusters, devices) x prod(size + 1): each of the subgradient's builds
    # costs devices^2 x prod(size + 1) per cut, so fewer than tiebound.py allows.
    def __init__(self, seg, hop, ret, src: int, limit: float, far, max_states=1_000_000):
        m, n1, _ = seg.shape
        n = n1 - 1
        self.m, self.n, self.src = m, n, src
        unit = seg[:, np.arange(n), np.arange(1, n1)]
        unit = np.where(unit <= limit, unit, INF)
        cl = clusters(far, unit, src, max_states, n1)
        self.ok = bool(cl) and n > 1
        if not self.ok:
            return
        self.sg = np.where(seg <= limit, seg, INF)
        hp = np.where(hop <= limit, hop, INF)
        hp[:, np.arange(m), np.arange(m)] = INF  # a device never follows itself
        hp[:, :, src] = INF  # nor does the source come back
        self.hp = hp
        self.rt = np.where(ret <= limit, ret, INF)
        self.far = far
        size = np.array([len(c) for c in cl])
        radix = np.concatenate([[1], np.cumprod(size + 1)[:-1]]).astype(np.int64)
        R = int(np.prod(size + 1))
        self.R = R
        digits = (np.arange(R)[None, :] // radix[:, None]) % (size[:, None] + 1)  # [C, R]
        self.step = np.zeros(m, dtype=np.int64)  # what taking device d removes from r
        self.valid = np.zeros((m, R), dtype=bool)  # r still holds one of d's cluster
        for c, members in enumerate(cl):
            self.step[members] = radix[c]
            self.valid[members] = digits[c] >= 1
        self.shift = np.where(self.valid, np.arange(R)[None, :] - self.step[:, None], 0)
        self.width = int((far - np.arange(n1)[None, :]).max())
        if self.width < 1:  # no device runs any unit within the limit
            self.ok = False
            return
        self.lam = np.zeros(m)
        # left(S) = R - 1 - sum of step[d] over d in S other than the source: linear in
        # the bits of S, so looked up per chunk of CHUNK_BITS devices.
        step = self.step.copy()
        step[src] = 0
        self.r_tabs = [t.astype(np.int64) for t in _bit_tables(step.astype(np.float64), m)]
        self._tables()

    def _tables(self):
        """P[y, j, r]: the least priced cost after a stage on j ending at y (its hop out
        or the return included), r devices left per cluster; G[x, i, r]: the same from a
        stage on i starting at x (i taken from r)."""
        m, n, R, W = self.m, self.n, self.R, self.width
        n1 = n + 1
        sg = self.sg + self.lam[:, None, None]
        P = np.full((n1 + W, m, R), INF)
        P[n] = self.rt[:, None]
        G = np.full((n1, m, R), INF)
        ii = np.arange(m)[:, None]
        for x in range(n - 1, 0, -1):
            w = min(W, n - x)
            blk = P[x + 1 : x + w + 1][:, ii, self.shift]  # [w, i, r]
            g = (sg[:, x, x + 1 : x + w + 1].T[:, :, None] + blk).min(axis=0)
            g[~self.valid] = INF
            G[x] = g
            P[x] = (self.hp[x][:, :, None] + g[None, :, :]).min(axis=1)
        self.P, self.G = P[:n1], G
        self.lam_tabs = _bit_tables(self.lam, self.m)
        self.lam_total = float(self.lam.sum())

    def root(self):
        """(bound at the start, the source's first cut) for the whole chain."""
        e = np.arange(1, self.far[self.src, 0] + 1)
        if len(e) == 0:
            return INF, 0  # the source cannot run unit 0: no chain
        v = self.sg[self.src, 0, e] + self.P[e, self.src, self.R - 1]
        i = int(np.argmin(v))
        return float(v[i]) - (self.lam_total - self.lam[self.src]), int(e[i])

    def relaxed_uses(self, e0: int) -> np.ndarray:
        """How often the relaxed chain from the root uses each device."""
        sg = self.sg + self.lam[:, None, None]
        k, y, r = self.src, e0, self.R - 1
        uses = np.zeros(self.m)
        uses[self.src] = 1
        while y < self.n:
            i = int(np.argmin(self.hp[y, k] + self.G[y][:, r]))
            r2 = r - self.step[i]
            ys = np.arange(y + 1, min(self.n, y + self.width) + 1)
            y = int(ys[np.argmin(sg[i, y, ys] + self.P[ys, i, r2])])
            uses[i] += 1
            k, r = i, r2
        return uses

    def price(self, upper: float, seconds: float, iters: int = 40) -> float:
        """Subgradient steps on the prices (Polyak's step toward `upper`, a plan's
        latency), keeping the prices of the best root bound. Returns that bound."""
        stop = time.process_time() + seconds
        best, best_lam = self.root()[0], self.lam.copy()
        if not np.isfinite(upper) or not np.isfinite(best):
            return best
        theta = 1.0
        for it in range(iters):
            if time.process_time() > stop:
                break
            v, e0 = self.root()
            if v > best:
                best, best_lam = v, self.lam.copy()
            if not np.isfinite(v):
                break
            g = self.relaxed_uses(e0) - 1.0
            g[self.src] = 0.0
            g[(self.lam <= 0) & (g < 0)] = 0.0
            if not g.any():
                break  # the relaxed chain is a real one: the bound is tight
            self.lam = np.maximum(0.0, self.lam + theta * max(upper - v, 0.0) / (g @ g) * g)
            self._tables()
            if it % 5 == 4:
                theta /= 2
        if not np.array_equal(best_lam, self.lam):
            self.lam = best_lam
            self._tables()
        return best

    def bound(self, S, k, e) -> np.ndarray:
        """A lower bound on the latency of units [e, n) after k's range ends at e (the
        hop out of k included), on devices outside S."""
        r = _lookup(self.r_tabs, S)
        r = self.R - 1 - r
        return self.P[e, k, r] - self.lam_total + _lookup(self.lam_tabs, S)


def _bit_tables(w: np.ndarray, m: int) -> list[np.ndarray]:
    """Per chunk of CHUNK_BITS devices: the sum of w over the chunk's bits, per value."""
    tabs = []
    for lo in range(0, m, CHUNK_BITS):
        bits = min(CHUNK_BITS, m - lo)
        v = np.arange(1 << bits)
        t = np.zeros(1 << bits)
        for b in range(bits):
            t += np.where((v >> b) & 1, w[lo + b], 0.0)
        tabs.append(t)
    return tabs


def _lookup(tabs, S: np.ndarray) -> np.ndarray:
    out = tabs[0][S & ((1 << CHUNK_BITS) - 1)]
    for c, t in enumerate(tabs[1:], start=1):
        out = out + t[(S >> (c * CHUNK_BITS)) & ((1 << CHUNK_BITS) - 1)]
    return out
