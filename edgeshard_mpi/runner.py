"""The SPMD job: job -> devices -> profile -> plan -> load -> infer -> metrics.

Every rank runs this. Any problem a user can fix (job file, data, checkpoint, profile,
memory) is caught on the rank that sees it, shared with all ranks, reported once by rank 0,
and every rank exits with status 2 after finalizing MPI: no hang, no traceback, no file.
"""

from __future__ import annotations

import resource
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from . import watchdog
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


def _agree(tp, err: str | None) -> None:
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


def _setup(job_path: str, tp, need_prompts: bool = True):
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
    _agree(tp, err)
    return job, spec, prompts, out


def _testbed(job: Job, tp):
    """Step 1b (testbed): an emulated device per rank, by the OS or inside the job."""
    import os

    from . import emulation
    from .testbed import TestbedError, load_testbed

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
    _agree(tp, err)
    me = tb.devices[tp.rank]
    if inside:  # tc shapes bandwidth and a CFS quota the speed; latency is ours to add
        from .cgroups import join_cgroups

        _warm_up_imports()  # transformers and torch import lazily: not under a CPU quota
        join_cgroups()
        tp.emulate_links(tb.latency_s[tp.rank], None)
        emulation.configure("os", quota=True)
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


def _devices(job: Job, tp, tb=None):
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
    _agree(tp, err)
    accels, frees = tp.allgather(accel), tp.allgather(free)
    budgets, names = {}, {}
    if tb is not None:  # the testbed's devices, unless the job overrides them
        budgets = {i: d.memory for i, d in enumerate(tb.devices)}
        names = {i: d.name for i, d in enumerate(tb.devices)}
    budgets |= {d.rank: d.memory for d in job.cluster.devices if d.memory is not None}
    names |= {d.rank: d.name for d in job.cluster.devices if d.name}
    devices = describe_devices(views, job.runtime.threads, budgets, names, accels, frees)
    torch.set_num_threads(devices[tp.rank].threads)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return devices, device


def _profile(job: Job, spec, devices, device, tp, log: Log, out: Path | None):
    """Step 3 (profile): reuse a profile file or measure; every rank gets the Profile."""
    from dataclasses import replace

    from .planner.problem import ProfileError, load_profile
    from .weights import CheckpointError

    cfg, wl = job.profile, job.workload
    if cfg.reuse is None and not needs_profile(job):
        return None
    prof, err = None, None
    if cfg.reuse is not None:
        if tp.rank == 0:
            try:
                prof = load_profile(cfg.reuse)
                _check_profile(prof, spec, job, tp.size)
            except ProfileError as e:
                err = f"profile.reuse: {e}"
        _agree(tp, err)
        prof = tp.bcast(prof)
        log.info(f"profile: reusing {cfg.reuse}")
    else:
        log.info("profile: timing every unit on every rank, then every link")
        frozen = watchdog.disturbances()
        try:
            prof = _measure(job, spec, devices, device, tp, log, cfg, wl)
        except CheckpointError as e:  # raised alike on every rank
            raise UserError(str(e)) from None
        _agree(tp, watchdog.disturbed_since(frozen))  # a stall would skew the plan
        if tp.rank == 0 and cfg.save and out is not None:
            from .outfiles import OutputError

            path = Path(cfg.save.format(output=str(out.with_suffix(""))))
            try:
                log.info(f"profile: saved {prof.save(path)}")
            except OutputError as e:  # the run goes on: the profile is also in its file
                log.info(f"note: profile not saved: {e.strerror}")
    overrides = {d.rank: d.memory for d in job.cluster.devices if d.memory is not None}
    if overrides:
        budget = prof.memory_budget.copy()
        for r, m in overrides.items():
            budget[r] = m
        prof = replace(prof, memory_budget=budget)
    cloud = job.cluster.cloud
    if cloud is None and job.cluster.testbed is not None:
        from .testbed import load_testbed

        cloud = load_testbed(job.cluster.testbed).cloud
    if cloud is not None:
        prof = replace(prof, cloud=cloud)
    return prof


def needs_profile(job: Job) -> bool:
    """A planned strategy, or a pipeline whose micro-batches the planner chooses."""
    pc = job.pipeline
    auto = pc.pipelined and (pc.micro_batches is None or pc.micro_batch_size is None)
    return job.partition.planned or auto


