"""An emulated heterogeneous cluster on one Linux host: one network namespace per device,
joined by a bridge, each pair's bandwidth shaped with tc (htb class + u32 filter per
destination), each device's compute speed its share of a core (time dilation inside the rank,
emulation.py), its memory a cgroup limit, and CPU priority over other work on the host.

    edgeshard-mpi testbed up small        # root; idempotent
    edgeshard-mpi testbed launch small jobs/testbed-small.toml   # prints the mpiexec line
    edgeshard-mpi testbed down small      # removes everything, even after a crash

Ranks start inside their device (`testbed enter`: join the cgroups, then `ip netns exec`)
and MPICH talks over TCP through the shaped veths (no shared memory). This kernel has no
netem, so link latency is added by the transport (comm.LinkEmulator) in both modes, which
also charges the bytes tc's token bucket lets through unpaced (SHAPER_BURST_BYTES).

Without root (or with emulation = "transport") the same testbed file is emulated inside
the process: the transport delays each message by latency + bytes / bandwidth per link, and
every compute is dilated by 1 / (cpu share) as in the OS testbed. The HDF5 file records
which emulation ran.

Names: every object carries a tag derived from the testbed name and the user id
(es<tag>-<i> namespaces, es<tag>br bridge, edgeshard-<tag> cgroups), so two users or two
testbeds on one host do not clash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cgroups import cgroup_dirs, cgroup_version, kill_cgroup, write_cgroups
from .job import JobError, parse_bytes

SHIPPED = Path(__file__).resolve().parent / "resources" / "testbeds"
STATE_DIR = Path(os.environ.get("EDGESHARD_TESTBED_STATE", "/run/edgeshard"))


class TestbedError(ValueError):
    """A problem with a testbed file or the host, phrased with the fix."""

    __test__ = False  # not a pytest test class, whatever its name


@dataclass(frozen=True)
class Device:
    name: str
    cpu: float
    """Share of one host core: the device's compute speed (emulation.py dilates time)."""
    memory: int
    """Bytes the model may use on this device (its budget for the planner)."""
    kind: str = ""


@dataclass(frozen=True)
class Testbed:
    name: str
    path: Path
    devices: tuple[Device, ...]
    latency_s: np.ndarray  # [M, M]
    bandwidth: np.ndarray  # [M, M] bytes/s
    source: int = 0
    cloud: int | None = None
    runtime_memory: int = 600 * 2**20
    """Added to each device's cgroup memory limit: the Python + torch process itself."""
    description: str = ""
    scaling: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.devices)

    @property
    def tag(self) -> str:
        h = hashlib.sha1(f"{os.getuid()}:{self.name}".encode()).hexdigest()
        return h[:6]

    def ns(self, i: int) -> str:
        return f"es{self.tag}-{i}"

    def ip(self, i: int) -> str:
        h = int(self.tag, 16)
        return f"10.{100 + (h >> 16) % 100}.{(h >> 8) & 0xFF}.{i + 1}"

    @property
    def bridge(self) -> str:
        return f"es{self.tag}br"

    def cpu_share(self, i: int) -> float:
        """Speed of device i relative to one full core."""
        return self.devices[i].cpu

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "devices": [d.__dict__ for d in self.devices],
            "latency_s": self.latency_s.tolist(),
            "bandwidth_bytes_per_s": [
                [None if np.isinf(x) else float(x) for x in row] for row in self.bandwidth
            ],
            "source": self.source,
            "cloud": self.cloud,
            "scaling": self.scaling,
        }


