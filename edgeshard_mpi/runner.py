"""The SPMD job: job -> devices -> plan -> load -> infer -> metrics. Every rank runs this.

Any problem a user can fix (job file, data, checkpoint, memory) is caught on the rank that
sees it, shared with all ranks, reported once by rank 0, and every rank exits with status 2
after finalizing MPI: no hang, no traceback, no output file.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.lib.recfunctions as rfn

from . import __version__
from .job import Job, JobError, load_job

EXIT_USER_ERROR = 2


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


def _agree(tp, err: str | None) -> list[str]:
    """Share every rank's verdict; returns the distinct errors ('[rank r] ...')."""
    errs = tp.allgather(err)
    out = []
    for r, e in enumerate(errs):
        if e and e not in [x.split("] ", 1)[-1] for x in out]:
            out.append(f"[rank {r}] {e}" if r else e)
    return out


def _fail(log: Log, errors: list[str]) -> int:
    for e in errors:
        log.error(e)
    return EXIT_USER_ERROR


def _versions() -> dict:
    import h5py
    import mpi4py
    import torch
    import transformers
    from mpi4py import MPI

    return {
        "edgeshard_mpi": __version__, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "mpi4py": mpi4py.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
    }


def output_path(job: Job) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(job.output.path.format(name=job.name, time=stamp))


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise JobError(f"output.path: cannot write in {path.parent} ({e.strerror}); choose "
                       "a writable folder") from None
    if path.exists():
        raise JobError(f"output.path: {path} already exists; results are never overwritten, "
                       "use {time} in the path or remove the file")


def _setup(job_path: str, tp, log: Log):
    """Step 1 (job): parse and check on every rank; rank 0 also loads prompts."""
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
            tok = load_tokenizer(job.workload.tokenizer, job.model.source, spec.vocab_size)
            prompts = load_prompts(job.workload, tok)
            out = output_path(job)
            _check_writable(out)
    except JobError as e:
        err = str(e)
    return job, spec, prompts, out, _agree(tp, err)


