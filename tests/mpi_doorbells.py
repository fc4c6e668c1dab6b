"""Run under mpiexec -n 2 (tests/test_doorbells.py): a rank waiting on a doorbell sleeps,
and wakes when its message is posted; prints one JSON line from rank 1."""

import json
import resource
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from edgeshard_mpi.comm import Transport

tp = Transport(MPI.COMM_WORLD)
tp.enable_doorbells()
rank, gap = tp.rank, 0.2
small, big = torch.zeros(512), torch.zeros(1 << 18)  # 2 KB (eager) and 1 MB (rendezvous)
out = {"bells": tp.bells is not None}
for name, buf in (("small", small), ("big", big)):
    tp.quiet_barrier()
    if rank == 0:
        time.sleep(gap)  # the receiver waits this long for the message
        buf.fill_(7.0)
        tp.isend(buf, 1, tag=5)
        tp.flush()
    else:
        req = tp.irecv(buf, 0, tag=5)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        waited = tp.recv_wait(req, 0)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        out[name] = {
            "waited_s": waited,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "wakeups": ru1.ru_nvcsw - ru0.ru_nvcsw,
            "ok": bool(np.all(buf.numpy() == 7.0)),
        }
tp.quiet_barrier()
if rank == 1:
    print(json.dumps(out))
    sys.stdout.flush()