def shipped_testbeds() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def find_testbed(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    shipped = SHIPPED / f"{name}.toml"
    if shipped.is_file():
        return shipped
    raise TestbedError(
        f"testbed {name!r}: no such file and not a shipped testbed "
        f"({', '.join(shipped_testbeds())})"
    )


def load_testbed(name: str | Path) -> Testbed:
    from .planner.profiles import ProfileError, _links

    path = find_testbed(str(name))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise TestbedError(f"{path}: not a valid TOML text file: {e}") from None
    raw = data.get("devices")
    if not isinstance(raw, list) or not raw:
        raise TestbedError(f"{path}: list the devices as [[devices]] tables")
    devices = []
    names: dict[str, int] = {}
    for i, d in enumerate(raw):
        where = f"{path.name}: devices[{i}]"
        unknown = set(d) - {"name", "cpu", "memory", "kind", "count"}
        if unknown or "name" not in d or "cpu" not in d or "memory" not in d:
            raise TestbedError(f"{where}: give name, cpu (cores), memory; unknown: {unknown}")
        if not isinstance(d["cpu"], int | float) or not 0.01 <= d["cpu"] <= 64:
            raise TestbedError(f"{where}: cpu is a number of cores in [0.01, 64]")
        try:
            mem = parse_bytes(d["memory"], f"{where}.memory")
        except JobError as e:
            raise TestbedError(str(e)) from None
        count = int(d.get("count", 1))
        for k in range(count):
            name = d["name"] if count == 1 else f"{d['name']}-{k}"
            if name in names:
                raise TestbedError(f"{where}: device name {name!r} used twice")
            names[name] = len(devices)
            devices.append(Device(name, float(d["cpu"]), mem, str(d.get("kind", ""))))

    def index(v, what: str) -> int:
        if isinstance(v, int) and 0 <= v < len(devices):
            return v
        if isinstance(v, str) and v in names:
            return names[v]
        raise TestbedError(f"{path.name}: {what} = {v!r} names no device")

    links = data.get("links", {})
    default = links.get("default")
    if not isinstance(default, dict) or "bandwidth_mbps" not in default:
        raise TestbedError(f"{path.name}: [links.default] needs bandwidth_mbps (and latency_ms)")
    spec = {
        "default": {
            "latency_s": float(default.get("latency_ms", 0.0)) / 1e3,
            "bandwidth_mbps": float(default["bandwidth_mbps"]),
            "jitter": float(default.get("jitter", 0.0)),
            "seed": int(default.get("seed", 0)),
        },
        "pairs": [
            {
                "a": index(p["a"], "links.pairs.a"),
                "b": index(p["b"], "links.pairs.b"),
                **({"bandwidth_mbps": float(p["bandwidth_mbps"])} if "bandwidth_mbps" in p else {}),
                **({"latency_s": float(p["latency_ms"]) / 1e3} if "latency_ms" in p else {}),
            }
            for p in links.get("pairs", [])
        ],
    }
    try:
        lat, bw = _links(spec, len(devices))
    except (ProfileError, KeyError, TypeError) as e:
        raise TestbedError(f"{path.name}: links: {e}") from None
    runtime_memory = parse_bytes(data.get("runtime_memory", "600MiB"), "runtime_memory")
    return Testbed(
        name=str(data.get("name", path.stem)),
        path=path.resolve(),
        devices=tuple(devices),
        latency_s=lat,
        bandwidth=bw,
        source=index(data.get("source", 0), "source"),
        cloud=None if data.get("cloud") is None else index(data["cloud"], "cloud"),
        runtime_memory=runtime_memory,
        description=str(data.get("description", "")),
        scaling=str(data.get("scaling", "")),
        meta={k: v for k, v in data.items() if k in ("model_scale", "time_scale")},
    )


# -- the OS side ---------------------------------------------------------------------------


def can_emulate_os() -> str | None:
    """None if this host can run the OS-level testbed, else why not."""
    if os.geteuid() != 0:
        return "not root (network namespaces, tc and cgroups need root)"
    if sys.platform != "linux":
        return "not Linux"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"no `{tool}` command (install iproute2)"
    if cgroup_version() == 0:
        return "no cgroup v1 cpu controller or cgroup v2 mounted at /sys/fs/cgroup"
    return None


# htb's bucket per shaped link (bytes): tc's own default for an MTU of 1500. The transport
# charges these bytes itself (comm.LinkEmulator), so a small message is not sent free.
SHAPER_BURST_BYTES = 1600


def _rate(bytes_per_s: float) -> str:
    return f"{max(8.0, bytes_per_s * 8 / 1000):.0f}kbit"


def up_commands(tb: Testbed) -> list[list[str]]:
    """The ip/tc commands `up` runs, in order (cgroups are written separately)."""
    br = tb.bridge
    cmds = [["ip", "link", "add", br, "type", "bridge"], ["ip", "link", "set", br, "up"]]
    for i in range(tb.n):
        ns, host_end, ns_end = tb.ns(i), f"es{tb.tag}h{i}", f"es{tb.tag}n{i}"
        nx = ["ip", "netns", "exec", ns]
        cmds += [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end],
            ["ip", "link", "set", ns_end, "netns", ns],
            ["ip", "link", "set", host_end, "master", br],
            ["ip", "link", "set", host_end, "up"],
            [*nx, "ip", "link", "set", ns_end, "name", "eth0"],
            [*nx, "ip", "addr", "add", f"{tb.ip(i)}/24", "dev", "eth0"],
            [*nx, "ip", "link", "set", "eth0", "up"],
            [*nx, "ip", "link", "set", "lo", "up"],
            # Egress of device i, one class per destination; unmatched traffic is unshaped.
            [*nx, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
             "default", "1"],
            [*nx, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb",
             "rate", "10gbit"],
        ]  # fmt: skip
        for j in range(tb.n):
            if j == i:
                continue
            rate = _rate(tb.bandwidth[i, j])
            cmds += [
                [*nx, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid",
                 f"1:{10 + j}", "htb", "rate", rate, "ceil", rate,
                 "burst", f"{SHAPER_BURST_BYTES}b", "cburst", f"{SHAPER_BURST_BYTES}b"],
                [*nx, "tc", "filter", "add", "dev", "eth0", "protocol", "ip", "parent", "1:",
                 "prio", "1", "u32", "match", "ip", "dst", f"{tb.ip(j)}/32", "flowid",
                 f"1:{10 + j}"],
            ]  # fmt: skip
    return cmds


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc


