"""Under mpiexec -n 2: run a ce-collm job's prompts through EarlyExitRuntime (cecollm.py)
and save what a test compares with the unsplit model: rank 0 the tokens and exit flags,
the cloud its KV cache after the last prompt (keys, values of its layers, its length).

    mpiexec -n 2 python -m mpi4py tests/mpi_cecollm_cache.py JOB OUT.npz
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from edgeshard_mpi import schedule as sch
from edgeshard_mpi.cecollm import EarlyExitRuntime, cache_length, plan
from edgeshard_mpi.comm import Transport
from edgeshard_mpi.kernels import load_stage
from edgeshard_mpi.runtime import Workload
from edgeshard_mpi.startup import setup
from edgeshard_mpi.weights import weight_source

job_path, out = sys.argv[1], sys.argv[2]
tp = Transport(MPI.COMM_WORLD)
job, spec, prompts, _ = setup(job_path, tp)
p, _ = plan(job, spec, None, 1)
src = weight_source(job.model.source, spec, job.model.dtype, job.model.seed)
stages = {
    i: load_stage(spec, st.start, st.end, job.model.dtype, "cpu", src, job.runtime.kernels)
    for i, st in enumerate(p.stages)
    if st.rank == tp.rank
}
wl = job.workload
feed = prompts.ids.reshape(wl.prompts, 1, wl.prompt_tokens) if tp.rank == 0 else None
rt = EarlyExitRuntime(
    job,
    tp,
    [st.rank for st in p.stages],
    stages,
    sch.Shape(groups=wl.prompts, slots=1, steps=wl.new_tokens),
    "no-bubbles",
    Workload(feed, 1, wl.prompt_tokens, wl.new_tokens),
    torch.device("cpu"),
    wire=job.transport.wire,
)
res = rt.run(tp.sync_clock())
if tp.rank == 0:
    rec = res.cecollm
    np.savez(
        out + ".edge.npz",
        prompt_ids=prompts.ids,
        tokens=res.tokens[:, 0],
        exited=rec["exited"],
        states_per_upload=rec["pending_sent"],
    )
else:
    n = cache_length(rt.cache)
    layers = rt.stage.layer_ids
    np.savez(
        out + ".cloud.npz",
        length=n,
        layers=np.array(layers),
        keys=np.stack([rt.cache.layers[i].keys[0, :, :n].numpy() for i in layers]),
        values=np.stack([rt.cache.layers[i].values[0, :, :n].numpy() for i in layers]),
    )
tp.quiet_barrier()