def _measure(job: Job, spec, devices, device, tp, log: Log, cfg, wl):
    from .profile import profile_cluster
    from .weights import weight_source

    return profile_cluster(
        tp,
        spec,
        weight_source(job.model.source, spec, job.model.dtype, job.model.seed),
        job.model.dtype,
        device,
        devices,
        job.profile_batch_sizes(),
        wl.prompt_tokens,
        wl.new_tokens,
        cfg.warmup,
        cfg.repeats,
        cfg.sample_layers,
        cfg.link_repeats,
        job.cluster.cloud,
        log.info,
        cold=cfg.cold_cache,
    )


def _check_profile(prof, spec, job: Job, world: int) -> None:
    from .planner.problem import ProfileError

    m = prof.model
    if (m.n_units, m.hidden_size, m.num_layers) != (
        spec.n_units,
        spec.hidden_size,
        spec.num_layers,
    ):
        raise ProfileError(
            f"it profiles a model with {m.num_layers} layers of width "
            f"{m.hidden_size}, the job runs {spec.num_layers} x "
            f"{spec.hidden_size}; profile this model"
        )
    if prof.n_devices != world:
        raise ProfileError(f"it describes {prof.n_devices} devices, the job runs {world} ranks")
    if prof.dtype != job.model.dtype:
        raise ProfileError(f"it was measured in {prof.dtype}, the job runs {job.model.dtype}")
    size = job.pipeline.micro_batch_size
    if size is not None:
        prof.times(size)  # raises if the batch size cannot be served
    elif not any(job.workload.prompts % b == 0 for b in prof.batch_sizes):
        raise ProfileError(
            f"none of its batch sizes {list(prof.batch_sizes)} divides workload.prompts "
            f"({job.workload.prompts}); profile other sizes or set pipeline.micro_batch_size"
        )


def _plan(job: Job, spec, devices, prof, tp, log: Log):
    """Step 4 (plan): rank 0 decides the plan (and, pipelined, the micro-batch size and how
    many are in flight) and predicts; every rank receives the decision."""
    from .planner import baselines
    from .planner.cost import evaluate
    from .planner.pipeline import choose, predict
    from .planner.plan import Plan, Stage, even_plan
    from .planner.problem import Infeasible, PlannerLimit, make_problem

    part, pc, wl = job.partition, job.pipeline, job.workload
    result, err = None, None
    if tp.rank == 0:
        try:
            fixed = None
            if part.strategy == "explicit":
                fixed = Plan(tuple(Stage(s.rank, s.start, s.end) for s in part.stages))
            elif part.strategy == "even":
                fixed = even_plan(spec.n_units, part.ranks or tuple(range(tp.size)))

            def make(prob):
                if fixed is None:
                    return baselines.make_plan(prob, part.strategy, part.objective, part.algorithm)
                return baselines.check_fits(fixed, prob) if job.runtime.check_memory else fixed

            pipe = None
            b, slots = pc.micro_batch_size, pc.micro_batches
            if prof is None:  # a fixed plan and fixed sizes: nothing to predict from
                plan, prob = fixed, None
            elif pc.pipelined:
                sizes = (b,) if b else tuple(x for x in prof.batch_sizes if wl.prompts % x == 0)
                tries = (slots,) if slots else SLOT_CANDIDATES
                choice = choose(
                    prof, wl.prompts, make, sizes, tries, pc.order, job.profile.strategy
                )
                plan, prob = choice.plan, choice.problem
                b, slots = choice.micro_batch_size, choice.micro_batches
                full = predict(plan, prob, wl.prompts // b, slots, pc.order)
                pipe = {"prediction": full.to_dict(), "candidates": choice.candidates}
            else:
                prob = make_problem(prof, b, job.profile.strategy)
                plan = make(prob)
            if job.runtime.check_memory:
                _check_memory(plan, spec, job, devices, b, slots or 1)
            predicted = evaluate(plan, prob).to_dict() if prob is not None else None
            others = {}
            if prob is not None and part.planned:
                for name, alt in baselines.plan_all(prob, part.objective, part.algorithm).items():
                    others[name] = (
                        {"error": str(alt)}
                        if isinstance(alt, Infeasible)
                        else {
                            **alt.to_dict(),
                            "description": alt.describe(),
                            "predicted": evaluate(alt, prob).to_dict(),
                        }
                    )
            if pc.pipelined and slots is None:
                slots = len(plan.stages)  # enough to keep every stage busy
            result = (plan, predicted, others, Decision(b, slots or 1, pc.order, pipe))
        except (Infeasible, PlannerLimit, UserError) as e:
            err = str(e)
    _agree(tp, err)
    return tp.bcast(result)


@dataclass(frozen=True)
class Decision:
    """How the workload is cut: sequences per micro-batch, micro-batches in flight."""

    micro_batch_size: int
    micro_batches: int
    order: str
    pipeline: dict | None = None
    """Pipelined runs: the simulator's prediction and every candidate the planner tried."""


# Micro-batches in flight the planner tries when the job leaves it to it.
SLOT_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)