def _state_file(tb: Testbed) -> Path:
    return STATE_DIR / f"{tb.tag}.json"


def is_up(tb: Testbed) -> bool:
    if not _state_file(tb).is_file():
        return False
    try:
        state = json.loads(_state_file(tb).read_text())
    except ValueError:
        return False
    names = _run(["ip", "netns", "list"], check=False).stdout
    same = state.get("testbed") == tb.to_dict() and state.get("complete")
    return bool(same) and all(tb.ns(i) in names for i in range(tb.n))


def up(tb: Testbed, log=print) -> None:
    why = can_emulate_os()
    if why:
        raise TestbedError(
            f"cannot bring up testbed {tb.name!r} here: {why}; run as root on Linux, or use "
            'cluster.emulation = "transport" to emulate it inside the job'
        )
    if is_up(tb):
        log(f"testbed {tb.name} (tag {tb.tag}) is already up")
        return
    down(tb, log=lambda *_: None)  # a half-made or different earlier one
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    # Written first, so `down` knows what to remove even if `up` dies half-way.
    _state_file(tb).write_text(json.dumps({"testbed": tb.to_dict(), "complete": False}))
    try:
        for cmd in up_commands(tb):
            _run(cmd)
        write_cgroups(tb.tag, [d.memory + tb.runtime_memory for d in tb.devices])
    except (TestbedError, OSError, ValueError, subprocess.SubprocessError) as e:
        down(tb, log=lambda *_: None)
        raise TestbedError(f"testbed up failed and was rolled back: {e}") from None
    _state_file(tb).write_text(json.dumps({"testbed": tb.to_dict(), "complete": True}))
    log(f"testbed {tb.name} is up: {tb.n} devices (tag {tb.tag}, bridge {tb.bridge})")


def down(tb: Testbed, log=print) -> None:
    """Remove namespaces, links and cgroups of this testbed; quiet about what is absent."""
    removed = 0
    names = _run(["ip", "netns", "list"], check=False).stdout.split()
    for ns in [n for n in names if n.startswith(f"es{tb.tag}-")]:
        # Kill what still runs inside (a crashed job), then the namespace.
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            _run(["kill", "-9", pid], check=False)
        _run(["ip", "netns", "del", ns], check=False)
        removed += 1
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(f"es{tb.tag}"):
            _run(["ip", "link", "del", name], check=False)
    for base in (
        Path("/sys/fs/cgroup/cpu"),
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup"),
    ):
        root = base / f"edgeshard-{tb.tag}"
        if root.is_dir():
            for leaf in sorted(root.iterdir()):
                if leaf.is_dir():
                    kill_cgroup(leaf)
                    leaf.rmdir()
            root.rmdir()
    _state_file(tb).unlink(missing_ok=True)
    log(f"testbed {tb.name} is down ({removed} namespace(s) removed)")


