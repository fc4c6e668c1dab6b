"""Steps 1 and 2 of the job: read and check the job file on every rank (rank 0 loads the
prompts and claims the output name), join the emulated testbed, describe the devices. Also
what every step shares: the user-error type, the rank-0 log, and `agree`, which turns any
rank's verdict into one message for all."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from .job import Job, JobError, load_job

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class Log:
    """All printing goes through here: rank 0 prints, others only their own errors."""

    def __init__(self, rank: int):
        self.rank = rank
        self.tty = sys.stdout.isatty()

    def info(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[rank 0] {msg}", flush=True)

    def progress(self, msg: str) -> None:
        if self.rank == 0 and self.tty:
            print(f"\r[rank 0] {msg}\x1b[K", end="", flush=True)

    def error(self, msg: str) -> None:
        if self.rank == 0:
            if self.tty:
                print(flush=True)
            print(f"[rank 0] error: {msg}", file=sys.stderr, flush=True)


def agree(tp, err: str | None) -> None:
    """Share every rank's verdict; raise UserError with the distinct messages if any."""
    errs = tp.allgather(err)
    out: list[str] = []
    for r, e in enumerate(errs):
        if e and e not in [x.split("] ", 1)[-1] for x in out]:
            out.append(f"[rank {r}] {e}" if r else e)
    if out:
        raise UserError("\n".join(out))


def output_path(job: Job) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(job.output.path.format(name=job.name, time=stamp))


def _check_writable(path: Path, fresh: bool = True) -> None:
    from .outfiles import writable_folder

    why = writable_folder(path.parent)  # creates nothing: a refused run leaves no folder
    if why:
        raise JobError(
            f"output.path: cannot write in {path.parent} ({why}); choose a writable folder"
        )
    if fresh and path.exists():
        raise JobError(
            f"output.path: {path} already exists; results are never overwritten, "
            "use {time} in the path or remove the file"
        )


def setup(job_path: str, tp, need_prompts: bool = True):
    """Step 1 (job): parse and check on every rank; rank 0 also loads the prompts."""
    from .data import load_prompts, load_tokenizer
    from .presets import resolve

    job = spec = prompts = out = None
    err = None
    try:
        job = load_job(job_path)
        try:
            spec = resolve(job.model.source)
        except ValueError as e:
            raise JobError(f"model.source: {e}") from None
        job.check_context(tp.size, spec)
        if tp.rank == 0:
            if need_prompts:
                tok = load_tokenizer(job.workload.tokenizer, job.model.source, spec.vocab_size)
                prompts = load_prompts(job.workload, tok)
            out = output_path(job)
            _check_writable(out, fresh=need_prompts)  # `profile` writes no run file
    except JobError as e:
        err = str(e)
    agree(tp, err)
    # Every command's waits (run, profile, eval) sleep as the job says, from here on.
    tp.poll_min = job.runtime.poll_min_us * 1e-6
    tp.poll_max = job.runtime.poll_max_us * 1e-6
    tp.enable_doorbells()  # receives from ranks of this host sleep until rung (wakeup.py)
    return job, spec, prompts, out


