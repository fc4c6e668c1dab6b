"""How this rank emulates a testbed device, set once by the runner (see testbed.py).

mode "none": real hardware. "os": the rank runs inside a testbed namespace and cgroups
(tc shapes bandwidth, a CFS quota slows compute); the transport adds link latency only.
"transport": no OS help; the transport adds latency and bandwidth delays, and every compute
is stretched by `slowdown` with a sleep, as a CPU quota would.
"""

from __future__ import annotations

import time

MODE = "none"
SLOWDOWN = 1.0
"""Compute time multiplier (transport mode): 1 / the device's cores."""
QUOTA = False
"""A CFS quota throttles this rank: timings must average whole quota periods."""
WINDOW_S = 1.0


def configure(mode: str, slowdown: float = 1.0, quota: bool = False) -> None:
    global MODE, SLOWDOWN, QUOTA
    MODE, SLOWDOWN, QUOTA = mode, max(1.0, slowdown), quota


def stretch(t0: float) -> None:
    """Call after a compute that started at perf_counter() == t0."""
    if SLOWDOWN > 1.0:
        time.sleep((time.perf_counter() - t0) * (SLOWDOWN - 1.0))
