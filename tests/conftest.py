"""Shared fixtures: the public data folder, job files, and running jobs under mpiexec."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeshard_mpi import toml_out

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_DATA = os.environ.get("EDGESHARD_REQUIRE_DATA") == "1"


def data_dir() -> Path:
    return Path(os.environ.get("EDGESHARD_DATA") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public data folder; skipped where absent, a failure where CI requires it."""
    d = data_dir()
    needed = [
        "wikitext-2-raw-v1/wiki.test.raw",
        "stories260K-hf/model.safetensors",
        "llama2-tokenizer/tokenizer.model",
    ]
    missing = [p for p in needed if not (d / p).is_file()]
    if missing:
        msg = f"public data not found: {d}/{missing[0]} (set EDGESHARD_DATA)"
        if REQUIRE_DATA:
            pytest.fail(msg + "; EDGESHARD_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(msg)
    return d


def mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec (install the 'mpich' extra or a system MPI)")
    return found


@pytest.fixture
def write_job(tmp_path):
    """write_job(dict) -> path of a job file whose output goes to tmp_path/results."""

    def write(job: dict, name: str = "job.toml") -> Path:
        job = {k: (dict(v) if isinstance(v, dict) else v) for k, v in job.items()}
        job.setdefault("output", {}).setdefault("path", str(tmp_path / "results" / "run.h5"))
        path = tmp_path / name
        path.write_text(toml_out.dumps(job))
        return path

    return write


def run_mpi(
    n: int,
    job: Path,
    timeout: int = 300,
    extra_env: dict | None = None,
    args: tuple[str, ...] = ("run",),
) -> subprocess.CompletedProcess:
    """mpiexec -n N python -m mpi4py -m edgeshard_mpi run JOB, with a hard timeout."""
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(timeout), PYTHONUNBUFFERED="1", **(extra_env or {}))
    cmd = [
        mpiexec(),
        "-n",
        str(n),
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "edgeshard_mpi",
        *args,
        str(job),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout + 60, env=env, cwd=job.parent
    )