def run_job(job_path: str) -> int:
    """Run one job under MPI; returns the process exit status."""
    from mpi4py import MPI

    from .comm import Transport

    comm = MPI.COMM_WORLD
    tp = Transport(comm)
    log = Log(tp.rank)
    job, spec, prompts, out, errors = _setup(job_path, tp, log)
    if errors:
        return _fail(log, errors)
    tp.poll_min, tp.poll_max = job.runtime.poll_min_us * 1e-6, job.runtime.poll_max_us * 1e-6
    if prompts is not None and prompts.note:
        log.info(f"note: {prompts.note}")
    try:
        return _run(job, spec, prompts, out, tp, log)
    except Exception:
        # A bug, not a user error: show where, and let mpi4py abort the whole job.
        print(f"[rank {tp.rank}] internal error:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        raise


def _devices(job: Job, tp, log: Log):
    """Step 2 (devices): describe every rank; rank 0 prints the table."""
    import torch

    from .cluster import describe_devices, local_view

    view = local_view()
    use_cuda = job.runtime.device == "cuda" or (job.runtime.device == "auto"
                                                 and torch.cuda.is_available())
    views = tp.allgather(view)
    local_rank = [v["host"] for v in views[: tp.rank]].count(view["host"])
    accel, free = "cpu", None
    if use_cuda:
        if not torch.cuda.is_available():
            raise JobError("runtime.device = 'cuda' but this rank sees no CUDA device")
        dev = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(dev)
        accel, free = torch.cuda.get_device_name(dev), torch.cuda.mem_get_info(dev)[0]
    accels = tp.allgather(accel)
    frees = tp.allgather(free)
    devices = describe_devices(views, job.runtime.threads, {}, {}, accels, frees)
    me = devices[tp.rank]
    torch.set_num_threads(me.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device(
        "cpu")
    return devices, device


def _plan(job: Job, spec, tp):
    """Step 4 (plan): rank 0 decides, everyone receives the same plan."""
    from .planner.plan import Plan, Stage, even_plan

    plan = None
    if tp.rank == 0:
        part = job.partition
        if part.strategy == "explicit":
            plan = Plan(tuple(Stage(s.rank, s.start, s.end) for s in part.stages), "explicit")
        else:
            ranks = part.ranks if part.ranks is not None else tuple(range(tp.size))
            plan = even_plan(spec.n_units, ranks)
    return tp.bcast(plan)


def _load(job: Job, spec, plan, device, tp):
    """Step 5 (load): build this rank's stages from its own tensors only."""
    from .model import Stage
    from .weights import CheckpointError, weight_source

    stages, err = {}, None
    t0 = time.perf_counter()
    try:
        source = weight_source(job.model.source, spec, job.model.dtype, job.model.seed)
        for i in plan.stages_of(tp.rank):
            st = plan.stages[i]
            stage = Stage(spec, st.start, st.end, job.model.dtype, device)
            stage.load(source)
            stages[i] = stage
    except CheckpointError as e:
        err = str(e)
    except MemoryError:
        err = (f"out of memory while loading units of {plan.describe()}; give this rank "
               "fewer layers or more memory")
    return stages, time.perf_counter() - t0, err


def _run(job: Job, spec, prompts, out: Path | None, tp, log: Log) -> int:
    from . import schedule as sch
    from .metrics import summarize, write_run
    from .runtime import Runtime, Workload

    try:
        devices, device = _devices(job, tp, log)
        err = None
    except JobError as e:
        err, devices, device = str(e), None, None
    errors = _agree(tp, err)
    if errors:
        return _fail(log, errors)

    plan = _plan(job, spec, tp)
    log.info(f"plan ({plan.strategy}): {plan.describe()}")

    stages, load_s, err = _load(job, spec, plan, device, tp)
    errors = _agree(tp, err)
    if errors:
        return _fail(log, errors)

    wl = job.workload
    b = wl.batch_size
    groups = wl.prompts // b
    shape = sch.Shape(groups=groups, slots=1, steps=wl.new_tokens)
    feed = None
    if tp.rank == 0:
        feed = prompts.ids.reshape(groups, b, wl.prompt_tokens)
    runtime = Runtime(tp, [st.rank for st in plan.stages], stages, shape, "no-bubbles",
                      Workload(feed, b, wl.prompt_tokens, wl.new_tokens, wl.stop_at_eos,
                               spec.eos_token_id if wl.eos_token_id is None
                               else wl.eos_token_id),
                      device, record_events=job.output.events)
    memory = runtime.memory_bytes()

    def on_group_done(group: int, res) -> None:
        n = int(np.sum(res.tokens[group] >= 0))
        dt = np.nanmax(res.token_time[group]) - res.group_start[group]
        done = group + 1
        if log.tty:
            log.progress(f"prompts {done * b}/{groups * b}  {n / dt:.1f} tokens/s")
        elif groups <= 64 or done % max(1, groups // 32) == 0 or done == groups:
            log.info(f"prompts {done * b}/{groups * b}: {n} tokens in {dt:.2f} s "
                     f"({dt / max(n // b, 1) * 1e3:.1f} ms/token)")

    t0 = tp.sync_clock()
    res = runtime.run(t0, on_group_done)
    if log.tty and tp.rank == 0:
        print(flush=True)
    res.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res.load_s, res.memory = load_s, memory
    results = tp.gather(res)
    hosts = tp.gather(devices[tp.rank].host)
    if tp.rank != 0:
        return 0

    src = results[0]
    summary = summarize(src.tokens, src.token_time, src.group_start)
    record = collect(job, spec, plan, devices, prompts, results, summary, hosts, shape)
    write_run(out, record)
    log.info(f"{wl.prompts} prompts x {wl.new_tokens} tokens, batch {b}: "
             f"latency {summary['latency_ms_per_token']:.2f} ms/token, "
             f"TTFT {summary['ttft_ms']:.1f} ms, {summary['tokens_per_s']:.1f} tokens/s")
    log.info(f"wrote {out}")
    return 0


def collect(job: Job, spec, plan, devices, prompts, results, summary, hosts, shape) -> dict:
    """Everything rank 0 knows after the run, in the shape metrics.write_run expects."""
    from .runtime import EVENT_DTYPE

    src = results[0]
    wl = job.workload
    n_stages = len(plan.stages)
    stage_compute = np.zeros(n_stages)
    for r in results:
        for s, v in r.stage_compute_s.items():
            stage_compute[s] = v
    events = None
    if job.output.events:
        rows = [rfn.append_fields(r.events, "rank", np.full(len(r.events), r.rank, np.int16),
                                  usemask=False) for r in results if r.events is not None]
        events = (np.concatenate(rows) if rows else np.zeros(0, dtype=EVENT_DTYPE))
    return {
        "attrs": {
            "created": datetime.now().isoformat(timespec="seconds"),
            "versions": _versions(),
            "hosts": hosts,
            "world_size": len(results),
            "job_name": job.name,
            "job_path": str(job.path),
            "job_text": job.text,
            "model": spec.to_dict(),
            "dtype": job.model.dtype,
            "mode": "sequential" if shape.slots == 1 else "pipeline",
            "micro_batches": shape.slots,
        },
        "plan": {**plan.to_dict(), "description": plan.describe()},
        "devices": [d.to_dict() for d in devices],
        "workload": {
            "attrs": {"prompt_source": prompts.source, "tokenizer": prompts.tokenizer,
                      "prompt_note": prompts.note, "prompt_tokens": wl.prompt_tokens,
                      "new_tokens": wl.new_tokens, "batch_size": wl.batch_size,
                      "stop_at_eos": wl.stop_at_eos},
            "prompt_ids": prompts.ids,
            "prompt_text": list(prompts.texts),
            "generated_ids": src.tokens.reshape(-1, wl.new_tokens),
            "group_start_s": src.group_start,
            "token_time_s": src.token_time,
        },
        "ranks": {
            "compute_s": [r.compute_s for r in results],
            "recv_wait_s": [r.recv_wait_s for r in results],
            "send_s": [r.send_s for r in results],
            "flush_s": [r.flush_s for r in results],
            "wall_s": [r.wall_s for r in results],
            "load_s": [r.load_s for r in results],
            "bytes_sent": [r.bytes_sent for r in results],
            "messages_sent": [r.messages_sent for r in results],
            "actions": [r.actions for r in results],
            "weights_bytes": [r.memory["weights"] for r in results],
            "kv_cache_bytes": [r.memory["kv_cache"] for r in results],
            "buffer_bytes": [r.memory["buffers"] for r in results],
            "peak_rss_bytes": [r.peak_rss for r in results],
        },
        "stages": {"compute_s": stage_compute},
        "events": events,
        "summary": summary,
    }


def main_run(job_path: str) -> None:
    """Entry for `edgeshard-mpi run`: exit cleanly (MPI finalized) with the job's status."""
    from mpi4py import MPI

    status = run_job(job_path)
    if status:
        MPI.Finalize()  # a clean exit with status 2 instead of an MPI_Abort on every rank
    sys.exit(status)
