"""CE-CoLLM (Jin & Wu, arXiv 2411.02829) as a strategy: early exit at the edge, a cloud
context manager, quantised uploads (partition.strategy = "ce-collm", fields in
cecollm_job.py, latency model in planner/cecollm.py).

The edge (rank 0, the source) runs units [0, split) and an exit head; the cloud rank runs
[split, N). Choices made here where the paper's details were not at hand:

- The exit head is the model's own final norm + lm_head (unit N-1's weights, a second copy
  on the edge), applied to the edge's last hidden state. No head is fitted by distillation.
- Exit confidence = the exit head's max softmax probability (float32). A token exits
  (emitted at the edge, the cloud not called) when confidence >= threshold.
- Context manager: the edge keeps the hidden states of exited tokens (and of the prompt,
  when the first token exits) as pending. When a token does not exit, the edge sends every
  pending hidden state plus the current one in ONE message (a 16-byte header: first
  position, count; then the states encoded by [transport] wire); the cloud appends them to
  its KV cache at their true positions (it checks its cache length equals the first
  position, so no token's state is ever lost or doubled) and returns the full model's token
  for the last one. The cloud's cache then equals the unsplit model's over those tokens.
- Edge-standalone (`standalone = true`): every token from the exit head; the cloud holds
  its weights (the plan is the same) but is never called.
- One sequence at a time (batch 1; job.py refuses more): each token decides alone.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import emulation, watchdog
from .model import Stage, first_position
from .wire import Codec

TAG_UP, TAG_DOWN = 960, 961
HEADER_BYTES = 16  # int64 first position, int64 count (0 = shut down)


def cloud_rank(job) -> int:
    """The cloud: cluster.cloud, else the testbed's cloud device."""
    if job.cluster.cloud is not None:
        return job.cluster.cloud
    from .testbed import load_testbed

    return load_testbed(job.cluster.testbed).cloud


def needs_profile(job) -> bool:
    return job.partition.strategy == "ce-collm" and job.ce_collm.split is None


def plan_step(job, spec, devices, prof, tp):
    """planning.plan_step for ce-collm: rank 0 plans and predicts, every rank receives
    (plan, predicted, alternatives = {}, Decision)."""
    from .planner.problem import Infeasible
    from .planning import Decision, _check_memory
    from .startup import UserError, agree

    result, err = None, None
    if tp.rank == 0:
        try:
            p, predicted = plan(job, spec, prof, 1)
            if job.runtime.check_memory:  # the two stages; the edge's exit head is extra
                _check_memory(p, spec, job, devices, 1, 1)
            result = (p, predicted, {}, Decision(1, 1, job.pipeline.order, None))
        except (Infeasible, UserError) as e:
            err = str(e)
    agree(tp, err)
    return tp.bcast(result)


def plan(job, spec, prof, batch: int):
    """(Plan, predicted dict or None): edge [0, split) on rank 0, cloud [split, N)."""
    from .planner.cecollm import choose_split, predict
    from .planner.plan import Plan
    from .planner.plan import Stage as PStage
    from .planner.problem import make_problem

    cfg, n, cloud = job.ce_collm, spec.n_units, cloud_rank(job)
    prob = make_problem(prof, batch, job.profile.strategy) if prof is not None else None
    if cfg.split is None:
        pred = choose_split(prob, cloud, cfg.exit_rate, cfg.standalone)
    else:
        pred = predict(prob, cfg.split, cloud, cfg.exit_rate, cfg.standalone) if prob else None
    split = cfg.split if cfg.split is not None else pred.split
    info = {
        "threshold": cfg.threshold,
        "standalone": cfg.standalone,
        "split": split,
        "split_chosen_by": "job" if cfg.split is not None else "planner",
        "assumed_exit_rate": cfg.exit_rate,
        "exit_head": "the model's own final norm + lm_head (no distillation)",
    }
    stages = (PStage(0, 0, split), PStage(cloud, split, n))
    return Plan(stages, "ce-collm", "latency", info), (pred.to_dict() if pred else None)