def status(tb: Testbed) -> str:
    lines = [f"testbed {tb.name} (tag {tb.tag}): {'up' if is_up(tb) else 'down'}"]
    names = _run(["ip", "netns", "list"], check=False).stdout
    for i, d in enumerate(tb.devices):
        present = tb.ns(i) in names
        lines.append(
            f"  {i:>2} {d.name:<14} cpu {d.cpu:5.2f} cores  memory {d.memory / 2**20:7.0f} MiB  "
            f"{tb.ip(i):<15} {'ns ok' if present else 'no ns'}"
        )
    lines.append("  links (Mbit/s): " + _link_summary(tb))
    return "\n".join(lines)


def _link_summary(tb: Testbed) -> str:
    off = ~np.eye(tb.n, dtype=bool)
    mbps = tb.bandwidth[off] * 8 / 1e6
    return (
        f"min {mbps.min():.3g}, median {np.median(mbps):.3g}, max {mbps.max():.3g}; "
        f"latency {np.median(tb.latency_s[off]) * 1e3:.3g} ms (added by the transport)"
    )


def enter(tb: Testbed, index: int, argv: list[str]) -> None:
    """Become device `index`: exec argv inside its namespace. The rank joins the device's
    cgroups itself (join_cgroups) once it has started: Python and torch imports under a
    tenth of a core would add a minute to every launch and are no part of the emulation."""
    if not 0 <= index < tb.n:
        raise TestbedError(f"device {index}: the testbed has devices 0..{tb.n - 1}")
    if not is_up(tb):
        raise TestbedError(f"testbed {tb.name} is not up; run `edgeshard-mpi testbed up {tb.name}`")
    env = dict(
        os.environ,
        EDGESHARD_EMULATION="os",
        EDGESHARD_TESTBED=str(tb.path),
        EDGESHARD_DEVICE=str(index),
        EDGESHARD_CGROUPS=os.pathsep.join(str(p) for p in cgroup_dirs(tb.tag, index).values()),
        **MPI_TCP_ENV,
    )
    _setns(Path("/var/run/netns") / tb.ns(index))
    os.execvpe(argv[0], argv, env)


def _setns(path: Path) -> None:
    """Join a network namespace (setns(2)); unlike `ip netns exec` this keeps /sys, where
    the cgroups are, as it is."""
    import ctypes

    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, clone_newnet) != 0:
            raise TestbedError(f"setns({path}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


# MPICH over TCP between namespaces, never shared memory (which would bypass the links).
MPI_TCP_ENV = {
    "FI_PROVIDER": "tcp",
    "FI_TCP_IFACE": "eth0",
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    "MPIR_CVAR_NOLOCAL": "1",
}


def launch_argv(tb: Testbed, job: str, mpiexec: str, python: str, command: str = "run") -> list:
    """One mpiexec, one rank per device, each entering its device first (MPMD syntax)."""
    argv = [mpiexec]
    for i in range(tb.n):
        if i:
            argv.append(":")
        argv += [
            "-n", "1", python, "-m", "edgeshard_mpi.testbed", "enter", str(tb.path), str(i),
            "--", python, "-m", "mpi4py", "-m", "edgeshard_mpi", command, job,
        ]  # fmt: skip
    return argv


def _main(argv: list[str]) -> int:
    """`python -m edgeshard_mpi.testbed enter TESTBED INDEX -- COMMAND...` (kept off typer:
    it runs once per rank at launch and must pass COMMAND through untouched)."""
    if len(argv) < 4 or argv[0] != "enter" or "--" not in argv:
        print("usage: python -m edgeshard_mpi.testbed enter TESTBED INDEX -- COMMAND...")
        return 2
    cut = argv.index("--")
    try:
        enter(load_testbed(argv[1]), int(argv[2]), argv[cut + 1 :])
    except (TestbedError, ValueError, OSError) as e:
        print(f"error: testbed enter: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
