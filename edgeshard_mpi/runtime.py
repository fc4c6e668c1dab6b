"""Walk one rank's action list: compute stages, move activations and tokens, keep timers.

Receives are posted as early as a buffer allows: each (stage, slot) has one preallocated
receive buffer, re-posted as soon as the compute that read it is done. Sends are
non-blocking and may overlap the next compute. The source rank (rank 0) owns the prompts,
records every sampled token and decides when a group stops at EOS; an empty message then
travels the chain in place of the activation and every stage skips the rest of that group.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from . import emulation, watchdog
from . import schedule as sch
from .kernels import native_decode
from .model import Stage, first_position, position_ids
from .wire import Codec

EVENT_DTYPE = np.dtype(
    [("op", "u1"), ("stage", "i2"), ("slot", "i2"), ("it", "i4"), ("t0", "f8"), ("t1", "f8")]
)
OP_CODES = {sch.RECV: 0, sch.COMPUTE: 1, sch.SEND: 2}


@dataclass
class Workload:
    """What the source feeds in: prompt ids per group, [groups, b, P] (rank 0 only)."""

    prompts: np.ndarray | None
    micro_batch: int
    prompt_tokens: int
    new_tokens: int
    stop_at_eos: bool = False
    eos_id: int = 2


@dataclass
class RankResult:
    rank: int
    compute_s: float = 0.0
    recv_wait_s: float = 0.0
    send_s: float = 0.0
    flush_s: float = 0.0
    wall_s: float = 0.0
    bytes_sent: int = 0
    messages_sent: int = 0
    actions: int = 0
    skipped: int = 0
    events: np.ndarray | None = None
    # Source rank only:
    tokens: np.ndarray | None = None
    """[groups, b, steps] generated ids, -1 after a sequence's EOS."""
    token_time: np.ndarray | None = None
    """[groups, steps] seconds from t0 when the token reached the source."""
    group_start: np.ndarray | None = None
    """[groups] seconds from t0 when the group's prefill started."""
    stage_compute_s: dict = field(default_factory=dict)
    resumed_groups: list = field(default_factory=list)
    """Source rank, resumed runs: groups whose tokens came from the journal."""