def _check_memory(plan, spec, job: Job, devices, batch: int, slots: int) -> None:
    """A plan whose shard exceeds a rank's budget fails now, with the numbers, instead of
    being killed by the OS half-way through (memcheck.py: weights, KV caches, buffers,
    activations, logits; a cgroup budget is net of the runtime measured at start-up)."""
    from .memcheck import check

    wl = job.workload
    err = check(plan, spec, job.model.dtype, devices, batch, wl.prompt_tokens, wl.context, slots)
    if err:
        raise UserError(err)


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
        err = (
            f"out of memory while loading units of {plan.describe()}; give this rank "
            "fewer layers or more memory"
        )
    _agree(tp, err)
    return stages, time.perf_counter() - t0


def _infer(
    job: Job, spec, prompts, plan, stages, device, tp, log: Log, dec: Decision, out, book=None
):
    """Step 6 (infer): micro-batches of prompts walk the chain, one at a time (sequential)
    or several in flight (pipeline). Rank 0 journals each finished group (resume.py) and,
    resuming (`book`: the killed run's journal), runs only the groups it lacks."""
    from . import schedule as sch
    from .resume import Journal, ResumeError, header_for
    from .runtime import EVENT_DTYPE, RankResult, Runtime, Workload

    wl = job.workload
    b, groups = dec.micro_batch_size, wl.prompts // dec.micro_batch_size
    eos = spec.eos_token_id if wl.eos_token_id is None else wl.eos_token_id
    journal, todo, err = book, None, None
    if tp.rank == 0:
        try:
            header = header_for(job, spec, prompts.ids, b, eos)
            if book is not None:
                book.check_matches(header)
                book.reopen()
            else:
                journal, out = Journal.create(out, header)
            todo = journal.todo(groups)
        except (ResumeError, OSError) as e:
            err = str(e) if isinstance(e, ResumeError) else f"output.path: journal: {e}"
    _agree(tp, err)
    todo = tp.bcast(todo)
    if tp.rank == 0:
        what = f"{groups - len(todo)} of {groups} groups done, " if book is not None else ""
        log.info(f"journal: {journal.path} ({what}resume a killed run with --resume it)")
    shape = sch.Shape(groups=groups, slots=dec.micro_batches, steps=wl.new_tokens)
    feed = prompts.ids.reshape(groups, b, wl.prompt_tokens)[todo] if tp.rank == 0 else None
    finished = [groups - len(todo)]

    def on_group_done(group: int, res) -> None:
        try:
            journal.append(
                todo[group], res.tokens[group], res.token_time[group], res.group_start[group]
            )
        except OSError as e:  # one line, then end the job: the journal keeps what is done
            log.error(
                f"results disk: cannot journal group {todo[group]} ({e.strerror}); the "
                f"{finished[0]} group(s) finished before it are in {journal.path}: free "
                f"space, then resume with --resume {journal.path}"
            )
            time.sleep(1.0)  # let the launcher forward the line before the abort tears down
            tp.comm.Abort(EXIT_USER_ERROR)
        n = int(np.sum(res.tokens[group] >= 0))
        dt = np.nanmax(res.token_time[group]) - res.group_start[group]
        finished[0] += 1
        done = finished[0]
        if log.tty:
            log.progress(f"prompts {done * b}/{groups * b}  {n / dt:.1f} tokens/s")
        elif groups <= 64 or done % max(1, groups // 32) == 0 or done == groups:
            log.info(
                f"prompts {done * b}/{groups * b}: {n} tokens in {dt:.2f} s "
                f"({dt / max(n // b, 1) * 1e3:.1f} ms/token)"
            )

    if todo:
        runtime = Runtime(
            tp,
            [st.rank for st in plan.stages],
            stages,
            sch.Shape(groups=len(todo), slots=dec.micro_batches, steps=wl.new_tokens),
            dec.order,
            Workload(feed, b, wl.prompt_tokens, wl.new_tokens, wl.stop_at_eos, eos),
            device,
            record_events=job.output.events,
        )
        memory = runtime.memory_bytes()
        t0 = tp.sync_clock()
        res = runtime.run(t0, on_group_done)
    else:  # everything was journaled: only the file is left to write
        memory = dict.fromkeys(("weights", "kv_cache", "buffers"), 0)
        res = RankResult(rank=tp.rank, events=np.zeros(0, dtype=EVENT_DTYPE))
        if tp.rank == 0:
            res.tokens = np.zeros((0, b, wl.new_tokens), dtype=np.int64)
            res.token_time, res.group_start = np.zeros((0, wl.new_tokens)), np.zeros(0)
    if log.tty and tp.rank == 0:
        print(flush=True)
    if tp.rank == 0:
        journal.close()
        journal.merge(res, todo, groups, b, wl.new_tokens)
        res.resumed_groups = sorted(journal.done)
    res.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res.memory = memory
    return res, shape, out, journal


def _watchdog(tp):
    """The stall watchdog of this rank (watchdog.py), started before any collective."""
    import socket

    watchdog.die_with_launcher()
    wd = watchdog.Watchdog(tp.comm, watchdog.DEFAULT_LIMIT_S, socket.gethostname())
    wd.start()
    return wd


def _open_resume(path: str | None, tp):
    """--resume JOURNAL: rank 0 reads the killed run's journal (None elsewhere)."""
    from .resume import Journal, ResumeError, journal_path, output_of

    if path is None:
        return None
    book, err = None, None
    if tp.rank == 0:
        try:
            p = Path(path)
            p = p if p.name.endswith(".journal") else journal_path(p)
            if output_of(p).exists():
                raise ResumeError(f"--resume: {output_of(p)} exists: that run is complete")
            book = Journal.read(p)
        except ResumeError as e:
            err = str(e)
    _agree(tp, err)
    return book


def run_job(job_path: str, resume: str | None = None, exclude: tuple[str, ...] = ()) -> int:
    """Run one job under MPI; returns the process exit status. `resume`: the journal of a
    killed run of this job; `exclude`: device names the plan must leave out."""
    from mpi4py import MPI

    from .comm import Transport

    tp = Transport(MPI.COMM_WORLD)
    log = Log(tp.rank)
    wd = _watchdog(tp)
    try:
        job, spec, prompts, out = _setup(job_path, tp)
        wd.set_limit(watchdog.auto_limit(None, job.runtime.stall_timeout_s))
        book = _open_resume(resume, tp)
        if book is not None:
            from .resume import output_of

            out = output_of(book.path)
        tp.poll_min = job.runtime.poll_min_us * 1e-6
        tp.poll_max = job.runtime.poll_max_us * 1e-6
        if prompts is not None and prompts.note:
            log.info(f"note: {prompts.note}")
        tb, emulation = _testbed(job, tp)
        if tb is not None:
            log.info(f"testbed {tb.name}: {tb.n} devices, emulated by the {emulation}")
        watchdog.phase("devices")
        devices, device = _devices(job, tp, tb)
        from . import resume as rs

        try:
            excluded = rs.excluded_ranks(devices, exclude)
            job = rs.exclude_from_job(job, excluded, tp.size)
        except rs.ResumeError as e:  # the same verdict on every rank
            raise UserError(str(e)) from None
        watchdog.phase("profile")
        prof = rs.exclude_from_profile(_profile(job, spec, devices, device, tp, log, out), excluded)
        watchdog.phase("plan")
        plan, predicted, others, dec = _plan(job, spec, devices, prof, tp, log)
        step = (predicted or {}).get("per_token_s")
        wd.set_limit(watchdog.auto_limit(step, job.runtime.stall_timeout_s))
        log.info(f"plan ({plan.strategy}, {plan.objective}): {plan.describe()}")
        if job.pipeline.pipelined:
            pred = (dec.pipeline or {}).get("prediction")
            log.info(
                f"pipeline: {dec.micro_batches} micro-batch(es) of {dec.micro_batch_size} in "
                f"flight, {dec.order} order"
                + (f"; predicted {pred['tokens_per_s']:.1f} tokens/s" if pred else "")
            )
        elif predicted is not None:
            log.info(
                f"predicted: {predicted['per_token_s'] * 1e3:.2f} ms/token, "
                f"{predicted['tokens_per_s']:.1f} tokens/s"
            )
        watchdog.phase("load")
        stages, load_s = _load(job, spec, plan, device, tp)
        watchdog.phase("infer")
        res, shape, out, journal = _infer(
            job, spec, prompts, plan, stages, device, tp, log, dec, out, book
        )
        res.load_s = load_s
    except UserError as e:
        wd.stop()
        for line in str(e).splitlines():
            log.error(line)
        return EXIT_USER_ERROR
    except Exception:
        # A bug, not a user error: show where, and let mpi4py abort the whole job.
        print(
            f"[rank {tp.rank}] internal error:\n{traceback.format_exc()}",
            file=sys.stderr,
            flush=True,
        )
        raise
    watchdog.phase("gather")
    results = tp.gather(res)
    hosts = tp.gather(devices[tp.rank].host)
    wd.stop()  # every rank passes here; rank 0's write must not ping ranks that left
    if tp.rank != 0:
        return 0
    from .metrics import build_record, summarize, write_run

    src = results[0]
    summary = summarize(src.tokens, src.token_time, src.group_start)
    record = build_record(
        job,
        spec,
        plan,
        devices,
        prompts,
        results,
        summary,
        hosts,
        shape,
        prof,
        predicted,
        others,
        dec,
    )
    record["attrs"]["emulation"] = emulation
    if src.resumed_groups:  # groups taken from a killed run's journal (resume.py)
        record["attrs"]["resumed_groups"] = list(src.resumed_groups)
    if tb is not None:
        record["attrs"]["testbed"] = tb.to_dict()
    from .outfiles import OutputError

    try:
        written = write_run(out, record)
    except OutputError as e:
        log.error(
            f"results not written: {e.strerror}; every group is in {journal.path}: free "
            f"space, then `edgeshard-mpi run JOB --resume {journal.path}` writes the file"
        )
        return EXIT_USER_ERROR
    journal.remove()
    log.info(
        f"{job.workload.prompts} prompts x {job.workload.new_tokens} tokens, micro-batch "
        f"{dec.micro_batch_size} x {dec.micro_batches} in flight: latency "
        f"{summary['latency_ms_per_token']:.2f} ms/token, TTFT {summary['ttft_ms']:.1f} ms, "
        f"{summary['tokens_per_s']:.1f} tokens/s"
    )
    pipe = record.get("pipeline")
    if pipe and "measured_over_predicted" in pipe:
        log.info(
            f"pipeline: measured {pipe['tokens_per_s']:.1f} tokens/s = "
            f"{pipe['measured_over_predicted']:.0%} of predicted; stage busy "
            + ", ".join(f"{x:.0%}" for x in pipe["busy_fraction"])
        )
    taken = f" ({out.name} was taken by another run)" if written != out else ""
    log.info(f"wrote {written}{taken}")
    return 0


def profile_job(job_path: str, out_path: str | None) -> int:
    """`edgeshard-mpi profile JOB`: measure and save a profile, nothing else."""
    from dataclasses import replace

    from mpi4py import MPI

    from .comm import Transport

    tp = Transport(MPI.COMM_WORLD)
    log = Log(tp.rank)
    wd = _watchdog(tp)
    try:
        job, spec, _, out = _setup(job_path, tp, need_prompts=False)
        wd.set_limit(watchdog.auto_limit(None, job.runtime.stall_timeout_s))
        if out_path and Path(out_path).exists():
            raise UserError(f"--out: {out_path} already exists; profiles are never overwritten")
        tb, _ = _testbed(job, tp)
        devices, device = _devices(job, tp, tb)
        job = replace(
            job,
            profile=replace(job.profile, reuse=None, save=None),
            partition=replace(job.partition, strategy="edgeshard"),
        )
        watchdog.phase("profile")
        prof = _profile(job, spec, devices, device, tp, log, out)
        watchdog.phase("gather")
        tp.quiet_barrier()
    except UserError as e:
        wd.stop()
        for line in str(e).splitlines():
            log.error(line)
        return EXIT_USER_ERROR
    wd.stop()
    if tp.rank == 0:
        from .outfiles import OutputError

        path = Path(out_path) if out_path else out.with_suffix(".profile.json")
        try:
            path = prof.save(path, rename_ok=not out_path)
        except OutputError as e:
            log.error(f"profile not written: {e.strerror}")
            return EXIT_USER_ERROR
        log.info(f"wrote {path}")
    return 0


def finish(status: int) -> None:
    """Exit with `status`; on an error finalize MPI first, so every rank leaves cleanly
    with that status instead of an MPI_Abort per rank."""
    from mpi4py import MPI

    if status:
        MPI.Finalize()
    sys.exit(status)
