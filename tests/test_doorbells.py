"""Doorbells (edgeshard_mpi/wakeup.py) through mpiexec: a waiting rank sleeps in the
kernel until its sender rings, instead of waking every 20-100 us to poll MPI."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import mpiexec

ROOT = Path(__file__).resolve().parents[1]


def run(env_extra: dict) -> dict:
    env = dict(os.environ, MPIEXEC_TIMEOUT="120", **env_extra)
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py",
           str(ROOT / "tests" / "mpi_doorbells.py")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_waiting_rank_sleeps_until_rung_and_gets_its_messages():
    rung, polled = run({}), run({"EDGESHARD_DOORBELLS": "0"})
    assert rung["bells"] and not polled["bells"]
    for size in ("small", "big"):  # eager and rendezvous sizes: both arrive intact
        assert rung[size]["ok"] and polled[size]["ok"]
        assert rung[size]["waited_s"] > 0.1  # it did wait for the 0.2 s gap
    # 0.2 s of 20-100 us sleep-polls wakes the rank ~2000 times; a bell once, plus a
    # bell_timeout (IDLE_WAKE_S, 20 ms) safety-net wake-up at most every 20 ms: <= ~10,
    # plus whatever else wakes a Python MPI process. The margin absorbs a loaded host
    # (wake-ups counted are voluntary context switches).
    assert polled["small"]["wakeups"] > 400
    assert rung["small"]["wakeups"] < min(60, polled["small"]["wakeups"] / 4)
    # ...and it still wakes promptly when the message comes (not a bell_timeout later).
    assert rung["small"]["wall_s"] < 0.2 + 0.05


def test_phase_timing_driver_dumps_every_rank(write_job, tmp_path):
    """bench-stagecost's driver (edgeshard_mpi.bench.phases) runs a real job on 2 ranks and
    each rank dumps its decode phases' wall and CPU time."""
    job = write_job(
        {
            "model": {"source": "tiny", "seed": 11},
            "workload": {"tokenizer": "bytes", "prompts": 2, "batch_size": 1, "new_tokens": 6},
            "partition": {"strategy": "even"},
        }
    )
    prefix = tmp_path / "phases"
    env = dict(os.environ, MPIEXEC_TIMEOUT="120", EDGESHARD_PHASES=str(prefix))
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", "-m",
           "edgeshard_mpi.bench.phases", "run", str(job)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from edgeshard_mpi.bench import phases

    dumps = phases.read(str(prefix), 2)
    assert [d["rank"] for d in dumps] == [0, 1]
    for d in dumps:
        wall, cpu, calls = d["_compute"]
        assert calls == 2 * 5  # 2 groups x 5 decode steps (the prefill is left out)
        assert 0 < cpu <= wall * 1.05 + 1e-3
        assert d["run"][0] >= wall and d["_recv"][2] == 2 * 5
