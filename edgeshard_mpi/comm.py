"""MPI transport: tensors over Isend/Irecv, and waits that do not spin.

MPICH's blocking MPI_Recv (and every blocking collective) busy-polls a core. With more ranks
than cores, a waiting rank then steals the CPU from the rank that computes and the whole
chain slows several-fold. Every wait here is MPI_Test followed by a short sleep, with the
sleep backing off from `poll_min` to `poll_max`; a run's receive from a rank of the same
host sleeps until the sender rings its doorbell (recv_wait, wakeup.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import itertools
import os
import pickle
import sys
import threading
import time

import numpy as np
import torch
from mpi4py import MPI

from . import watchdog
from .wakeup import Doorbells

IDLE_WAKE_S = 20e-3
"""The longest a waiting rank sleeps between checks when nothing should wake it sooner: an
unrung doorbell wait (a safety net: senders ring) and a quiet barrier's back-off ceiling.
At 2 ms, the 14 ranks a one-stage plan leaves idle on the 15-device testbed woke ~7000
times a second on 2 cores, and its one computing rank ran 1.15-1.17x slower than profiled
(1.11-1.12 at 20 ms; README, "Not met yet", Fidelity). A missed ring or a barrier's exit
costs at most this much once, never a message."""

_PR_SET_TIMERSLACK = 29


def _tight_sleep() -> None:
    """Linux rounds short sleeps up by the timer slack (50 us by default); 1 us slack lets
    a 20 us poll interval mean 20 us."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def as_buffer(t: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a contiguous CPU tensor, in a type MPI knows."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy()


class _Pending:
    """A send an emulated link has not delivered yet: Test() is False until it is posted."""

    __slots__ = ("req",)

    def __init__(self):
        self.req = None

    def Test(self, status=None) -> bool:  # the MPI.Request interface
        req = self.req
        return req is not None and req.Test(status)


class LinkEmulator(threading.Thread):
    """Emulated links from this rank: a message to `dest` is posted (MPI Isend) only once
    it would have arrived: after latency[dest], and, when bandwidth is emulated too, after
    the bytes queued before it and its own bytes have crossed at bandwidth[dest] bytes/s.
    A thread posts it, so a rank busy computing does not hold its messages back (MPI is
    initialized with MPI_THREAD_MULTIPLE by mpi4py).

    `shaper_burst` (bytes) is set when tc already shapes the bandwidth (OS testbed). tc's
    token bucket lets its first `burst` bytes through at line rate whenever the link has
    been idle, so a decode step's few-KB activation would cross a 1 Mb/s link almost free,
    which no real 1 Mb/s link does. The emulator charges those bytes: a message waits here
    min(bytes, burst) / bandwidth after the link's previous message ended, by which time
    the bucket holds at least that much again, and tc paces the rest: the message then
    ends bytes / bandwidth after it started, as on a real link, whatever the bucket held."""

    def __init__(
        self,
        comm,
        latency: np.ndarray,
        bandwidth: np.ndarray | None,
        shaper_burst: float | None = None,
    ):
        super().__init__(daemon=True, name="edgeshard-links")
        self.comm, self.latency, self.bandwidth = comm, latency, bandwidth
        self.shaper_burst = shaper_burst
        self.on_post = None  # called with dest after each posted send (doorbells)
        self.busy = np.zeros(len(latency))
        self.heap: list = []
        self.seq = itertools.count()
        self.cond = threading.Condition()
        self.start()

    def submit(self, buf, dest: int, tag: int) -> _Pending:
        now = time.perf_counter()
        p = _Pending()
        with self.cond:
            if self.bandwidth is not None and np.isfinite(self.bandwidth[dest]):
                start = max(now, self.busy[dest])
                self.busy[dest] = start + buf.nbytes / self.bandwidth[dest]
                if self.shaper_burst is None:  # we are the link: deliver once it crossed
                    release = self.busy[dest] + self.latency[dest]
                else:  # tc is the link: charge only what its bucket would let through
                    free = min(buf.nbytes, self.shaper_burst) / self.bandwidth[dest]
                    release = start + free + self.latency[dest]
            else:
                release = now + self.latency[dest]
            heapq.heappush(self.heap, (release, next(self.seq), p, buf, dest, tag))
            self.cond.notify()
        return p

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.heap:
                    self.cond.wait()
                delay = self.heap[0][0] - time.perf_counter()
                if delay > 0:
                    self.cond.wait(timeout=delay)
                    continue
                _, _, p, buf, dest, tag = heapq.heappop(self.heap)
            p.req = self.comm.Isend(buf, dest=dest, tag=tag)
            if self.on_post is not None:
                self.on_post(dest)


