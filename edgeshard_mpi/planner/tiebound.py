"""Clusters of similar devices, for the tie-break's bound on the rest of a chain.

The label DP of ties.py prunes with a bound (tielag.py) that counts, per cluster of similar
non-source devices, how many are left: a relaxed chain may not use more devices of a
cluster than a label leaves. Similar means same longest range, same runnable units and
speed within 30%; coarser groupings while the bound's tables (n x devices x
prod(cluster size + 1) cells) would not fit.
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
