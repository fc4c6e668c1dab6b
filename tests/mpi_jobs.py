"""Run several job files one after the other in one MPI world (mpiexec starts Python and
imports torch and transformers once, not once per job): the family tests batch their jobs."""

import sys

from edgeshard_mpi.runner import finish, run_job

status = 0
for path in sys.argv[1:]:
    status = max(status, run_job(path))
finish(status)