class EarlyExitRuntime:
    """The ce-collm counterpart of runtime.Runtime: same constructor and run() contract
    (rank 0's RankResult holds tokens, token_time, group_start; on_group_done per prompt)."""

    def __init__(
        self,
        job,
        transport,
        stage_ranks,
        stages,
        shape,
        order,
        workload,
        device,
        record_events=True,
        wire="exact",
    ):
        from .kernels import load_stage
        from .weights import weight_source

        self.tp, self.rank, self.cfg = transport, transport.rank, job.ce_collm
        self.edge_rank, self.cloud = stage_ranks
        self.shape, self.wl, self.device = shape, workload, device
        self.codec = Codec(wire)
        self.P, self.steps = workload.prompt_tokens, workload.new_tokens
        context = self.P + self.steps
        self.stage = next(iter(stages.values())) if stages else None
        self.head = None
        self.cache = self.stage.new_cache(1, context) if self.stage is not None else None
        spec = self.stage.spec if self.stage is not None else None
        if self.rank == self.edge_rank:
            src = weight_source(job.model.source, spec, job.model.dtype, job.model.seed)
            n = spec.n_units
            self.head = load_stage(
                spec, n - 1, n, job.model.dtype, device, src, job.runtime.kernels
            )
        self.buf = None
        if self.stage is not None:
            hidden, dtype = spec.hidden_size, self.stage.dtype
            self.buf = torch.zeros(
                HEADER_BYTES + self.codec.nbytes(context, hidden, dtype), dtype=torch.uint8
            )
        self.token = torch.zeros(1, dtype=torch.int64)

    def memory_bytes(self) -> dict:
        parts = [m for m in (self.stage, self.head) if m is not None]
        return {
            "weights": sum(m.weight_bytes() for m in parts),
            "kv_cache": Stage.cache_bytes(self.cache),
            "buffers": self.buf.numel() if self.buf is not None else 0,
        }

    def run(self, t0: float, on_group_done=None):
        from .runtime import EVENT_DTYPE, RankResult

        res = RankResult(rank=self.rank, events=np.zeros(0, dtype=EVENT_DTYPE))
        if self.rank == self.edge_rank:
            self._edge(res, t0, on_group_done)
        elif self.rank == self.cloud:
            self._cloud(res)
        res.flush_s = self.tp.flush()
        res.wall_s = time.perf_counter() - t0
        res.bytes_sent, res.messages_sent = self.tp.bytes_sent, self.tp.messages_sent
        return res

    # -- the edge ------------------------------------------------------------------------

    def _edge(self, res, t0: float, on_group_done) -> None:
        g, steps, wl = self.shape.groups, self.steps, self.wl
        res.tokens = np.full((g, 1, steps), -1, dtype=np.int64)
        res.token_time = np.full((g, steps), np.nan)
        res.group_start = np.full(g, np.nan)
        exited = np.zeros((g, steps), dtype=bool)
        confidence = np.full((g, steps), np.nan, dtype=np.float32)
        pending_sent = np.zeros((g, steps), dtype=np.int32)  # states per upload (0: none)
        upload_bytes = 0
        edge_s = 0.0
        for grp in range(g):
            res.group_start[grp] = time.perf_counter() - t0
            if self.cache is not None:
                self.cache.reset()
            pending, first_pending = [], 0
            x = torch.from_numpy(wl.prompts[grp]).view(1, self.P)
            for step in range(steps):
                c0, w0 = emulation.cpu_now(), time.perf_counter()
                start = first_position(self.P, step)
                pos = torch.arange(start, start + x.shape[1]).view(1, -1)
                h = self.stage(x.to(self.device), self.cache, pos.to(self.device), start)
                logits = self.head(h, None, pos.to(self.device))  # exit head: [1, V]
                conf = float(torch.softmax(logits.float(), dim=-1).max())
                pending.append(h[0].cpu())
                exit_here = self.cfg.standalone or conf >= self.cfg.threshold
                emulation.stretch(w0, c0)
                edge_s += time.perf_counter() - w0
                confidence[grp, step] = conf
                if exit_here:
                    tok = int(logits.argmax(dim=-1))
                    exited[grp, step] = True
                else:
                    states = torch.cat(pending)  # [k, H]: every state the cloud lacks
                    upload_bytes += self._upload(first_pending, states)
                    pending_sent[grp, step] = states.shape[0]
                    req = self.tp.irecv(self.token, self.cloud, TAG_DOWN)
                    res.recv_wait_s += self.tp.sleep_wait(req)
                    tok = int(self.token[0])
                    first_pending += states.shape[0]
                    pending = []
                res.tokens[grp, 0, step] = tok
                res.token_time[grp, step] = time.perf_counter() - t0
                watchdog.beat()
                self.tp.progress()
                if wl.stop_at_eos and tok == wl.eos_id:
                    break
                x = torch.tensor([[tok]], dtype=torch.int64)
            if on_group_done is not None:
                on_group_done(grp, res)
        self._upload(0, None)  # shut the cloud's loop down
        res.compute_s = edge_s
        res.stage_compute_s = {0: edge_s}
        res.cecollm = {
            "generated": res.tokens[:, 0] >= 0,
            "exited": exited,
            "confidence": confidence,
            "pending_sent": pending_sent,
            "upload_bytes": upload_bytes,
        }

    def _upload(self, first: int, states: torch.Tensor | None) -> int:
        """One message to the cloud: header (first position, count) + encoded states."""
        count = 0 if states is None else states.shape[0]
        head = torch.tensor([first, count], dtype=torch.int64).view(torch.uint8)
        body = self.codec.encode(states) if states is not None else head[:0]
        msg = torch.cat([head, body])
        self.tp.isend(msg, self.cloud, TAG_UP)
        return msg.numel()

    # -- the cloud (its context manager) --------------------------------------------------

    def _cloud(self, res) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        spec, stage = self.stage.spec, self.stage
        calls, received, cloud_s = 0, 0, 0.0
        while True:
            req = self.tp.irecv(self.buf, self.edge_rank, TAG_UP)
            res.recv_wait_s += self.tp.sleep_wait(req, status)
            first, count = (int(v) for v in self.buf[:HEADER_BYTES].view(torch.int64))
            if count == 0:
                break
            c0, w0 = emulation.cpu_now(), time.perf_counter()
            if first == 0:  # a new sequence
                self.cache.reset()
            have = cache_length(self.cache) if self.cache is not None else first
            if have != first:  # a lost or doubled state would silently corrupt the context
                raise RuntimeError(
                    f"ce-collm cloud: cache holds {have} positions, the edge sent states "
                    f"from position {first}"
                )
            h = self.codec.decode(self.buf[HEADER_BYTES:], count, spec.hidden_size, stage.dtype)
            pos = torch.arange(first, first + count).view(1, -1).to(self.device)
            logits = stage(h.view(1, count, -1).to(self.device), self.cache, pos, first)
            self.token[0] = int(logits.argmax(dim=-1))
            emulation.stretch(w0, c0)
            cloud_s += time.perf_counter() - w0
            calls += 1
            received += count
            self.tp.isend(self.token.clone(), self.edge_rank, TAG_DOWN)
            watchdog.beat()
            self.tp.progress()
        res.compute_s = cloud_s
        res.stage_compute_s = {1: cloud_s}
        res.cecollm = {"cloud_calls": calls, "states_received": received, "cloud_s": cloud_s}


