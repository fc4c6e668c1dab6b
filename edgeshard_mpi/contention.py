"""How much slower a device computes while the other ranks of its host compute too.

Profiling times each rank alone (ranks of one host take turns), but a pipelined run keeps
every stage busy at once. When a host runs more ranks than it has cores, the stages then
share cores and caches: on the small testbed (4 ranks, 2 cores) the edge stages of a
4-stage pipelined plan computed 1.15-1.7x their solo profile, those of 2-stage plans
0.94-1.06x. This module measures that slowdown once per profile, the way the run computes:

- solo: in its profiling turn, the rank calls one stage of a few decoder layers back to
  back for LOOP_S, sleeping the emulated dilation after each call (emulation.stretch), as
  a run's stage does, and keeps the mean wall time of a call (the rate at which its calls
  complete: a pipelined stage's throughput. The median of the calls hid preemption: a
  2 ms call mostly fits one time slice, so 3 ranks on 2 cores read 1.09-1.36x by the
  median while their calls completed at 1.8-2.1x);
- at the cores: as many ranks as the host has cores run the loop at once (in groups, each
  rank measured once), which is what the host's ranks pay for sharing its memory
  bandwidth and caches without sharing a core: two mini-7b stages at once on this 2-core
  host computed 1.29-1.34x their solo time (profile meta "contention_cores");
- together: every rank of the host runs the same loop at the same time (meta
  "contention", with "host_cores": the cores its host offered).

The planner (planner/contention.py) charges a pipelined stage by how many of the host's
ranks the plan keeps busy at once: from 1 (one busy) to the cores' factor (as many as the
cores), then to the all-ranks factor. Sequential runs compute one stage at a time and are
not charged.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from . import emulation, watchdog
from .kernels import load_stage
from .model import first_position, position_ids

LOOP_S = 1.0
LAYERS = 4
PROMPT = 8


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Loop:
    """One stage of up to LAYERS decoder layers, called at successive decode positions."""

    def __init__(self, spec, source, dtype: str, device, budget: float, kernels: str):
        self.stage = None
        if spec.n_units <= 2:
            return
        end = 1
        size = 0.0
        while end < min(spec.n_units - 1, 1 + LAYERS):
            w = spec.unit_weight_bytes(end, dtype)
            if size + w > budget / 2:
                break
            size += w
            end += 1
        if end == 1:
            return  # not even one layer fits this device
        self.stage = load_stage(spec, 1, end, dtype, device, source, kernels)
        self.spec, self.device = spec, device
        self.calls = 64
        self.cache = self.stage.new_cache(1, PROMPT + self.calls + 1)
        x = torch.randn(1, PROMPT, spec.hidden_size, dtype=self.stage.dtype, device=device)
        with torch.inference_mode():
            self.stage(x, self.cache, position_ids(1, PROMPT, 0).to(device),
                       first_position(PROMPT, 0))  # fmt: skip
        self.x = x[:, :1].contiguous()
        self.positions = [position_ids(1, PROMPT, i).to(device) for i in range(self.calls + 1)]

    def run(self, seconds: float = LOOP_S) -> float:
        """Mean wall seconds of one call, the dilation's sleep included (as the run's stage
        time is), over `seconds` of back-to-back calls (the first, warming, left out)."""
        if self.stage is None:
            return float("nan")
        times = []
        end = time.perf_counter() + seconds
        with torch.inference_mode():
            while time.perf_counter() < end or len(times) < 5:
                step = len(times) % self.calls + 1
                if step == 1 and self.cache is not None:
                    self.cache.reset()
                    self.stage(self.x.expand(1, PROMPT, -1).contiguous(), self.cache,
                               self.positions[0], first_position(PROMPT, 0))  # fmt: skip
                t0, c0 = time.perf_counter(), emulation.cpu_now()
                self.stage(self.x, self.cache, self.positions[step], first_position(PROMPT, step))
                emulation.stretch(t0, c0)
                times.append(time.perf_counter() - t0)
        return float(np.mean(times[1:]))

    def close(self) -> None:
        self.stage = self.cache = None


def core_groups(n: int, cores: int) -> list[tuple[list[int], list[int]]]:
    """(ranks that run, ranks measured) per round, so that every one of n local ranks is
    measured once with exactly min(cores, n) of them running: consecutive groups of
    `cores`, the last one filled up from the first ranks (who run again, unmeasured)."""
    k = max(1, min(cores, n))
    out = []
    for start in range(0, n, k):
        measured = list(range(start, min(start + k, n)))
        out.append(([(start + i) % n for i in range(k)], measured))
    return out


def host_factor(
    loop: Loop | None, solo: float, shared: bool, host_comm, tp
) -> tuple[float, float]:
    """Collective over `host_comm`, after the profiling turns: (at the cores, together),
    this device's loop time with as many of the host's ranks running as it has cores,
    then with all of them, over its solo time (each at least 1; 1 where not measured)."""
    if not shared:
        return 1.0, 1.0

    def ratio(t: float) -> float:
        return max(1.0, float(t / solo)) if solo > 0 and np.isfinite(t) else 1.0

    me, n = host_comm.Get_rank(), host_comm.Get_size()
    at_cores = float("nan")
    # Every rank of the host must walk the same groups (the barriers pair up): one count
    # for all, though a binding may give the ranks different affinities.
    groups = core_groups(n, max(host_comm.allgather(host_cores())))
    if len(groups) > 1:  # (one group: the cores hold every rank, `together` measures it)
        for running, measured in groups:
            tp.quiet_wait(host_comm.Ibarrier())  # the group starts together
            if loop is not None and me in running:
                t = loop.run()
                if me in measured:
                    at_cores = t
            tp.quiet_wait(host_comm.Ibarrier())
            watchdog.beat()
    together = float("nan")
    tp.quiet_wait(host_comm.Ibarrier())  # all start together
    if loop is not None:
        together = loop.run()
        loop.close()
    tp.quiet_wait(host_comm.Ibarrier())
    watchdog.beat()
    f_all = ratio(together)
    return (ratio(at_cores) if len(groups) > 1 else f_all), f_all
