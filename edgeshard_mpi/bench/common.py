"""What the benchmarks share: launching jobs under mpiexec and reading their results."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .. import toml_out
from ..metrics import read_run


def mpiexec_path() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        sys.exit("no mpiexec found: install the 'mpich' extra or a system MPI")
    return found


def data_dir() -> Path | None:
    d = Path(os.environ.get("EDGESHARD_DATA", "../shared/data"))
    return d if (d / "wikitext-2-raw-v1" / "wiki.test.raw").is_file() else None


def run_job(
    n: int,
    job: dict,
    path: Path,
    mpi_args: tuple[str, ...] = (),
    env: dict | None = None,
    timeout: int = 1800,
    module: str = "edgeshard_mpi",
) -> dict:
    """Write `job` to `path`, run it on n ranks, return the run file's contents. `module`:
    what mpi4py runs (e.g. edgeshard_mpi.bench.phases, which times the runtime's phases)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_out.dumps(job))
    out = Path(job["output"]["path"])
    out.unlink(missing_ok=True)
    # A journal left by a killed earlier run would make this run keep it and write to a
    # new name (outfiles.py never replaces): the bench owns its folder, so start clean.
    Path(f"{out}.journal").unlink(missing_ok=True)
    cmd = [
        mpiexec_path(),
        *mpi_args,
        "-n",
        str(n),
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        module,
        "run",
        str(path),
    ]
    full_env = dict(os.environ, MPIEXEC_TIMEOUT=str(timeout), **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if proc.returncode != 0:
        sys.exit(f"job {path} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return read_run(out)


def median(xs) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
