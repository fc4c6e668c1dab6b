"""What a pipelined stage pays for sharing its host (pure: numpy only).

The profile times each device alone; profiling also measures how much slower each device
computes while as many ranks of its host as it has cores compute at once (profile meta
"contention_cores": they share memory bandwidth and caches, not cores) and while every
rank of its host does ("contention": beyond the cores they also share cores); see
contention.py, with meta "host_cores". A pipelined plan keeps its stages busy together, but
only its own ranks, and at most `in_flight` of them (one per micro-batch in flight). With
b busy ranks on a host of n ranks and c cores, k = min(n, c):

    b <= 1:        factor 1
    1 < b <= k:    1 + (at_k - 1) x (b - 1) / (k - 1)          (sharing bandwidth)
    b > k:         at_k + (all - at_k) x (b - k) / (n - k)     (sharing cores too)

where at_k is the cores' factor ("contention_cores"; when n <= c the all-ranks one is it).
Measured on this 2-core host, mini-7b: two stages at once 1.29-1.34x, three 1.8-2.1x. A
sequential run (one micro-batch) pays nothing. A profile without "contention_cores"
(older files) charges nothing up to the cores of a host with more ranks than cores.
"""

from __future__ import annotations


def stage_factors(profile, ranks: list[int], in_flight: int) -> list[float]:
    """The compute multiplier of each stage (rank) of a pipelined plan with `in_flight`
    micro-batches in flight; 1 where the profile did not measure contention."""
    meta = profile.meta or {}
    measured, cores = meta.get("contention"), meta.get("host_cores")
    hosts = meta.get("hosts")
    at_cores = meta.get("contention_cores")
    n = len(profile.names)
    if not measured or not cores or not hosts or len(measured) != n or len(hosts) != n:
        return [1.0] * len(ranks)
    if at_cores is not None and len(at_cores) != n:
        at_cores = None
    busy = set(ranks)
    out = []
    for r in ranks:
        same = [d for d in range(n) if hosts[d] == hosts[r]]
        c = int(cores[r])
        k = max(1, min(len(same), c))
        b = min(in_flight, sum(1 for d in same if d in busy))
        f_all = max(1.0, float(measured[r]))
        if len(same) <= c:
            f_k = f_all
        else:
            f_k = max(1.0, float(at_cores[r])) if at_cores is not None else 1.0
        if b <= 1:
            f = 1.0
        elif b <= k:
            f = 1.0 + (f_k - 1.0) * (b - 1) / (k - 1)
        else:
            f = f_k + max(0.0, f_all - f_k) * (b - k) / (len(same) - k)
        out.append(f)
    return out
