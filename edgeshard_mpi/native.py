"""The compiled decode product (resources/gemv.c), built once per host and CPU.

Built on first use with the system's C compiler (`$CC`, else `cc`/`gcc`/`clang`) into a cache
folder (`$EDGESHARD_CACHE`, else `$XDG_CACHE_HOME/edgeshard_mpi`, else
`~/.cache/edgeshard_mpi`), under a name that hashes the source, the flags, the machine and
its CPU's feature flags: hosts sharing a home directory over NFS each get their own build
for their own CPU. Ranks of one host racing to build it each write a file of their own and
rename it into place (atomic), so none loads a half-written library.

Opt-in (`EDGESHARD_NATIVE=1`): on this 2-core host the split paid in some periods and not
in others (README, "Benchmarks": a decode step of the 232 MB model 4.5-5.0 against 5.6-6.2
ms in process, and through the runtime 5.3-5.5 against 6.3 in one series, 6.5 against 6.3
in the next, while llama.cpp's two threads held 3.4 ms), so it is not the default until a
host shows it pays steadily. `gemv()` is None (and `REASON` says why) where it is off or
cannot run as built: no compiler, the build failed, a CPU without fused multiply-add
(`fmaf` would be a library call per element). kernels.py then keeps numpy's one-thread
OpenBLAS for decode products.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

SOURCE = files("edgeshard_mpi") / "resources" / "gemv.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared",
         "-pthread"]  # fmt: skip
"""-ffp-contract=off: the only fused operations are the source's fmaf (the same bits on every
CPU); -march=native: this host's vector width (retried without it where the compiler has no
such option for this architecture)."""

REASON = "not built yet"
_LIB: ctypes.CDLL | None = None
_TRIED = False


def cache_dir() -> Path:
    if os.environ.get("EDGESHARD_CACHE"):
        return Path(os.environ["EDGESHARD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeshard_mpi"


def _cpu_features() -> str:
    """The CPU's model and feature flags (x86 'flags', ARM 'Features'): part of the build's
    name, since -march=native code may not run on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in
            ("flags", "Features", "model name", "CPU part")]  # fmt: skip
    return "\n".join(dict.fromkeys(keep))


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    return cc if cc else next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)


def build() -> Path | None:
    """Path of this host's build (compiled now if absent), else None with REASON set."""
    global REASON
    src = SOURCE.read_bytes()
    parts = [src, " ".join(FLAGS).encode(), platform.machine().encode(), _cpu_features().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = cache_dir() / f"gemv-{platform.machine()}-{key}.so"
    if out.is_file():
        return out
    cc = _compiler()
    if cc is None:
        REASON = "no C compiler (set CC, or install gcc)"
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    c_file = out.with_name(f"gemv-{key}.{os.getpid()}.c")
    c_file.write_bytes(src)
    err = ""
    try:
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):
            r = subprocess.run([cc, *flags, str(c_file), "-o", str(tmp), "-lm"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
            if r.returncode == 0:
                os.replace(tmp, out)
                return out
            err = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            err = err[0]
    except (OSError, subprocess.SubprocessError) as e:
        err = str(e)
    finally:
        c_file.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    REASON = f"the build with {cc} failed: {err}"
    return None


def gemv():
    """The loaded `es_gemv(x, w, y, rows, n_in, n_out, threads)`, or None (see REASON).
    Built and loaded once per process."""
    global _LIB, _TRIED, REASON
    if _TRIED:
        return None if _LIB is None else _LIB.es_gemv
    _TRIED = True
    if os.environ.get("EDGESHARD_NATIVE", "0") != "1":
        REASON = "off (EDGESHARD_NATIVE=1 turns it on)"
        return None
    path = build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        REASON = f"{path} did not load: {e}"
        return None
    if not lib.es_hw_fma():
        REASON = "this CPU has no fused multiply-add"
        return None
    lib.es_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    lib.es_gemv.restype = ctypes.c_int
    _LIB, REASON = lib, "built"
    return lib.es_gemv
