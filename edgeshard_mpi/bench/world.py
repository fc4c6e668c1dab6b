"""Run several job files one after the other in one MPI world (Python, torch and
transformers start once per launch, not once per job): the slow-links benchmark's runner.

    mpiexec -n N python -m mpi4py -m edgeshard_mpi.bench.world run|eval JOB...

A job refused with status 2 (an infeasible plan) is reported by rank 0 and leaves no file;
the next job runs. The world exits 0 once every job was tried.
"""

import sys

from ..evaluate import eval_job
from ..runner import run_job

command, jobs = sys.argv[1], sys.argv[2:]
step = {"run": run_job, "eval": eval_job}[command]
for path in jobs:
    print(f"[world] {command} {path}: status {step(path)}", flush=True)
