"""A testbed device's CPU speed and memory as cgroups (v1 cpu + memory, or v2): creating
them with a calibrated CFS quota, joining them, leaving the CPU quota for a while, and
emptying them. testbed.py builds the rest of the emulated cluster."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # testbed.py imports this module
    from .testbed import Testbed

CPU_PERIOD_US = 100_000


def _kill(pid: str) -> None:
    subprocess.run(["kill", "-9", pid], capture_output=True)


def cgroup_version() -> int:
    if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
        return 1
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return 2
    return 0


def cgroup_dirs(tb: Testbed, i: int) -> dict[str, Path]:
    """Where device i's cgroups live (v1: one per controller; v2: one)."""
    leaf = f"edgeshard-{tb.tag}/{i}"
    if cgroup_version() == 1:
        return {
            "cpu": Path("/sys/fs/cgroup/cpu") / leaf,
            "memory": Path("/sys/fs/cgroup/memory") / leaf,
        }
    return {"unified": Path("/sys/fs/cgroup") / leaf}


def _periods(tb: Testbed) -> list[int]:
    # CFS hands out runtime in 5 ms slices (a smaller quota throttles unevenly), and each
    # throttle leaves caches cold: few long periods keep the speed ratio true.
    return [max(CPU_PERIOD_US, int(5000 / d.cpu) + 1) for d in tb.devices]


def _set_quota(tb: Testbed, i: int, quota: int) -> None:
    period = _periods(tb)[i]
    quota = max(1000, min(quota, 64 * period))
    dirs = cgroup_dirs(tb, i)
    if "cpu" in dirs:
        (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        (dirs["unified"] / "cpu.max").write_text(f"{quota} {period}")


_SPEED_PROBE = """
import sys, time
import numpy as np
# Like a decode step: a weight matrix of a few MB streamed through, not a cached tile.
a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
v = np.ones((1024, 4), dtype=np.float32)
sys.stdin.readline()  # the parent moves us into the cgroup first
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[1]):
    a @ v
    n += 1
print((time.perf_counter() - t0) / n)
"""


def _probe_speed(procs_files: list[Path], seconds: float) -> float:
    """Seconds per unit of work of a single-threaded probe placed in these cgroups."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPEED_PROBE, str(seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    for f in procs_files:
        f.write_text(str(proc.pid))
    out, _ = proc.communicate("go\n", timeout=60 + seconds * 4)
    return float(out.strip())


def calibrate(tb: Testbed, rounds: int = 2, seconds: float = 1.5, log=print) -> list[float]:
    """Adjust each device's CPU quota until it delivers its configured share of a core.

    A throttled process loses more than its quota (each throttle leaves caches cold, CFS
    accounts in slices), so a quota of 0.125 cores gives about 0.09 of a core here.
    Measure, scale the quota by configured / delivered, measure again."""
    ref = min(_probe_speed([], seconds) for _ in range(2))
    periods = _periods(tb)
    quotas = [int(d.cpu * p) for d, p in zip(tb.devices, periods, strict=True)]
    shares = [0.0] * tb.n
    for _ in range(rounds):
        for i, d in enumerate(tb.devices):
            files = [p / "cgroup.procs" for p in cgroup_dirs(tb, i).values()]
            shares[i] = ref / _probe_speed(files, seconds)
            if d.cpu < 1.0:  # a full core needs no quota to speak of
                quotas[i] = int(quotas[i] * d.cpu / shares[i])
                _set_quota(tb, i, quotas[i])
    log(
        "calibrated CPU shares (configured -> delivered before the last adjustment): "
        + ", ".join(
            f"{d.name} {d.cpu:.3g}->{s:.3g}" for d, s in zip(tb.devices, shares, strict=True)
        )
    )
    return shares


def write_cgroups(tb: Testbed) -> None:
    v = cgroup_version()
    for i, d in enumerate(tb.devices):
        dirs = cgroup_dirs(tb, i)
        limit = d.memory + tb.runtime_memory
        period = _periods(tb)[i]
        quota = int(d.cpu * period)
        for p in dirs.values():
            p.mkdir(parents=True, exist_ok=True)
        if v == 1:
            (dirs["cpu"] / "cpu.cfs_period_us").write_text(str(period))
            (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
            (dirs["memory"] / "memory.limit_in_bytes").write_text(str(limit))
            # A rank joins after start-up: its pages move with it and count against the limit.
            with contextlib.suppress(OSError):
                (dirs["memory"] / "memory.move_charge_at_immigrate").write_text("3")
            swap = dirs["memory"] / "memory.memsw.limit_in_bytes"
            if swap.exists():  # no escape into swap: over the limit is over the limit
                with contextlib.suppress(OSError):
                    swap.write_text(str(limit))
        else:
            parent = dirs["unified"].parent
            (parent / "cgroup.subtree_control").write_text("+cpu +memory")
            (dirs["unified"] / "cpu.max").write_text(f"{quota} {period}")
            (dirs["unified"] / "memory.max").write_text(str(limit))


def kill_cgroup(leaf: Path) -> None:
    """Kill what still runs in a device's cgroup and wait until it is empty (rmdir of a
    cgroup with members fails)."""
    import time

    procs = leaf / "cgroup.procs"
    for _ in range(50):
        try:
            pids = procs.read_text().split()
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            _kill(pid)
        time.sleep(0.1)


def join_cgroups() -> None:
    """Move this process into the cgroups `enter` named (CPU quota, memory limit)."""
    pid = str(os.getpid())
    for p in filter(None, os.environ.get("EDGESHARD_CGROUPS", "").split(os.pathsep)):
        (Path(p) / "cgroup.procs").write_text(pid)


@contextlib.contextmanager
def cpu_unthrottled():
    """Leave the device's CPU quota for a while (link profiling: a rank throttled for
    tens of ms at a time would answer pings late and read as a slow link)."""
    cpu = [p for p in os.environ.get("EDGESHARD_CGROUPS", "").split(os.pathsep) if "/cpu/" in p]
    if not cpu:
        yield
        return
    root = Path(cpu[0]).parents[1]  # /sys/fs/cgroup/cpu
    (root / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield
    finally:
        (Path(cpu[0]) / "cgroup.procs").write_text(str(os.getpid()))
