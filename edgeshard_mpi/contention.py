"""How much slower a device computes while the other ranks of its host compute too.

Profiling times each rank alone (ranks of one host take turns), but a pipelined run keeps
every stage busy at once. When a host runs more ranks than it has cores, the stages then
share cores and caches: on the small testbed (4 ranks, 2 cores) the edge stages of a
4-stage pipelined plan computed 1.15-1.7x their solo profile, those of 2-stage plans
0.94-1.06x. This module measures that slowdown once per profile, the way the run computes:

- solo: in its profiling turn, the rank calls one stage of a few decoder layers back to
  back for LOOP_S, sleeping the emulated dilation after each call (emulation.stretch), as
  a run's stage does, and keeps the median wall time of a call;
- together: every rank of the host runs the same loop at the same time;
- the ratio together / solo is the device's contention factor (profile meta
  "contention", with "host_cores": the cores its host offered).

The planner (planner/contention.py) charges a pipelined stage that factor, scaled by how
many of the host's ranks the plan keeps busy beyond its cores. Sequential runs compute one
stage at a time and are not charged.
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
        """Median wall seconds of one call, the dilation's sleep included (as the run's
        stage time is), over `seconds` of back-to-back calls."""
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
        return float(np.median(times[1:]))

    def close(self) -> None:
        self.stage = self.cache = None


def host_factor(loop: Loop | None, solo: float, shared: bool, host_comm, tp) -> float:
    """Collective over `host_comm`, after the profiling turns: every rank of the host runs
    its loop at once; this device's together / solo (at least 1; 1 where not measured)."""
    if not shared:
        return 1.0
    together = float("nan")
    tp.quiet_wait(host_comm.Ibarrier())  # all start together
    if loop is not None:
        together = loop.run()
        loop.close()
    tp.quiet_wait(host_comm.Ibarrier())
    watchdog.beat()
    factor = together / solo if solo > 0 and np.isfinite(together) else 1.0
    return max(1.0, float(factor))