class Transport:
    def __init__(self, comm: MPI.Comm, poll_min_s: float = 20e-6, poll_max_s: float = 100e-6):
        _tight_sleep()
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.poll_min, self.poll_max = poll_min_s, poll_max_s
        self._sends: list[tuple[MPI.Request, object]] = []
        self.bytes_sent = 0
        self.messages_sent = 0
        self.links: LinkEmulator | None = None
        self.bells: Doorbells | None = None
        self.bell_timeout = IDLE_WAKE_S  # a local receive's sleep before its ring (a safety net)

    def enable_doorbells(self) -> None:
        """Collective: receives from ranks of this host sleep until rung (see wakeup.py).
        EDGESHARD_DOORBELLS=0 in every rank's environment keeps the plain sleep-polls (the
        comparison of `make bench-overhead`)."""
        if os.environ.get("EDGESHARD_DOORBELLS", "1") == "0":
            return
        bells = Doorbells(self.comm)
        self.bells = bells if bells.active else None
        if self.links is not None and self.bells is not None:
            self.links.on_post = self.bells.ring

    def emulate_links(
        self,
        latency: np.ndarray,
        bandwidth: np.ndarray | None,
        shaper_burst: float | None = None,
    ) -> None:
        """Delay this rank's data messages as the testbed's links would (see testbed.py)."""
        self.links = LinkEmulator(self.comm, latency, bandwidth, shaper_burst)
        if self.bells is not None:
            self.links.on_post = self.bells.ring

    def isend_buf(self, buf, dest: int, tag: int):
        """Isend of a buffer through the (possibly emulated) link; returns a request."""
        if self.links is not None:
            return self.links.submit(buf, dest, tag)  # rung when the emulator posts it
        req = self.comm.Isend(buf, dest=dest, tag=tag)
        if self.bells is not None:
            self.bells.ring(dest)
        return req

    # -- waiting ------------------------------------------------------------------------

    def sleep_wait(self, req: MPI.Request, status: MPI.Status | None = None) -> float:
        """Wait for one request without burning a core; returns the seconds waited."""
        if req.Test(status):
            return 0.0
        t0 = time.perf_counter()
        delay = self.poll_min
        with watchdog.waiting():
            while not req.Test(status):
                time.sleep(delay)
                delay = min(delay * 2, self.poll_max)
        return time.perf_counter() - t0

    def recv_wait(self, req: MPI.Request, source: int, status: MPI.Status | None = None) -> float:
        """Wait for a receive from `source` (its sender rings, see isend_buf); returns the
        seconds waited. Until the ring, the rank sleeps in the kernel (bounded by
        `bell_timeout`); after it, or while this rank's own sends are in flight (a large
        message moves only while both sides call MPI), it polls as sleep_wait does."""
        bells = self.bells
        if bells is None or source not in bells.peers:
            return self.sleep_wait(req, status)
        if req.Test(status):
            return 0.0
        t0 = time.perf_counter()
        delay, rings = self.poll_min, 0
        rung = on_credit = bells.spare > 0  # an earlier wait may have read this one's ring
        with watchdog.waiting():
            while True:
                self.progress()
                if rung or self._sends:
                    got = bells.wait(delay)
                    delay = min(delay * 2, self.poll_max)
                else:
                    got = bells.wait(self.bell_timeout)
                rings += got
                rung |= got > 0
                if req.Test(status):
                    break
        bells.settle(rings, on_credit)
        return time.perf_counter() - t0

    def quiet_barrier(self, max_sleep_s: float = IDLE_WAKE_S) -> None:
        """A barrier that sleeps. Call before a blocking collective whose peers may still be
        busy for a long time (loading, profiling), so the collective itself is instant."""
        self.quiet_wait(self.comm.Ibarrier(), max_sleep_s)

    def quiet_wait(self, req: MPI.Request, max_sleep_s: float = IDLE_WAKE_S) -> None:
        """sleep_wait for a long wait: polls back off to `max_sleep_s`. Ranks that idle
        while another one is timed wait this way: 14 idle ranks polling every 100 us
        wake 140k times a second on a 2-core host and slow the one being timed."""
        delay = self.poll_min
        with watchdog.waiting():
            while not req.Test():
                time.sleep(delay)
                delay = min(delay * 2, max_sleep_s)

    def clock_offset(self, rounds: int = 8) -> float:
        """Seconds to add to this rank's perf_counter to read rank 0's clock.

        Barriers do not align clocks (ranks leave them a scheduler tick apart when ranks
        outnumber cores, and hosts do not share a monotonic clock), so each rank
        ping-pongs with rank 0 and keeps the round trip with the least delay (NTP's rule).
        """
        self.quiet_barrier()
        buf = np.zeros(1, dtype=np.float64)
        offset = 0.0
        for peer in range(1, self.size):
            if self.rank == 0:
                for _ in range(rounds):
                    self.sleep_wait(self.comm.Irecv(buf, source=peer, tag=0))
                    buf[0] = time.perf_counter()
                    self.sleep_wait(self.comm.Isend(buf, dest=peer, tag=0))
            elif self.rank == peer:
                best = float("inf")
                for _ in range(rounds):
                    t_send = time.perf_counter()
                    self.sleep_wait(self.comm.Isend(buf, dest=0, tag=0))
                    self.sleep_wait(self.comm.Irecv(buf, source=0, tag=0))
                    t_recv = time.perf_counter()
                    if t_recv - t_send < best:
                        best = t_recv - t_send
                        offset = float(buf[0]) - (t_send + t_recv) / 2
        return offset

    def sync_clock(self) -> float:
        """A t0 that means the same instant on every rank, in its local perf_counter."""
        offset = self.clock_offset()
        start = self.bcast(time.perf_counter() + 0.002 if self.rank == 0 else None)
        return start - offset

    # -- point to point -----------------------------------------------------------------

    def irecv(self, buf: torch.Tensor, source: int, tag: int) -> MPI.Request:
        return self.comm.Irecv(as_buffer(buf), source=source, tag=tag)

    def isend(self, t: torch.Tensor, dest: int, tag: int) -> None:
        """Non-blocking send; the tensor is kept alive until the send completes. (A blocking
        Send of >= 8 KB waits for the receiver under MPICH's rendezvous protocol.)"""
        t = t.contiguous()
        buf = as_buffer(t)
        self._sends.append((self.isend_buf(buf, dest, tag), t))
        self.bytes_sent += buf.nbytes
        self.messages_sent += 1

    def send_stop(self, dest: int, tag: int) -> None:
        """An empty message on a channel means: this group is finished (EOS)."""
        empty = np.empty(0, dtype=np.float32)
        self._sends.append((self.isend_buf(empty, dest, tag), empty))
        self.messages_sent += 1

    def progress(self) -> None:
        """Drive pending sends (MPI progresses only inside MPI calls) and drop finished ones."""
        if self._sends:
            self._sends = [(r, o) for r, o in self._sends if not r.Test()]

    def flush(self) -> float:
        waited = 0.0
        for req, _ in self._sends:
            waited += self.sleep_wait(req)
        self._sends.clear()
        return waited

    # -- small control messages (pickled; off the hot path) -----------------------------

    def gather(self, obj, root: int = 0):
        self.quiet_barrier()
        return self.comm.gather(obj, root=root)

    def bcast(self, obj, root: int = 0):
        """Broadcast after a sleeping wait: the root may take long to produce `obj`."""
        if self.rank == root:
            payload = pickle.dumps(obj)
            size = np.array([len(payload)], dtype=np.int64)
        else:
            size = np.zeros(1, dtype=np.int64)
        self.sleep_wait(self.comm.Ibcast(size, root=root))
        buf = (
            np.frombuffer(payload, dtype=np.uint8).copy()
            if self.rank == root
            else np.empty(int(size[0]), dtype=np.uint8)
        )
        self.sleep_wait(self.comm.Ibcast(buf, root=root))
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def allgather(self, obj):
        self.quiet_barrier()
        return self.comm.allgather(obj)
