"""Throughput ties, exactly: among the plans whose every stage, hop and return is within
the optimal bottleneck, the one of least latency, over distinct devices.

A label DP by number of devices used: a label is (device set S, last device k, cut e,
latency so far), one per (S, k, e), the least. Labels that cannot lead to a plan are
dropped before they are expanded:
- the units left exceed what the devices outside S can hold within the limit (each at
  most its longest feasible range);
- their latency plus a lower bound on the rest is no better than a plan already known.
  The bound is the larger of two: the same DP with devices allowed to recur (per cut and
  last device), and a DP that counts the devices left per cluster of similar devices,
  with a Lagrangian price per device (tielag.py, per cut, last device and counts left).
  The second is what makes 20 distinct devices tractable: letting devices recur, the
  cloud runs range after range and most hops vanish from the bound.
What survives is exact (nothing dropped could beat the answer). The labels are counted
as they are made; past the caller's memory or time budget the search stops and says so
(None), and the caller keeps its plan, labelled as such.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from .reach import _subset_sums
from .tielag import DeviceBound

INF = np.inf
LABEL_BYTES = 40.0  # bytes per label kept (the level's arrays and the path history)
CHUNK_MADE = 1_000_000  # labels a batch may make, at most (transient: ~150 bytes each)
LABEL_S = 1.5e-7  # seconds per label made (numpy, a shared 2-core machine)
# The prices' subgradient: these steps (12: the least time over the bench's ten 20-device
# instances, 6-16 tried), at most this share of the time left and these CPU seconds.
PRICE_ITERS, PRICE_SHARE, PRICE_SECONDS = 12, 0.25, 0.6
UNPRICED_S = 0.05  # CPU seconds the unpriced bound gets before the prices are set
RISES = (0.002, 0.005, 0.01, 0.02)  # thresholds above the root bound, relative


def tail_bound(seg, hop, ret, limit: float) -> np.ndarray:
    """after[e, k]: least latency of units [e, n) after k's range ends at e (the hop out
    of k included), devices allowed to recur: a lower bound for chains of distinct ones."""
    t, n1, _ = seg.shape
    n = n1 - 1
    sg = np.where(seg <= limit, seg, INF)
    hp = np.where(hop <= limit, hop, INF)
    after = np.full((n1, t), INF)
    after[n] = np.where(ret <= limit, ret, INF)
    for e in range(n - 1, 0, -1):
        first = np.min(sg[:, e, e + 1 :] + after[e + 1 :].T, axis=1)  # [j] starting on j at e
        after[e] = np.min(hp[e] + first[None, :], axis=1)
    return after


def least_latency(
    seg, hop, ret, src: int, limit: float, upper: float, memory_budget: float, deadline: float
):
    """The least-latency chain within `limit` as (latency, [(device, start, end)]);
    (upper, None) when none beats `upper`, the latency of a chain known to fit (then that
    chain is the answer); None when the budget ran out first.

    The label DP keeps every label whose latency plus the bound on its rest is below a
    threshold. It meets plans only at its last level, so a loose threshold (the known
    plan's latency) keeps labels a tight one would drop: the thresholds rise from just
    above the bound at the root (DeviceBound, priced) to `upper`; the first pass that
    finds a plan below its threshold has found the least (a plan below the threshold
    keeps every prefix)."""
    n1 = seg.shape[1]
    ok = seg <= limit
    ends = np.where(ok, np.arange(n1)[None, None, :], -1).max(axis=2)
    far = np.where(ends > np.arange(n1)[None, :], ends, np.arange(n1)[None, :])  # [j, x]
    after = tail_bound(seg, hop, ret, limit)
    dev = DeviceBound(seg, hop, ret, src, limit, far)

    def rising(root: float, stop: float, rises=RISES):
        """The passes at rising thresholds, each within `stop` (CPU time)."""
        if not np.isfinite(upper) or not np.isfinite(root) or root <= 0:
            return _labels(seg, hop, ret, src, limit, upper, memory_budget, stop, far, after, dev)
        for rise in rises:
            cap = root * (1 + rise)
            if cap >= upper:
                break
            got = _labels(seg, hop, ret, src, limit, cap, memory_budget, stop, far, after, dev)
            if got is None or got[1] is not None:
                return got
        return _labels(seg, hop, ret, src, limit, upper, memory_budget, stop, far, after, dev)

    if not dev.ok:
        return rising(-INF, deadline)
    # Unpriced first, briefly: small instances end there; pricing costs its tables
    # PRICE_ITERS times. A pass cut short by this slice proves nothing: priced next.
    got = rising(dev.root()[0], min(deadline, time.process_time() + UNPRICED_S), (0.01,))
    if got is not None:
        return got
    left = deadline - time.process_time()
    root = dev.price(upper, min(PRICE_SHARE * left, PRICE_SECONDS), PRICE_ITERS)
    return rising(root, deadline)


def _labels(seg, hop, ret, src, limit, upper, memory_budget, deadline, far, after, dev):
    """least_latency's label DP at one threshold (`upper`)."""
    m, n1, _ = seg.shape
    n = n1 - 1
    cap = (far - np.arange(n1)[None, :]).max(axis=1).astype(np.int64)
    left_cap = _subset_sums(cap)[::-1]  # [S]: what the devices outside S can hold

    def rest(S, k, e):
        """A lower bound on what a label still adds: the larger of the two bounds."""
        b = after[e, k]
        return np.maximum(b, dev.bound(S, k, e)) if dev.ok else b

    hop_ok = hop <= limit
    ret_ok = ret <= limit
    made, made_last, live_last, stored = 0, 0, 1, 0
    e = np.arange(1, far[src, 0] + 1, dtype=np.int64)
    S = np.full(len(e), 1 << src, dtype=np.int64)
    k = np.full(len(e), src, dtype=np.int64)
    L = seg[src, 0, e]
    par = np.full(len(e), -1, dtype=np.int64)
    best, best_at = upper, None
    history = []
    slack = 1e-12 * max(abs(upper), 1.0) if np.isfinite(upper) else 0.0
    kdt = np.int8 if m < 128 else np.int16
    for level in range(m):
        history.append((k.astype(kdt), e.astype(np.int16), par.astype(np.int32)))
        stored += len(k)
        fin = (e == n) & ret_ok[k]
        if fin.any():
            v = L[fin] + ret[k[fin]]
            i = int(np.argmin(v))
            if v[i] < best + slack:
                best, best_at = float(v[i]), (level, int(np.flatnonzero(fin)[i]))
        live = (e < n) & (e + left_cap[S] >= n) & (L + rest(S, k, e) < best + slack)
        idx = np.flatnonzero(live)
        if len(idx) == 0:
            break
        # Before a level: its labels, projected from the last level's successors per
        # live label, must fit the time left.
        if level > 0:
            projected = len(idx) * made_last / max(live_last, 1)
            if projected * LABEL_S > deadline - time.process_time():
                return None
        # Batches sized for the worst case: a label makes at most sum(cap) labels.
        chunk = max(1, CHUNK_MADE // max(int(cap.sum()), 1))
        made_before, live_last = made, len(idx)
        # A label (T, j, e) comes only from labels of the set T - {j}: expanding the
        # labels a few sets at a time keeps the deduplication exact and its memory small.
        out = []
        sets = S[idx]
        lo = 0
        while lo < len(idx):
            hi = min(lo + chunk, len(idx))
            if hi < len(idx):
                hi = max(int(np.searchsorted(sets, sets[hi - 1], side="right")), lo + 1)
            got = _expand(idx[lo:hi], S, k, e, L, m, n1, far, hop, seg, hop_ok, rest, best + slack)
            lo = hi
            if got is None:
                continue
            made += got[5]
            out.append(got[:5])
            stored_now = stored + sum(len(g[0]) for g in out)
            if stored_now * LABEL_BYTES > memory_budget or time.process_time() > deadline:
                return None
        made_last = made - made_before
        if not out:
            break
        S, k, e, L, par = (np.concatenate(a) for a in zip(*out, strict=True))
        o = np.argsort(S, kind="stable")  # the next level's batches take whole sets
        S, k, e, L, par = S[o], k[o], e[o], L[o], par[o]
    if best_at is None:
        return upper, None
    level, i = best_at
    path = []
    while level >= 0:
        kk, ee, pp = history[level]
        prev_end = int(history[level - 1][1][pp[i]]) if level > 0 else 0
        path.append((int(kk[i]), prev_end, int(ee[i])))
        i, level = int(pp[i]), level - 1
    return best, path[::-1]


def _expand(idx, S, k, e, L, m, n1, far, hop, seg, hop_ok, rest, bound):
    """The labels one more device makes from labels idx (whole sets), one per (S, k, e):
    the least latency; None if none. Returns (S, k, e, L, parent, made)."""
    parts = []
    for j in range(m):
        sub = idx[((S[idx] >> j) & 1 == 0) & hop_ok[e[idx], k[idx], j]]
        x = e[sub]
        lens = far[j, x] - x  # 0 where j cannot run unit x
        sub, x, lens = sub[lens > 0], x[lens > 0], lens[lens > 0]
        if len(sub) == 0:
            continue
        rep = np.repeat(sub, lens)
        xe = np.repeat(x, lens)
        ee = xe + 1 + np.arange(len(rep)) - np.repeat(np.cumsum(lens) - lens, lens)
        nl = L[rep] + hop[xe, k[rep], j] + seg[j, xe, ee]
        s2 = S[rep] | (1 << j)
        keep = nl + rest(s2, np.full(len(rep), j), ee) < bound
        parts.append((s2[keep], np.full(int(keep.sum()), j), ee[keep], nl[keep], rep[keep]))
    if not parts:
        return None
    S2, k2, e2, L2, p2 = (np.concatenate(a) for a in zip(*parts, strict=True))
    o = _least_per_key((S2 * m + k2) * n1 + e2, L2)
    return S2[o], k2[o], e2[o], L2[o], p2[o], len(S2)


def _least_per_key(key: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of one least-value element per distinct key (a sort on the integer key
    alone: far faster than lexsort on both)."""
    o = np.argsort(key)
    ko, vo = key[o], value[o]
    head = np.ones(len(o), dtype=bool)
    head[1:] = ko[1:] != ko[:-1]
    starts = np.flatnonzero(head)
    least = np.minimum.reduceat(vo, starts)
    gid = np.cumsum(head) - 1
    hit = np.flatnonzero(vo == least[gid])
    first = np.ones(len(hit), dtype=bool)
    first[1:] = gid[hit[1:]] != gid[hit[:-1]]
    return o[hit[first]]


def order_cuts(seg, hop, ret, order, limit: float, bottleneck: bool = False):
    """The least-latency cuts for a fixed order of devices, every stage, hop and return
    within `limit`: (latency, [(device, start, end)]) or (inf, None). `bottleneck`: the
    cuts of the least bottleneck instead (and its value)."""
    n1 = seg.shape[1]
    n = n1 - 1
    sg = np.where(seg <= limit, seg, INF)
    hp = np.where(hop <= limit, hop, INF)
    g = np.full(n1, INF)
    g[1:] = sg[order[0], 0, 1:]
    back = []
    for a, b in itertools.pairwise(order):
        if bottleneck:
            c = np.maximum(np.maximum(g, hp[:, a, b])[:, None], sg[b])
        else:
            c = (g + hp[:, a, b])[:, None] + sg[b]  # [start x, end e]
        arg = c.argmin(axis=0)
        back.append(arg)
        g = c[arg, np.arange(n1)]
    back_ret = ret[order[-1]] if ret[order[-1]] <= limit else INF
    total = max(g[n], back_ret) if bottleneck else g[n] + back_ret
    if not np.isfinite(total):
        return INF, None
    path, end = [], n
    for d, arg in zip(order[::-1], [*back[::-1], None], strict=True):
        start = int(arg[end]) if arg is not None else 0
        path.append((int(d), start, end))
        end = start
    return float(total), path[::-1]


def improve_order(seg, hop, ret, path, limit: float, seconds: float):
    """A better upper bound for the label DP: swaps of two devices in the chain's order
    (the source stays first), each re-cut at least latency, while one improves.
    Returns (latency, path)."""
    order = [d for d, _, _ in path]
    best, best_path = order_cuts(seg, hop, ret, order, limit)
    stop = time.process_time() + seconds
    improved = True
    while improved and time.process_time() < stop:
        improved = False
        for i in range(1, len(order)):
            for j in range(i + 1, len(order)):
                if time.process_time() > stop:
                    return best, best_path
                o2 = list(order)
                o2[i], o2[j] = o2[j], o2[i]
                v, p2 = order_cuts(seg, hop, ret, o2, limit)
                if v < best:
                    order, best, best_path, improved = o2, v, p2, True
    return best, best_path
