"""Stall watchdog: a job whose chain stops making progress ends, naming the rank to blame.

A rank that is stopped (SIGSTOP, a frozen VM, a hung driver) never fails: its peers wait on
it forever. So every rank runs a small thread that

- answers "are you alive?" pings from other ranks on its own communicator (a Dup of the
  world, so it never mixes with data messages), with its phase, how long ago it last made
  progress and how busy its CPU is;
- when this rank has seen no progress of its own for `limit` seconds, pings every rank. A
  rank that misses PING_ROUNDS pings of PING_WAIT_S each is stalled. If every rank answers, each is
  waiting on a message and none has progressed within the limit, the job is deadlocked
  and the rank idle longest is blamed. If some rank is working (outside a wait: a long
  plan, a slow layer), all is well and the check repeats later;
- the lowest-numbered live rank prints one line naming the stalled rank, its host and the
  phase, and aborts the job (MPI_Abort kills stopped processes too); the others defer to
  it (and check again later, in case it went silent too), so the message is printed once.

Progress is `beat()` (every action of the runtime, every profiled unit) and `phase()`.
The thread also notices when this process itself was frozen (its 0.25 s tick arrived
seconds late, or SIGCONT was delivered): `disturbances()` counts those, and the profiler
refuses timings taken across one.

Under a process manager (hydra, Open MPI), each rank also asks the kernel for SIGTERM when
its parent (the proxy) dies, and exits without leaving a file: a run whose launcher died is
reported by the launcher as failed, so its results must not look complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

PING, PONG = 30001, 30002
TICK_S = 0.25
PING_WAIT_S = 3.0
PING_ROUNDS = 2
FROZEN_GAP_S = 4.0
"""A tick this late means the process was stopped or starved. Not lower: on a host running
four ranks on two cores beside other work, ticks were seen 1.5 s late with nothing stopped."""
DEFAULT_LIMIT_S = 300.0
"""Before the plan predicts a step time (devices, profiling, loading)."""
AUTO_FLOOR_S = 120.0
AUTO_STEPS = 20.0
EXIT_STALL = 3

_PR_SET_PDEATHSIG = 1
_state = {"beat": time.monotonic(), "phase": "start", "phase_t": 0.0, "waiting": 0}
_disturbed = [0]


def beat() -> None:
    """This rank made progress (cheap: one store; call it freely)."""
    _state["beat"] = time.monotonic()


@contextlib.contextmanager
def waiting():
    """The main thread waits on a message (comm.py): only then can it be part of a stall;
    outside a wait it is computing, however long that takes."""
    _state["waiting"] += 1
    try:
        yield
    finally:
        _state["waiting"] -= 1


def phase(name: str) -> None:
    _state["phase"], _state["phase_t"] = name, time.monotonic()
    beat()


def disturbances() -> int:
    """How many times this process was seen frozen (stopped, starved) so far."""
    return _disturbed[0]


def disturbed_since(count: int) -> str | None:
    """A message if this process was frozen since disturbances() was `count`."""
    n = disturbances() - count
    if n <= 0:
        return None
    return (
        f"profile: this rank was stopped or starved {n} time(s) while timing (SIGSTOP, a "
        f"frozen host, or no CPU for over {FROZEN_GAP_S:g} s); the measurement is refused "
        "rather than planned with; profile again on a quiet cluster"
    )


def auto_limit(step_s: float | None, given: float | None) -> float:
    """The job's runtime.stall_timeout_s, or 20 predicted steps with a 120 s floor."""
    if given is not None:
        return given
    if step_s is None or not step_s > 0:
        return DEFAULT_LIMIT_S
    return max(AUTO_FLOOR_S, AUTO_STEPS * step_s)


def _on_sigcont(signum, frame) -> None:
    _disturbed[0] += 1


def _on_sigterm(signum, frame) -> None:
    """The launcher (or a user) ended this rank: leave no half-written file, exit now (MPI
    cannot finalize once the proxy is gone)."""
    from .outfiles import abandon

    abandon()
    os._exit(128 + signum)


