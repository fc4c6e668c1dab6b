"""Hostfiles and device descriptions.

A device is one MPI rank: what host it is on, what it computes with, how many threads it
may use, and how much memory it may fill. Budgets come from the job when given, else from
what the rank can see: free accelerator memory, or the host's available RAM (or its cgroup
limit) shared among the ranks that share it.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path


class HostfileError(ValueError):
    pass


MAX_SLOTS = 4096
"""Slots of one hostfile line; more is a typo (a huge count once exhausted the host)."""


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int


def parse_hostfile(path: str | Path) -> tuple[str, list[HostEntry]]:
    """Read an MPICH (`host:N`) or Open MPI (`host slots=N`) hostfile -> (format, entries)."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {str(path)!r} not found")
    entries, kinds = [], set()
    try:
        data = path.read_bytes()
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data[:1], 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(
            f"hostfile {str(path)!r} is not a text file ({e}); write one 'host:N' or "
            "'host slots=N' per line"
        ) from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([\w.\-]+)\s*:\s*(\d+)", line)
        if m:
            kinds.add("mpich")
            entries.append(HostEntry(m.group(1), int(m.group(2))))
            continue
        m = re.fullmatch(r"([\w.\-]+)((?:\s+\w+=\d+)*)", line)
        if m:
            opts = dict(kv.split("=") for kv in m.group(2).split())
            unknown = set(opts) - {"slots", "max_slots", "max-slots"}
            if unknown:
                raise HostfileError(f"{path}:{n}: unknown option(s) {sorted(unknown)}")
            if opts:
                kinds.add("openmpi")
            entries.append(HostEntry(m.group(1), int(opts.get("slots", 1))))
            continue
        raise HostfileError(
            f"{path}:{n}: cannot read {raw!r}; write 'host:N' (MPICH) or 'host slots=N' (Open MPI)"
        )
    if not entries:
        raise HostfileError(f"hostfile {path} lists no hosts")
    if len(kinds) > 1:
        raise HostfileError(f"{path}: mixes MPICH 'host:N' and Open MPI 'slots=N' lines")
    if any(e.slots < 1 for e in entries):
        raise HostfileError(f"{path}: every host needs at least one slot")
    big = next((e for e in entries if e.slots > MAX_SLOTS), None)
    if big is not None:
        raise HostfileError(
            f"{path}: {big.host} has {big.slots} slots; at most {MAX_SLOTS} ranks fit on one "
            "host, fix the number"
        )
    return (kinds.pop() if kinds else "either"), entries


def block_placement(entries: list[HostEntry], n: int) -> list[str]:
    """Host of each rank when ranks fill the hostfile in order (both launchers' default)."""
    total = sum(e.slots for e in entries)
    if n > total:
        raise HostfileError(f"{n} ranks but the hostfile has {total} slots")
    hosts: list[str] = []
    for e in entries:  # only n names, whatever the slot counts say
        hosts += [e.host] * min(e.slots, n - len(hosts))
        if len(hosts) == n:
            break
    return hosts


@dataclass(frozen=True)
class DeviceInfo:
    """What one rank is."""

    rank: int
    host: str
    name: str
    """Label used in plans and reports."""
    accelerator: str
    """'cpu', or the CUDA device name."""
    cores: float
    """Cores this rank's host (or cgroup) lets it use."""
    local_size: int
    """Ranks on the same host."""
    threads: int
    """torch threads this rank uses."""
    memory_budget: int
    """Bytes this rank may fill with weights, KV cache and buffers."""
    memory_source: str
    """Where the budget came from: job, cuda-free, cgroup, meminfo."""

    def to_dict(self) -> dict:
        return asdict(self)


def _cgroup_paths() -> dict[str, str]:
    out = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    except OSError:
        pass
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("max", "") else int(text.split()[0])


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (v1 or v2), or None if unlimited."""
    paths = _cgroup_paths()
    candidates = []
    if "memory" in paths:
        candidates.append(
            Path("/sys/fs/cgroup/memory") / paths["memory"].lstrip("/") / "memory.limit_in_bytes"
        )
    if "" in paths:
        candidates.append(Path("/sys/fs/cgroup") / paths[""].lstrip("/") / "memory.max")
    for c in candidates:
        v = _read_int(c)
        if v is not None and v < 2**60:
            return v
    return None


def cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a CFS quota (v1 cpu.cfs_quota_us, v2 cpu.max), or None."""
    paths = _cgroup_paths()
    for key in ("cpu", "cpu,cpuacct"):
        if key in paths:
            base = Path("/sys/fs/cgroup/cpu") / paths[key].lstrip("/")
            quota, period = (
                _read_int(base / "cpu.cfs_quota_us"),
                _read_int(base / "cpu.cfs_period_us"),
            )
            if quota and period and quota > 0:
                return quota / period
    if "" in paths:
        try:
            q, p = (Path("/sys/fs/cgroup") / paths[""].lstrip("/") / "cpu.max").read_text().split()
            if q != "max":
                return int(q) / int(p)
        except (OSError, ValueError):
            pass
    return None


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _rss() -> int:
    """Resident bytes of this process now (the runtime's own footprint: Python, torch)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def local_view() -> dict:
    """What this process sees of its host, before knowing its neighbours."""
    cores = float(len(os.sched_getaffinity(0)))
    quota = cgroup_cpu_limit()
    mem_limit = cgroup_memory_limit()
    groups = _cgroup_paths()
    return {
        "host": socket.gethostname(),
        "cores": min(cores, quota) if quota else cores,
        "mem_limit": mem_limit,
        "mem_available": mem_available(),
        "rss": _rss(),
        "mem_group": groups.get("memory", groups.get("", "")),
        "cpu_group": groups.get("cpu", groups.get("cpu,cpuacct", groups.get("", ""))),
    }


def describe_devices(
    views: list[dict],
    threads_setting: int,
    budgets: dict[int, int],
    names: dict[int, str],
    accelerators: list[str],
    cuda_free: list[int | None],
) -> list[DeviceInfo]:
    """Turn every rank's local view (gathered) into DeviceInfo: ranks that share a host
    share its cores, ranks that share a memory cgroup (or a host without one) share RAM."""
    out = []
    for rank, v in enumerate(views):
        peers = [w for w in views if w["host"] == v["host"]]
        cpu_peers = [w for w in peers if w["cpu_group"] == v["cpu_group"]]
        threads = threads_setting or max(1, int(v["cores"] // len(cpu_peers)))
        if rank in budgets:
            budget, src = budgets[rank], "job"
        elif cuda_free[rank] is not None:
            budget, src = cuda_free[rank], "cuda-free"
        elif v["mem_limit"] is not None:
            sharing = [w for w in peers if w["mem_group"] == v["mem_group"]]
            # The limit also covers this process's runtime (Python, torch): take it off.
            budget, src = v["mem_limit"] // len(sharing) - v["rss"], "cgroup"
        else:
            budget, src = v["mem_available"] // len(peers), "meminfo"
        out.append(
            DeviceInfo(
                rank=rank,
                host=v["host"],
                name=names.get(rank, f"{v['host']}/r{rank}"),
                accelerator=accelerators[rank],
                cores=v["cores"],
                local_size=len(peers),
                threads=threads,
                memory_budget=int(budget),
                memory_source=src,
            )
        )
    return out
