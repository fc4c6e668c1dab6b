"""A testbed device's cgroups (v1 cpu + memory, or v2): creating them (a memory limit, and
CPU priority over other work on the host), joining them, and emptying them. testbed.py
builds the rest of the emulated cluster; a device's speed is emulation.py's time dilation."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

PRIORITY_V1, PRIORITY_V2 = 262_144, 10_000
"""cpu.shares / cpu.weight of the testbed's parent group (the maxima): when other work
shares the host, the emulated devices still get the CPU their computes need (measured: an
unthrottled process fell to 0.34-0.65 of a core under other users' load with the default
weight, and stayed at 1.00 with this one). A device's speed is not a CPU quota but time
dilation inside the rank (emulation.py); README "Testbed fidelity" says why."""


def _kill(pid: str) -> None:
    subprocess.run(["kill", "-9", pid], capture_output=True)


def cgroup_version() -> int:
    if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
        return 1
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return 2
    return 0


def cgroup_dirs(tag: str, i: int) -> dict[str, Path]:
    """Where device i of the testbed tagged `tag` has its cgroups (v1: one per controller;
    v2: one). Plain values in, not the Testbed: testbed.py imports this module."""
    leaf = f"edgeshard-{tag}/{i}"
    if cgroup_version() == 1:
        return {
            "cpu": Path("/sys/fs/cgroup/cpu") / leaf,
            "memory": Path("/sys/fs/cgroup/memory") / leaf,
        }
    return {"unified": Path("/sys/fs/cgroup") / leaf}


def ref_dir(tag: str) -> dict[str, Path]:
    """A cgroup beside the devices, with their priority, for measuring the host."""
    return {k: p.parent / "ref" for k, p in cgroup_dirs(tag, 0).items() if k != "memory"}


def write_cgroups(tag: str, limits: list[int]) -> None:
    """One cgroup per device, device i's memory limited to limits[i] bytes."""
    v = cgroup_version()
    parents = {p.parent for i in range(len(limits)) for p in cgroup_dirs(tag, i).values()}
    for p in [*parents, *ref_dir(tag).values()]:
        p.mkdir(parents=True, exist_ok=True)
    for i, limit in enumerate(limits):
        dirs = cgroup_dirs(tag, i)
        for p in dirs.values():
            p.mkdir(parents=True, exist_ok=True)
        if v == 1:
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
            (dirs["unified"] / "memory.max").write_text(str(limit))
    cpu_parent = cgroup_dirs(tag, 0).get("cpu", cgroup_dirs(tag, 0).get("unified")).parent
    if v == 1:
        (cpu_parent / "cpu.shares").write_text(str(PRIORITY_V1))
    else:
        with contextlib.suppress(OSError):  # the root's children may refuse a weight
            (cpu_parent / "cpu.weight").write_text(str(PRIORITY_V2))


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
