"""Run several eval jobs one after the other in one MPI world (Python, torch and
transformers start once): the slow-links tests batch their evals."""

import sys

from edgeshard_mpi.evaluate import eval_job
from edgeshard_mpi.runner import finish

status = 0
for path in sys.argv[1:]:
    status = max(status, eval_job(path))
finish(status)
