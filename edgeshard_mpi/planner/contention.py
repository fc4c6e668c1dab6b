"""What a pipelined stage pays for sharing its host's cores (pure: numpy only).

The profile times each device alone; profiling also measures, once, how much slower each
device computes while every rank of its host computes at once (contention.py, profile meta
"contention" and "host_cores"). A pipelined plan keeps its stages busy together, but only
its own ranks: a stage is charged the fraction of that slowdown that the plan's busy ranks
on its host cause, counted in ranks beyond the host's cores:

    factor = 1 + (measured - 1) x clamp((busy ranks on the host - cores) /
                                        (ranks on the host - cores), 0, 1)

so a plan whose stages fit the cores pays nothing and one that uses every rank pays the
measured slowdown (small testbed, 2 cores: 2-stage plans computed 0.94-1.06x their
profile, 4-stage plans 1.15-1.7x). At most `in_flight` stages compute at once: a
sequential run (one micro-batch) pays nothing.
"""

from __future__ import annotations

import numpy as np


def stage_factors(profile, ranks: list[int], in_flight: int) -> list[float]:
    """The compute multiplier of each stage (rank) of a pipelined plan with `in_flight`
    micro-batches in flight (at most that many stages compute at once); 1 where the
    profile did not measure contention."""
    meta = profile.meta or {}
    measured, cores = meta.get("contention"), meta.get("host_cores")
    hosts = meta.get("hosts")
    n = len(profile.names)
    if not measured or not cores or not hosts or len(measured) != n or len(hosts) != n:
        return [1.0] * len(ranks)
    busy = set(ranks)
    out = []
    for r in ranks:
        same = [d for d in range(n) if hosts[d] == hosts[r]]
        over_all = len(same) - int(cores[r])
        if over_all <= 0:
            out.append(1.0)
            continue
        over = min(in_flight, sum(1 for d in same if d in busy)) - int(cores[r])
        frac = float(np.clip(over / over_all, 0.0, 1.0))
        out.append(1.0 + max(0.0, float(measured[r]) - 1.0) * frac)
    return out