def die_with_launcher() -> None:
    """Under a process manager, SIGTERM this rank when its parent (the proxy) dies."""
    launched = any(
        k in os.environ for k in ("PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        with contextlib.suppress(ValueError, AttributeError):
            signal.signal(signal.SIGCONT, _on_sigcont)
    if launched and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() == 1:  # the parent died before prctl: we are an orphan already
                _on_sigterm(signal.SIGTERM, None)


class Watchdog(threading.Thread):
    """Call on every rank, at the same point (Dup and the host table are collective)."""

    def __init__(self, comm, limit_s: float, host: str):
        super().__init__(daemon=True, name="edgeshard-watchdog")
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.hosts = self.comm.allgather(host)
        self.limit = limit_s
        self._halt = threading.Event()
        self._round = 0
        self._sends: list = []
        self._seen: dict[int, tuple[float, dict]] = {}
        """Each rank's last answer and when: the phase of a rank that went silent."""
        beat()

    def set_limit(self, limit_s: float) -> None:
        self.limit = limit_s

    def stop(self) -> None:
        """Stop before MPI_Finalize (collective: call after a barrier every rank passes)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
        with contextlib.suppress(Exception):
            for r in self._sends:
                r.Cancel() if not r.Test() else None
            self.comm.Free()

    # -- the thread ---------------------------------------------------------------------

    @staticmethod
    def _state() -> dict:
        return {
            "age": time.monotonic() - _state["beat"],
            "phase": _state["phase"],
            "waiting": _state["waiting"] > 0,
        }

    def _answer(self) -> None:
        from mpi4py import MPI

        st = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=PING, status=st):
            src = st.Get_source()
            rnd = self.comm.recv(source=src, tag=PING)
            self._sends.append(self.comm.isend((rnd, self._state()), dest=src, tag=PONG))
        self._sends = [r for r in self._sends if not r.Test()]

    def run(self) -> None:
        last = time.monotonic()
        next_check = 0.0
        while not self._halt.wait(TICK_S):
            now = time.monotonic()
            if now - last > FROZEN_GAP_S:
                _disturbed[0] += 1
            last = now
            try:
                self._answer()
                idle = now - _state["beat"]
                if now >= next_check and idle > self.limit and _state["waiting"]:
                    deferred = self._check()
                    # A deferring rank waits longer: the reporter may be killing the job.
                    pause = max(2.0, self.limit / 4) + (15.0 if deferred else 0.0)
                    next_check = time.monotonic() + pause
            except Exception:  # MPI torn down under us: the job is ending anyway
                return

    def _ping(self, ranks: list[int], answers: dict) -> None:
        """Ping `ranks`; add the answers that arrive within PING_WAIT_S to `answers`."""
        from mpi4py import MPI

        self._round += 1
        rnd = self._round
        self._sends += [self.comm.isend(rnd, dest=r, tag=PING) for r in ranks]
        st = MPI.Status()
        deadline = time.monotonic() + PING_WAIT_S
        while (
            any(r not in answers for r in ranks)
            and time.monotonic() < deadline
            and not self._halt.is_set()
        ):
            self._answer()
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=PONG, status=st):
                src = st.Get_source()
                got_round, state = self.comm.recv(source=src, tag=PONG)
                self._seen[src] = (time.monotonic(), state)
                if got_round == rnd:
                    answers[src] = state
            time.sleep(0.05)

    def _check(self) -> bool:
        """Ping everyone; end the job if it is stalled. True: this rank deferred to the
        reporter (check again later)."""
        answers = {self.rank: self._state()}
        others = [r for r in range(self.size) if r != self.rank]
        # A busy host can delay an answer: a rank is silent only after PING_ROUNDS misses.
        for _ in range(PING_ROUNDS):
            self._ping([r for r in others if r not in answers], answers)
            if len(answers) == self.size:
                break
        if self._halt.is_set():
            # stop() came during the pings: this rank passed the closing barrier, so every
            # rank did, and a silent one has only stopped its own watchdog.
            return False
        silent = [r for r in others if r not in answers]
        working = [r for r, s in answers.items() if s["age"] < self.limit or not s["waiting"]]
        if not silent and working:
            return False  # someone is computing: not a stall
        if min(answers) != self.rank:
            return True  # the lowest live rank reports: one message, not one per rank
        if silent:
            culprit = silent[0]
            wait = PING_ROUNDS * PING_WAIT_S
            what = f"stopped answering (no reply in {wait:.0f} s)"
            # Phases end in collectives, so the silent rank is in this rank's phase, unless
            # it answered since this rank entered it (then its own word is newer).
            seen_t, seen = self._seen.get(culprit, (0.0, None))
            ph = seen["phase"] if seen and seen_t > _state["phase_t"] else _state["phase"]
        else:
            culprit = max(answers, key=lambda r: answers[r]["age"])
            what = "and every other rank made no progress"
            ph = answers[culprit]["phase"]
        idle = answers[self.rank]["age"]
        print(
            f"[rank {self.rank}] error: stall: rank {culprit} (host {self.hosts[culprit]}) "
            f"{what} in phase '{ph}'; no progress for {idle:.0f} s "
            f"(runtime.stall_timeout_s = {self.limit:g}); ending the job",
            file=sys.stderr,
            flush=True,
        )
        from .outfiles import abandon

        abandon()
        time.sleep(0.5)  # let the launcher forward the line before the abort tears down
        self.comm.Abort(EXIT_STALL)
        return False
