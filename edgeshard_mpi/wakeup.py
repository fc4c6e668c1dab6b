"""Doorbells: a rank waiting for a message from a rank on its own host sleeps in the kernel
until the sender rings, instead of waking every 20-100 us to poll MPI.

MPICH's blocking receive busy-polls a core, so the runtime's waits test the request and
sleep between tests (comm.py). On the 2-core host of the benchmarks that polling woke the
waiting ranks ~90 / ~320 times per token on the 232 MB model at 2 / 4 ranks, burned 1.3 /
3.5 ms of CPU per token and raised the computing ranks' own CPU time by ~1.1-1.4 ms per
extra rank (`make bench-stagecost`, README). Here each rank owns a named FIFO; after
posting a send to a rank of the same host, the sender writes one byte into the receiver's
FIFO, and a waiting rank blocks in select() on its FIFO (no CPU at all while it waits) and
tests its request when woken. A ring may be for another message or may come before its
data can be taken (a large message needs the sender's progress), so once rung a wait polls
as before (select() with a backing-off timeout, so a further ring still wakes it at once),
and an unrung wait is bounded too (Transport.bell_timeout), a safety net. Ranks on other
hosts are never rung; their receivers keep the plain sleeping poll.
"""

from __future__ import annotations

import contextlib
import os
import select
import tempfile
import uuid

from mpi4py import MPI

SPARE_CAP = 16
"""Spare rings kept (see settle). A ring read by an earlier wait may be a later message's;
that message's wait then polls instead of sleeping, else a large message (which moves only
while both sides call MPI) could sleep a whole bell_timeout per step. Stale rings (from
messages that completed without a wait, e.g. the profiler's) make at most this many later
waits poll, as every wait did before the bells. Rings carry no message identity, so the
count is a guess either way; a wrong guess costs time (a poll, or a bounded sleep), never
a message."""


class Doorbells:
    """This rank's FIFO (read end) and the write ends of its host peers' FIFOs."""

    def __init__(self, comm: MPI.Comm):
        """Collective over `comm`. Every rank ends up with working bells or none: a rank
        whose FIFO cannot be made or opened turns them off on every rank."""
        self.rank = comm.Get_rank()
        self.fd: int | None = None
        self.peers: dict[int, int] = {}  # world rank -> write fd of its FIFO
        self.spare = 0  # rings read by earlier waits that were not for their message
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            world = local.allgather(self.rank)
            tag = local.bcast(uuid.uuid4().hex[:12] if local.Get_rank() == 0 else None)
            path = os.path.join(tempfile.gettempdir(), f"edgeshard-bell-{tag}-{{}}")
            ok = True
            try:
                os.mkfifo(path.format(self.rank), 0o600)
                # O_RDWR: opening never blocks, and a write end stays open on our side.
                self.fd = os.open(path.format(self.rank), os.O_RDWR | os.O_NONBLOCK)
            except OSError:
                ok = False
            ok = local.allreduce(ok, op=MPI.LAND)
            if ok:
                try:
                    for r in world:
                        if r != self.rank:
                            self.peers[r] = os.open(path.format(r), os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    ok = False
            local.Barrier()  # every peer has opened our FIFO: the name can go
            with contextlib.suppress(OSError):
                os.unlink(path.format(self.rank))
            # The whole job agrees, so no receiver waits on a bell nobody rings.
            if not comm.allreduce(ok, op=MPI.LAND):
                self.close()
        finally:
            local.Free()

    @property
    def active(self) -> bool:
        return self.fd is not None

    def ring(self, dest: int) -> None:
        """Tell `dest` (if on this host) that a message to it was posted."""
        fd = self.peers.get(dest)
        if fd is not None:
            with contextlib.suppress(BlockingIOError):  # full: it will wake anyway
                os.write(fd, b"\1")

    def wait(self, timeout_s: float) -> int:
        """Sleep until rung or `timeout_s`; consume every ring that arrived; their number."""
        r, _, _ = select.select((self.fd,), (), (), timeout_s)
        if not r:
            return 0
        try:
            return len(os.read(self.fd, 65536))
        except BlockingIOError:
            return 0

    def settle(self, rings: int, on_credit: bool) -> None:
        """A wait for one message ended, having read `rings` rings; `on_credit`: it began
        on a spare ring. A ring it read is taken for its own (so stale spares decay, one
        per wait), the others for later messages'."""
        self.spare = min(self.spare - on_credit + max(rings - 1, 0), SPARE_CAP)

    def close(self) -> None:
        for fd in self.peers.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.peers.clear()
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
