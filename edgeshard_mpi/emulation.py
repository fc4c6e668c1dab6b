"""How this rank emulates a testbed device, set once by the runner (see testbed.py).

mode "none": real hardware. "os": the rank runs inside a testbed namespace and cgroups
(tc shapes bandwidth, the cgroups bound memory and give the devices priority over other
work on the host); the transport adds link latency only. "transport": no OS help; the
transport adds latency and bandwidth delays.

In both emulated modes a device's compute speed is time dilation: a compute that consumed
c seconds of CPU takes c / share seconds of wall time (`stretch` sleeps the rest). Charging
the CPU time really consumed, not the wall time, keeps a device's speed independent of how
often the shared host preempted it; a sleep that overshoots is paid back by the next one,
so short computes are not slowed by wake-up latency. What was tried before and what each
measured is in the README ("Testbed fidelity").
"""

from __future__ import annotations

import time

MODE = "none"
SLOWDOWN = 1.0
"""Compute time multiplier: 1 / the device's share of a core."""
QUOTA = False
"""A CFS quota throttles this rank (no longer used by the testbed: see cgroups.py)."""
WINDOW_S = 0.5
MAX_OWED_S = 0.005
"""Sleep overshoot carried to the next stretch at most (a bigger one is the host's)."""
SPIN_S = 2e-4
"""The last part of a stretch is spun, not slept: a wake-up comes 0.05-1 ms late."""

_owed = 0.0


def configure(mode: str, slowdown: float = 1.0, quota: bool = False) -> None:
    global MODE, SLOWDOWN, QUOTA, _owed
    MODE, SLOWDOWN, QUOTA = mode, max(1.0, slowdown), quota
    _owed = 0.0


def _cpu_clock() -> float:
    # One compute thread (the testbed's devices): its own CPU time, which leaves out the
    # link emulator's thread. Several: the whole process's.
    import torch

    return time.thread_time() if torch.get_num_threads() <= 1 else time.process_time()


def cpu_now() -> float:
    """The CPU clock `stretch` charges; read it when a compute starts."""
    return _cpu_clock()


def charged(t0: float, c0: float) -> float:
    """The emulated duration of a compute that started at (t0, c0), without waiting for
    it: the profiler's reading. A stretch's sleep would leave the next call's caches and
    predictors cold (the host runs others meanwhile), a cost the run pays once per stage
    call but a profile timing unit by unit would pay once per unit (measured: 1.5x)."""
    wall = time.perf_counter() - t0
    if MODE == "none":
        return wall
    return max(wall, (_cpu_clock() - c0) * SLOWDOWN) if SLOWDOWN > 1.0 else (_cpu_clock() - c0)


def stretch(t0: float, c0: float | None = None) -> None:
    """Call after a compute that started at perf_counter() == t0 (and cpu_now() == c0):
    wait until it has taken (CPU seconds used) x SLOWDOWN of wall time. Without c0 the
    wall time is charged instead (it includes time the host gave to others)."""
    global _owed
    if SLOWDOWN <= 1.0:
        return
    now = time.perf_counter()
    used = (_cpu_clock() - c0) if c0 is not None else (now - t0)
    rest = used * SLOWDOWN - (now - t0) - _owed
    if rest <= 0:  # paid back what it could (a slow compute pays nothing)
        _owed = min(_owed, -rest)
        return
    end = now + rest
    if rest > SPIN_S:
        time.sleep(rest - SPIN_S)
    while time.perf_counter() < end:
        pass
    _owed = min(MAX_OWED_S, max(0.0, time.perf_counter() - end))