def cache_length(cache) -> int:
    """Positions a stage's static cache holds (its owned layers all agree)."""
    for layer in cache.layers:
        if layer.is_initialized:
            return int(layer.cumulative_length)
    return 0


def summary(results, cloud: int) -> dict | None:
    """The run's CE-CoLLM figures (rank 0 writes them: metrics.py, group `ce_collm`). A
    resumed run's figures cover the prompts run by this process only; None if it ran none."""
    edge, far = getattr(results[0], "cecollm", None), getattr(results[cloud], "cecollm", None)
    if edge is None or far is None:
        return None
    generated = edge["generated"]
    exits = int((edge["exited"] & generated).sum())
    n = int(generated.sum())
    return {
        "exit_rate": exits / n if n else float("nan"),
        "tokens": n,
        "exited_tokens": exits,
        "cloud_calls": int(far["cloud_calls"]),
        "states_uploaded": int(far["states_received"]),
        "bytes_uploaded": int(edge["upload_bytes"]),
        "cloud_compute_s": float(far["cloud_s"]),
        "edge_compute_s": float(results[0].compute_s),
        "exited": edge["exited"],
        "confidence": edge["confidence"],
        "states_per_upload": edge["pending_sent"],
    }


def write_group(f, rec: dict) -> None:
    """Group `ce_collm` of the run's HDF5 file: scalars as attributes, per-token arrays."""
    g = f.create_group("ce_collm")
    for k, v in rec.items():
        if not isinstance(v, np.ndarray):
            g.attrs[k] = v
    for name, units, doc in (
        ("exited", "bool", "[prompts, new_tokens] the token was emitted by the edge's exit head"),
        ("confidence", "probability", "[prompts, new_tokens] the exit head's max softmax prob"),
        (
            "states_per_upload",
            "hidden states",
            "[prompts, new_tokens] states uploaded with this token's cloud call (0: exited)",
        ),
    ):
        ds = g.create_dataset(name, data=rec[name])
        ds.attrs["units"], ds.attrs["description"] = units, doc


def log_summary(log, rec: dict | None) -> None:
    if rec is None:
        return
    log.info(
        f"ce-collm: {rec['exited_tokens']}/{rec['tokens']} tokens exited at the edge "
        f"({rec['exit_rate']:.1%}), {rec['cloud_calls']} cloud calls, "
        f"{rec['bytes_uploaded'] / 1e3:.1f} kB uploaded ({rec['states_uploaded']} hidden "
        f"states), cloud compute {rec['cloud_compute_s'] * 1e3:.1f} ms"
    )
