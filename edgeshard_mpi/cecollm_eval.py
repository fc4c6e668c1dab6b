"""`edgeshard-mpi eval` of a ce-collm job (evaluate.py calls these): perplexity with early
exits, and greedy generation through the early-exit runtime.

Perplexity is teacher-forced over the same strided windows as any plan: the edge (rank 0)
runs units [0, split) over the window, sends the hidden states to the cloud (encoded by the
job's wire) with the window's ids; the cloud returns the full model's NLL of every next
token; the edge scores each position with its exit head's NLL when the exit head's max
probability reaches the threshold (always in standalone mode) and with the cloud's
otherwise, as a run would have emitted it. (In a run the cloud also sees the exited
tokens' states later, so the full model's prediction at a non-exited position is the same
as here.) The exit rate over the scored tokens is returned too.
"""

from __future__ import annotations

import numpy as np
import torch

from . import watchdog
from .wire import Codec

TAG_IDS, TAG_ACT, TAG_NLL = 971, 972, 973


def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[L-1] NLL of token j+1 given logits at j (float64)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -logp.gather(1, ids[1:].view(-1, 1)).view(-1).double()


def perplexity(plan, stages, ids, wins, codec: Codec, tp, spec, window: int, job, log, head):
    """Rank 0: [W, 3] per window (summed NLL, tokens scored, tokens exited); None elsewhere."""
    cfg = job.ce_collm
    edge_rank, cloud = plan.stages[0].rank, plan.stages[-1].rank
    me = tp.rank
    if me not in (edge_rank, cloud):
        return None
    stage = stages[0] if me == edge_rank else stages[1]
    cache = stage.new_cache(1, window)
    stage.all_logits = True
    if head is not None:
        head.all_logits = True
    out = np.zeros((len(wins), 3)) if me == edge_rank else None
    try:
        for w, (begin, end, scored) in enumerate(wins):
            length = int(end - begin)
            pos = torch.arange(length).view(1, -1)
            if cache is not None:
                cache.reset()
            if me == edge_rank:
                x = torch.from_numpy(ids[begin:end])
                tp.isend(x.clone(), cloud, TAG_IDS)
                h = stage(x.view(1, -1), cache, pos, 0)
                tp.isend(codec.encode(h[0]), cloud, TAG_ACT)
                exit_logits = head(h, None, pos)[0]  # [L, V]
                exit_nll = _next_token_nll(exit_logits, x)
                conf = torch.softmax(exit_logits[:-1].float(), dim=-1).amax(dim=-1)
                cloud_nll = torch.empty(length - 1, dtype=torch.float64)
                tp.sleep_wait(tp.irecv(cloud_nll, cloud, TAG_NLL))
                exits = torch.ones_like(conf, dtype=torch.bool)
                if not cfg.standalone:
                    exits = conf >= cfg.threshold
                nll = torch.where(exits, exit_nll, cloud_nll)
                first = max(length - int(scored), 1)  # target positions first..L-1
                tail = slice(first - 1, None)
                out[w] = (float(nll[tail].sum()), length - first, int(exits[tail].sum()))
            else:
                x = torch.empty(length, dtype=torch.int64)
                tp.sleep_wait(tp.irecv(x, edge_rank, TAG_IDS))
                n = codec.nbytes(length, spec.hidden_size, stage.dtype)
                buf = torch.empty(n, dtype=torch.uint8)
                tp.sleep_wait(tp.irecv(buf, edge_rank, TAG_ACT))
                h = codec.decode(buf, length, spec.hidden_size, stage.dtype).view(1, length, -1)
                logits = stage(h, cache, pos, 0)[0]
                tp.isend(_next_token_nll(logits, x), edge_rank, TAG_NLL)
            tp.progress()
            watchdog.beat()
            if me == 0 and (w + 1) % max(1, len(wins) // 8) == 0:
                log.info(f"eval (ce-collm, {codec.wire}): {w + 1}/{len(wins)} windows")
        tp.flush()
    finally:
        stage.all_logits = False
        if head is not None:
            head.all_logits = False
    return out


def exit_head(job, spec, device, tp):
    """The edge's exit head (rank 0 only): the model's own final norm + lm_head."""
    if tp.rank != 0:
        return None
    from .kernels import load_stage
    from .weights import weight_source

    src = weight_source(job.model.source, spec, job.model.dtype, job.model.seed)
    n = spec.n_units
    return load_stage(spec, n - 1, n, job.model.dtype, device, src, job.runtime.kernels)



def generating_runtime(job, label: str):
    """(runtime class, wire) generating a ce-collm job's tokens: `label` "ce-collm" as the
    job says, "exact" with the exact wire and a threshold no token reaches (the full model)."""
    from dataclasses import replace
    from functools import partial

    from .cecollm import EarlyExitRuntime

    if label == "ce-collm":
        return partial(EarlyExitRuntime, job), job.transport.wire
    never = replace(job.ce_collm, threshold=2.0, standalone=False)
    return partial(EarlyExitRuntime, replace(job, ce_collm=never)), "exact"
