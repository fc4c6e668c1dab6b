"""Where a rank's time goes per decode token: wall and CPU time per phase, per rank.

Run a job through it instead of `python -m edgeshard_mpi`:

    EDGESHARD_PHASES=out/prefix mpiexec -n 4 python -m mpi4py -m edgeshard_mpi.bench.phases run JOB

Each rank writes `prefix.rank<r>.json`: for the runtime's phases (`_recv`: waiting for and
taking an input, `_compute`: a stage call with its argmax and bookkeeping, `_send`: posting
an output) the summed wall (perf_counter) and CPU time (thread_time) of decode steps (the
prefill is left out, as the ms/token figures leave it out), the whole run's, and the
scheduler's counts over the run (voluntary switches: wake-ups from sleeps; involuntary:
preemptions; migrations between cores, from /proc/thread-self/sched where the kernel has
it). Wall minus CPU within a compute is time the rank was runnable but not running (another
process had its core); CPU spent in `_recv` is the wait's polling. The wrappers cost about
1 us per phase; nothing in the runtime changes.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time

from .. import runtime as rt

_acc: dict = {}
_SCHED_KEYS = ("se.nr_migrations", "nr_voluntary_switches", "nr_involuntary_switches")


def _wrap(name: str, step_arg: int | None) -> None:
    inner = getattr(rt.Runtime, name)

    def timed(self, *args):
        w0, c0 = time.perf_counter(), time.thread_time()
        out = inner(self, *args)
        if step_arg is None or args[step_arg] > 0:  # decode steps (a send has no step)
            a = _acc.setdefault(name, [0.0, 0.0, 0])
            a[0] += time.perf_counter() - w0
            a[1] += time.thread_time() - c0
            a[2] += 1
        return out

    setattr(rt.Runtime, name, timed)


def _sched() -> dict:
    found = {}
    try:
        with open("/proc/thread-self/sched") as f:
            for line in f:
                key = line.split(":")[0].strip()
                if key in _SCHED_KEYS:
                    found[key] = float(line.split(":")[1])
    except OSError:  # no CONFIG_SCHED_DEBUG: counts from getrusage are per process
        pass
    return found


def install() -> None:
    _wrap("_compute", 2)
    _wrap("_recv", 2)
    _wrap("_send", None)
    inner_run = rt.Runtime.run

    def run(self, t0, *args, **kw):
        s0, w0, c0 = _sched(), time.perf_counter(), time.thread_time()
        res = inner_run(self, t0, *args, **kw)
        s1 = _sched()
        _acc["run"] = [time.perf_counter() - w0, time.thread_time() - c0, 1]
        _acc["sched"] = {k: s1[k] - s0[k] for k in s1 if k in s0}
        _acc["rank"] = self.rank
        return res

    rt.Runtime.run = run
    atexit.register(_dump)


def _dump() -> None:
    prefix = os.environ.get("EDGESHARD_PHASES")
    if prefix and "rank" in _acc:
        with open(f"{prefix}.rank{_acc['rank']}.json", "w") as f:
            json.dump(_acc, f)


def read(prefix: str, ranks: int) -> list[dict]:
    """The ranks' dumps of one run."""
    out = []
    for r in range(ranks):
        with open(f"{prefix}.rank{r}.json") as f:
            out.append(json.load(f))
    return out


if __name__ == "__main__":
    if not os.environ.get("EDGESHARD_PHASES"):
        sys.exit("EDGESHARD_PHASES: set it to the path prefix of the per-rank dumps")
    install()
    from ..cli import main

    sys.argv = ["edgeshard_mpi", *sys.argv[1:]]
    main()