def start_testbed(job: Job, tp):
    """Step 1b (testbed): an emulated device per rank, by the OS or inside the job."""
    import os

    from . import emulation
    from .testbed import SHAPER_BURST_BYTES, TestbedError, load_testbed

    if job.cluster.testbed is None:
        return None, "none"
    tb, err = None, None
    inside = os.environ.get("EDGESHARD_EMULATION") == "os"
    try:
        tb = load_testbed(job.cluster.testbed)
        if tb.n != tp.size:
            err = (
                f"cluster.testbed: {tb.name} has {tb.n} devices but the job runs {tp.size} "
                f"rank(s); start one rank per device (mpiexec -n {tb.n})"
            )
        elif tb.source != 0:
            err = f"cluster.testbed: {tb.name}'s source must be its first device (rank 0)"
        elif job.cluster.emulation == "os" and not inside:
            err = (
                "cluster.emulation = 'os' but the ranks were not started inside the testbed; "
                f"run `edgeshard-mpi testbed up {tb.name}` and use the line that "
                f"`edgeshard-mpi testbed launch {tb.name} JOB` prints"
            )
        elif job.cluster.emulation == "transport" and inside:
            err = (
                "cluster.emulation = 'transport' but the ranks run inside the OS testbed "
                "(they would be slowed twice); use 'auto' or launch with plain mpiexec"
            )
    except TestbedError as e:
        err = f"cluster.testbed: {e}"
    agree(tp, err)
    me = tb.devices[tp.rank]
    if inside:  # tc shapes bandwidth, cgroups bound memory; latency and speed are ours
        from .cgroups import join_cgroups

        _warm_up_imports()  # transformers and torch import lazily: not under a CPU quota
        join_cgroups()
        tp.emulate_links(tb.latency_s[tp.rank], tb.bandwidth[tp.rank], SHAPER_BURST_BYTES)
        emulation.configure("os", slowdown=1.0 / me.cpu)
        return tb, "os"
    tp.emulate_links(tb.latency_s[tp.rank], tb.bandwidth[tp.rank])
    emulation.configure("transport", slowdown=1.0 / me.cpu)
    return tb, "transport"


def _warm_up_imports() -> None:
    """Run a tiny model once so every lazily imported module is loaded now."""
    import torch

    from .model import Stage, first_position, position_ids
    from .presets import resolve
    from .weights import weight_source

    spec = resolve("tiny")
    stage = Stage(spec, 0, spec.n_units, "float32", torch.device("cpu"))
    stage.load(weight_source("tiny", spec, "float32", 0))
    cache = stage.new_cache(1, 8)
    with torch.inference_mode():
        stage(
            torch.zeros(1, 4, dtype=torch.int64), cache, position_ids(1, 4, 0), first_position(4, 0)
        )
        stage(
            torch.zeros(1, 1, dtype=torch.int64), cache, position_ids(1, 4, 1), first_position(4, 1)
        )


def describe_ranks(job: Job, tp, tb=None):
    """Step 2 (devices): every rank describes itself; all get the table."""
    import torch

    from . import model  # noqa: F401  (imported now: the start-up footprint includes it)
    from .cluster import describe_devices, local_view

    view = local_view()
    use_cuda = job.runtime.device == "cuda" or (
        job.runtime.device == "auto" and torch.cuda.is_available()
    )
    views = tp.allgather(view)
    local_rank = [v["host"] for v in views[: tp.rank]].count(view["host"])
    accel, free, err = "cpu", None, None
    if use_cuda and not torch.cuda.is_available():
        err = "runtime.device = 'cuda' but this rank sees no CUDA device; use 'auto' or 'cpu'"
    elif use_cuda:
        dev = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(dev)
        accel, free = torch.cuda.get_device_name(dev), torch.cuda.mem_get_info(dev)[0]
    agree(tp, err)
    accels, frees = tp.allgather(accel), tp.allgather(free)
    budgets, names = {}, {}
    if tb is not None:  # the testbed's devices, unless the job overrides them
        budgets = {i: d.memory for i, d in enumerate(tb.devices)}
        names = {i: d.name for i, d in enumerate(tb.devices)}
    budgets |= {d.rank: d.memory for d in job.cluster.devices if d.memory is not None}
    names |= {d.rank: d.name for d in job.cluster.devices if d.name}
    # A testbed device computes on one thread: its speed is its share of one core
    # (emulation.py charges that thread's CPU time), whatever the host has.
    threads = job.runtime.threads or (1 if tb is not None else 0)
    devices = describe_devices(views, threads, budgets, names, accels, frees)
    torch.set_num_threads(devices[tp.rank].threads)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return devices, device
