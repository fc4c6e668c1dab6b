"""Pipelined predictions when ranks share a host's cores (no emulation).

A profile times the ranks of one host in turns, each alone (profile.py): right for a
sequential run, where one stage computes at a time, but a pipelined run keeps its stages
busy at once, and stages that share a host then share its cores. The schedule simulator
(planner/pipeline.py) assumes every stage runs at its solo speed; this caps its throughput
by what each host's cores can do: per micro-batch step, every stage on a host needs its
decode compute times its threads of core time, and a host gives at most `cores` core
seconds per second. Testbed devices (emulation) are left alone: each is charged its own
share of a core, and the shares fit the host.

Pure numpy: the planner's Prediction and Plan, the cluster's DeviceInfo.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np


def host_bound_tokens_per_s(plan, prob, devices) -> float:
    """The throughput the hosts' cores allow (inf when no host is oversubscribed)."""
    work: dict[str, float] = {}  # core seconds per micro-batch step, per host
    threads: dict[str, int] = {}
    cores: dict[str, float] = {}
    for st in plan.stages:
        d = devices[st.rank]
        t = max(1, int(d.threads))
        work[d.host] = work.get(d.host, 0.0) + float(
            np.sum(prob.decode[st.rank, st.start : st.end])
        ) * t
        threads[d.host] = threads.get(d.host, 0) + t
        cores[d.host] = float(d.cores)
    bound = float("inf")
    for host, w in work.items():
        if threads[host] > cores[host] and w > 0:
            bound = min(bound, prob.batch * cores[host] / w)
    return bound


def share_cores(pred, plan, prob, devices, emulated: bool):
    """The prediction, its throughput capped by the hosts' cores (see the module doc)."""
    if emulated or not devices:
        return pred
    bound = host_bound_tokens_per_s(plan, prob, devices)
    if not bound < pred.tokens_per_s:
        return pred
    f = pred.tokens_per_s / bound  # > 1: how much longer the run takes
    busy = [b * pred.makespan_s for b in pred.busy_fraction]
    span = pred.makespan_s * f
    return replace(
        pred,
        tokens_per_s=bound,
        makespan_s=span,
        busy_fraction=tuple(b / span for b in busy),
        idle_s=tuple(span - b for b in busy),
    )