class Runtime:
    def __init__(
        self,
        transport,
        stage_ranks: list[int],
        stages: dict[int, Stage],
        shape: sch.Shape,
        order: str,
        workload: Workload,
        device: torch.device,
        record_events: bool = True,
        wire: str = "exact",
    ):
        self.tp, self.rank = transport, transport.rank
        self.stage_ranks, self.n_stages = list(stage_ranks), len(stage_ranks)
        self.stages, self.shape, self.wl = stages, shape, workload
        self.device, self.record = device, record_events
        # Activations between ranks (wire.py; exact: untouched): one codec for every hop,
        # or (wire = "auto") one per hop, the codec of the hop into stage s at [s - 1].
        hops = [wire] * (self.n_stages - 1) if isinstance(wire, str) else list(wire)
        self.codecs = [Codec("exact"), *(Codec(w) for w in hops)]  # [s]: into stage s
        self.actions = sch.build(stage_ranks, shape, order).get(self.rank, [])
        self.b, self.P = workload.micro_batch, workload.prompt_tokens
        context = workload.prompt_tokens + workload.new_tokens
        self.caches = {
            (s, j): st.new_cache(self.b, context)
            for s, st in stages.items()
            for j in range(shape.active_slots)
        }
        hidden = next(iter(stages.values())).spec.hidden_size if stages else 0
        dtype = next(iter(stages.values())).dtype if stages else torch.float32
        # One flat receive buffer per (stage, slot): prefill-sized, decode uses its head.
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}
        for s in stages:
            for j in range(shape.active_slots):
                if s == 0:
                    self.bufs[(s, j)] = torch.zeros(self.b, dtype=torch.int64)
                elif self.codecs[s].exact:
                    self.bufs[(s, j)] = torch.zeros(self.b * self.P * hidden, dtype=dtype)
                else:  # an encoded message: bytes
                    n = self.codecs[s].nbytes(self.b * self.P, hidden, dtype)
                    self.bufs[(s, j)] = torch.zeros(n, dtype=torch.uint8)
        self.positions = [
            position_ids(self.b, self.P, k).to(device) for k in range(workload.new_tokens)
        ]

    def memory_bytes(self) -> dict:
        return {
            "weights": sum(st.weight_bytes() for st in self.stages.values()),
            "kv_cache": sum(Stage.cache_bytes(c) for c in self.caches.values()),
            "buffers": sum(b.numel() * b.element_size() for b in self.bufs.values()),
        }

    # ------------------------------------------------------------------------------------

    def run(self, t0: float, on_group_done=None) -> RankResult:
        """Execute this rank's actions; times are seconds since `t0` (a shared barrier)."""
        res = RankResult(rank=self.rank)
        if self.rank == self.stage_ranks[0]:
            g, steps = self.shape.groups, self.wl.new_tokens
            res.tokens = np.full((g, self.b, steps), -1, dtype=np.int64)
            res.token_time = np.full((g, steps), np.nan)
            res.group_start = np.full(g, np.nan)
        self._res, self._t0, self._on_group_done = res, t0, on_group_done
        self._finished = (
            np.zeros((self.shape.groups, self.b), dtype=bool) if res.tokens is not None else None
        )
        self._status = MPI.Status()
        self._inputs, self._outputs, self._stopped = {}, {}, set()
        self._local: dict[tuple[int, int], deque] = {}
        self._prepare_receives()
        events = np.zeros(len(self.actions), dtype=EVENT_DTYPE) if self.record else None
        n_events = 0
        stage_compute = dict.fromkeys(self.stages, 0.0)
        for a in self.actions:
            group, step = self.shape.group_step(a.slot, a.it)
            if (a.stage, group) in self._stopped:
                res.skipped += 1
                continue
            t_start = time.perf_counter()
            if a.op == sch.RECV:
                self._recv(a, group, step)
            elif a.op == sch.COMPUTE:
                self._compute(a, group, step, t_start)
                dt = time.perf_counter() - t_start
                res.compute_s += dt
                stage_compute[a.stage] += dt
            else:
                self._send(a, self._outputs.pop((a.stage, a.slot)))
                res.send_s += time.perf_counter() - t_start
            res.actions += 1
            watchdog.beat()
            self.tp.progress()
            if events is not None:
                events[n_events] = (
                    OP_CODES[a.op],
                    a.stage,
                    a.slot,
                    a.it,
                    t_start - t0,
                    time.perf_counter() - t0,
                )
                n_events += 1
        res.flush_s = self.tp.flush()
        res.wall_s = time.perf_counter() - t0
        res.bytes_sent, res.messages_sent = self.tp.bytes_sent, self.tp.messages_sent
        res.events = events[:n_events] if events is not None else None
        res.stage_compute_s = stage_compute
        return res

    def _prepare_receives(self) -> None:
        """Queue every remote receive per channel, in consumption order; post the first."""
        self._queues: dict[tuple[int, int], deque] = {}
        for a in self.actions:
            if a.op == sch.RECV and sch.peer(a, self.stage_ranks) != self.rank:
                self._queues.setdefault((a.stage, a.slot), deque()).append(a)
        self._posted: dict[tuple[int, int], tuple] = {}
        for key in self._queues:
            self._post(key)

    def _post(self, key: tuple[int, int]) -> None:
        """Post the next receive of a channel, passing over groups already stopped."""
        q = self._queues.get(key)
        while q and (q[0].stage, self.shape.group_step(q[0].slot, q[0].it)[0]) in self._stopped:
            q.popleft()
        if q and key not in self._posted:
            a = q.popleft()
            tag = sch.channel(a, self.n_stages, self.shape.slots)
            req = self.tp.irecv(self.bufs[key], sch.peer(a, self.stage_ranks), tag)
            self._posted[key] = (a, req)

    def _recv(self, a: sch.Action, group: int, step: int) -> None:
        key = (a.stage, a.slot)
        remote = sch.peer(a, self.stage_ranks) != self.rank
        if not remote:
            msg = self._local[key].popleft()
        else:
            posted, req = self._posted.pop(key)
            assert posted == a, f"rank {self.rank}: receive order broken ({posted} != {a})"
            source = sch.peer(a, self.stage_ranks)
            self._res.recv_wait_s += self.tp.recv_wait(req, source, self._status)
            if self._status.Get_count(MPI.BYTE) == 0:
                msg = None
            else:  # a token is copied out; an activation is read in place by the compute
                msg = self.bufs[key].clone() if a.stage == 0 else self.bufs[key]
        if msg is None:  # the group was stopped upstream: pass it on, skip the rest
            self._stopped.add((a.stage, group))
            if a.stage < self.n_stages - 1:
                self._send(sch.Action(sch.SEND, a.stage, a.slot, a.it), None)
        elif a.stage == 0:
            self._token_home(a, group, step, msg.view(-1))
        else:
            self._inputs[key] = msg
        if remote and (msg is None or a.stage == 0):
            self._post(key)  # the buffer is free: a stop carries no data, a token was copied

    def _token_home(self, a: sch.Action, group: int, step: int, toks: torch.Tensor) -> None:
        """The source records a sampled token and decides whether the group goes on."""
        res, fin, last_step = self._res, self._finished[group], self.wl.new_tokens - 1
        ids = toks.numpy()
        res.tokens[group, ~fin, step] = ids[~fin]
        res.token_time[group, step] = time.perf_counter() - self._t0
        if self.wl.stop_at_eos:
            fin |= ids == self.wl.eos_id
        if step < last_step and not fin.all():
            self._inputs[(0, a.slot)] = toks.view(self.b, 1)
            return
        if step < last_step:  # every sequence hit EOS: stop the group along the chain
            self._stopped.add((0, group))
            if self.n_stages > 1:
                self._send(sch.Action(sch.SEND, 0, a.slot, a.it + 1), None)
        if self._on_group_done is not None:
            self._on_group_done(group, res)

    def _compute(self, a: sch.Action, group: int, step: int, t_start: float) -> None:
        key = (a.stage, a.slot)
        c0 = emulation.cpu_now()
        stage = self.stages[a.stage]
        if a.stage == 0 and step == 0:
            self._res.group_start[group] = t_start - self._t0
            x = torch.from_numpy(self.wl.prompts[group])  # x: [B, P] token ids
        else:
            x = self._inputs.pop(key)
            if x.dim() == 1 and a.stage > 0:  # a flat receive buffer (a local one is shaped)
                seq, hidden = (self.P if step == 0 else 1), stage.spec.hidden_size
                if x.dtype == torch.uint8:  # encoded by a lossy wire
                    x = self.codecs[a.stage].decode(x, self.b * seq, hidden, stage.dtype)
                x = x.reshape(-1)[: self.b * seq * hidden].view(self.b, seq, -1)
        cache = self.caches[key]
        if step == 0 and cache is not None:
            cache.reset()
        # A decode call's products take the rank's threads and everything else one (kernels.
        # native_decode), the sampling too: an argmax at 2 threads left torch's OpenMP
        # workers spinning beside the product's (232 MB model, 2 threads: 6.9 vs 5.9 ms).
        with native_decode(x) if stage.fast_kernels else nullcontext():
            pos, first = self.positions[step], first_position(self.P, step)
            out = stage(x.to(self.device), cache, pos, first)
            if stage.has_head:
                out = out.argmax(dim=-1)  # greedy decoding: tokens [B]
        emulation.stretch(t_start, c0)
        self._outputs[key] = out.cpu()
        if a.stage > 0:
            self._post(key)  # the receive buffer has been read

    def _send(self, a: sch.Action, payload) -> None:
        """Ship a stage's output (None = stop) to the next stage, or the token home."""
        dest = sch.peer(a, self.stage_ranks)
        dst_stage = 0 if a.stage == self.n_stages - 1 else a.stage + 1
        if dest == self.rank:
            self._local.setdefault((dst_stage, a.slot), deque()).append(payload)
            return
        tag = sch.channel(a, self.n_stages, self.shape.slots)
        if payload is None:
            self.tp.send_stop(dest, tag)
        elif a.stage < self.n_stages - 1 and not self.codecs[a.stage + 1].exact:
            self.tp.isend(self.codecs[a.stage + 1].encode(payload), dest, tag)  # never tokens
        else:
            self.tp.isend(payload, dest, tag)
