"""Does a run do what the planner predicted? A 3-device OS testbed (root), the small model,
a few tokens: profile, plan, run, and hold measured / predicted ms per token to a band.

The band is what this shared 2-core host holds every time (README, "Prediction fidelity"):
units are profiled in sequence passes (seqprofile.py), as the run calls them. One job (its
own profile, plan and run) is not enough: the profile and the run each move +-15% with the
host's other work, and on a quiet host one job read 0.86-1.25 for the one-stage plan over 8
jobs, and a CI run read 1.33. So each case runs RUNS whole jobs and holds the median ratio to
the band: a systematic error (a stage charged twice, a hop left out: 2x or more) still fails,
one noisy job does not."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from edgeshard_mpi.metrics import read_run
from edgeshard_mpi.testbed import can_emulate_os, down, launch_argv, load_testbed, up
from tests.conftest import mpiexec

BAND = (0.7, 1.3)
RUNS = 3

TESTBED = """
name = "fidelity"
source = "a"
cloud = "c"
runtime_memory = "700MiB"
[[devices]]
name = "a"
cpu = 0.25
memory = "300MiB"
[[devices]]
name = "b"
cpu = 0.25
memory = "300MiB"
[[devices]]
name = "c"
cpu = 0.5
memory = "500MiB"
[links.default]
bandwidth_mbps = 8
latency_ms = 1
[[links.pairs]]
a = "a"
b = "c"
bandwidth_mbps = 2
"""


@pytest.mark.mpi
@pytest.mark.skipif(can_emulate_os() is not None, reason=f"no OS testbed: {can_emulate_os()}")
@pytest.mark.parametrize("partition", ["edgeshard", "even"])
def test_measured_latency_follows_the_prediction(write_job, tmp_path, partition):
    path = tmp_path / "fidelity.toml"
    path.write_text(TESTBED)
    tb = load_testbed(path)
    part = {"strategy": "edgeshard", "objective": "latency"}
    if partition == "even":  # three stages: the hops and the token's return count too
        part = {"strategy": "cloud-edge-even", "objective": "latency"}
    job = write_job(
        {
            "model": {"source": "small"},
            "workload": {"tokenizer": "bytes", "prompts": 2, "new_tokens": 12},
            "partition": part,
            "profile": {"sample_layers": 1, "link_repeats": 2, "repeats": 5, "warmup": 3},
            "cluster": {"testbed": str(path)},
        }
    )
    ratios = []
    for i in range(RUNS):
        out = tmp_path / "results" / "run.h5"
        out.unlink(missing_ok=True)
        up(tb, log=lambda *_: None)
        try:
            argv = launch_argv(tb, str(job), mpiexec(), sys.executable)
            env = dict(os.environ, MPIEXEC_TIMEOUT="300")
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=360)
        finally:
            down(tb, log=lambda *_: None)
        assert proc.returncode == 0, proc.stderr
        r = read_run(out)
        measured = r["summary"]["@latency_ms_per_token"]
        predicted = r["plan"]["@predicted_ms_per_token"]
        ratios.append(measured / predicted)
        desc = r["plan"]["@description"]
        print(f"job {i}: {desc}: {measured:.1f} / {predicted:.1f} ms = {ratios[-1]:.2f}")
    median = float(np.median(ratios))
    assert BAND[0] <= median <= BAND[1], (desc, [round(x, 2) for x in ratios])
