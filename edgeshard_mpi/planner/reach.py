"""Throughput probe: can every stage, hop and return stay within T? A furthest-reach DP
over (device subset S, last device k): reach[S, k] = the furthest cut a chain through
exactly S, ending on k, places within T.

The next device j starts at the largest cut x <= reach (leaving it >= 1 unit, and k >= 1)
at which j can run unit x and the hop k -> j fits T; it then reaches as far as its time and
memory allow. Any chain the DP builds is a real plan (sound). It finds one whenever one
exists (complete) provided no hop between two devices other than the source exceeds T and
every device that can run the last unit returns the token within T; then the proof
follows a feasible plan's order and skips a device the greedy run has overtaken, which
needs the edge to be there. Hops out of the source may exceed T (the paper's 1 Mb/s
source-cloud link): the source's successor starts no earlier than the plan's. Outside that
condition a "no" is not a proof and the caller checks it otherwise (exact.py).

Cost: 2^(M-1) M^2 cells (subsets that hold the source), vectorised per subset size;
memory 5 bytes per (S, k).
"""

from __future__ import annotations

import functools

import numpy as np

CELL_S = 1e-8  # seconds per (subset, k, j) cell, measured on a shared 2-core machine


def probe_cost(m: int) -> tuple[float, float]:
    """(bytes, seconds) of one probe over m devices."""
    cells = (1 << max(m - 1, 0)) * m * m
    return (1 << m) * m * 5.0 + (1 << max(m - 1, 0)) * m * 40.0 / 4, cells * CELL_S


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x.astype(np.uint64)).astype(np.int64)


def complete_at(seg_ok, hop, ret, src: int, limit: float) -> bool:
    """Whether a "no" from probe() at `limit` is a proof (the condition above)."""
    n1 = seg_ok.shape[1]
    m = hop.shape[1]
    others = np.arange(m) != src
    inner = hop[1 : n1 - 1][:, others][:, :, others]
    off = ~np.eye(int(others.sum()), dtype=bool)
    if np.any(inner[:, off] > limit):
        return False
    can_end = seg_ok[:, :, n1 - 1].any(axis=1)  # some range ending at the last unit fits
    return not np.any(can_end & (ret > limit))


def probe(seg, hop, ret, src: int, limit: float):
    """A chain within `limit` as [(device, start, end)], or None."""
    m, n1, _ = seg.shape
    n = n1 - 1
    ok = seg <= limit  # [j, x, y]
    # far[j, x]: furthest end from start x (x when j cannot run unit x within limit).
    ends = np.where(ok, np.arange(n1)[None, None, :], -1).max(axis=2)
    far = np.where(ends > np.arange(n1)[None, :], ends, np.arange(n1)[None, :])
    valid = far > np.arange(n1)[None, :]  # [j, x]
    if not valid[src, 0]:
        return None
    hop_ok = hop <= limit  # [x, k, j]
    # pv[j, k, y]: the largest start x in [1, y] that j can take after k, else 0.
    good = valid.T[:, None, :] & hop_ok  # [x, k, j]
    good[0] = False
    idx = np.where(good, np.arange(n1)[:, None, None], 0)
    pv = np.maximum.accumulate(idx, axis=0).transpose(2, 1, 0)  # [j, k, y]
    pv_flat = np.ascontiguousarray(pv).reshape(m, m * n1).astype(np.int16)
    far16 = far.astype(np.int16)
    full = 1 << m
    # reach[S, k]: the furthest cut; start[S, k]: where k's range begins (-1: no chain).
    reach = np.full(full * m, -1, dtype=np.int16)
    start = np.full(full * m, -1, dtype=np.int16)
    s0 = 1 << src
    reach[s0 * m + src], start[s0 * m + src] = far[src, 0], 0
    ret_ok = ret <= limit
    if far[src, 0] == n and ret_ok[src]:
        return [(src, 0, n)]
    # A state whose remaining units exceed what the devices left can hold within the
    # limit (each at most its longest feasible range) cannot finish: dropped.
    cap = (far - np.arange(n1)[None, :]).max(axis=1).astype(np.int64)  # [j]
    left_cap = _subset_sums(cap)[::-1]  # [S]: sum of cap over devices not in S
    for c in range(1, m):
        lvl, mem, nobit = _level(m, src, c)  # subsets of size c, their members, j not in S
        flat = lvl[:, None] * m + mem  # [C, c] index of (S, k)
        r = reach.take(flat)
        live = ((r >= 0) & (r.astype(np.int64) + left_cap[lvl][:, None] >= n)).any(axis=1)
        if not live.any():
            return None
        s = start.take(flat)
        y = np.where(r >= 0, np.minimum(r, n - 1), 0).astype(np.int32)
        base = mem.astype(np.int32) * n1 + y  # [C, c] index into pv_flat[j]
        # The next device's start x is the largest one allowed, and its reach grows with x
        # (a later start is a sub-range), so the best predecessor k is the one giving the
        # largest x: one max over k, on int16 (k keeps >= 1 unit: x > its start).
        for j in range(m):
            rows = np.flatnonzero(live & nobit[:, j])
            if len(rows) == 0:
                continue
            x = pv_flat[j].take(base[rows])  # [R, c]
            bx = np.where(x > s[rows], x, 0).max(axis=1)
            keep = bx > 0
            if not keep.any():
                continue
            tgt = lvl[rows[keep]] | (1 << j)
            bxk = bx[keep]
            got = far16[j].take(bxk)
            reach[tgt * m + j] = got
            start[tgt * m + j] = bxk
            if ret_ok[j] and (got == n).any():
                done = (int(tgt[int(np.argmax(got == n))]), j)
                return _path(done, reach, start, pv, m, n)
    return None


def _subset_sums(values: np.ndarray) -> np.ndarray:
    """sums[S] = sum of values[d] for d in S, over every subset S."""
    out = np.zeros(1, dtype=values.dtype)
    for v in values:
        out = np.concatenate([out, out + v])
    return out


@functools.lru_cache(maxsize=64)
def _level(m: int, src: int, c: int):
    """Subsets of size c holding the source, their members [C, c] (int8), and a mask
    [C, m] of the devices not in each."""
    subsets = np.arange(1 << m, dtype=np.int64)
    subsets = subsets[((subsets >> src) & 1) == 1]
    subsets = subsets[_popcount(subsets) == c]
    bits = ((subsets[:, None] >> np.arange(m)) & 1).astype(bool)
    mem = np.nonzero(bits)[1].reshape(len(subsets), c).astype(np.int8)
    return subsets, mem, ~bits


def _path(done, reach, start, pv, m, n):
    """Back from (S, k): the predecessor is any k' in S - {k} whose chain lets k start
    where it does (the probe keeps no back pointers)."""
    s, k = done
    out, end = [], n
    while True:
        x = int(start[s * m + k])
        out.append((k, x, end))
        if x == 0:
            break
        s2 = s & ~(1 << k)
        for k2 in range(m):
            r2 = int(reach[s2 * m + k2]) if (s2 >> k2) & 1 else -1
            if r2 >= 0 and x > start[s2 * m + k2] and pv[k, k2, min(r2, n - 1)] == x:
                break
        else:
            raise AssertionError("reach: broken chain")
        s, k, end = s2, k2, x
    return out[::-1]
