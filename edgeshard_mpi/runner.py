"""The SPMD job: job -> devices -> profile -> plan -> load -> infer -> metrics. Steps 1-2
are startup.py's, 3-4 planning.py's; loading, inference, resume and the results file are
here.

Every rank runs this. Any problem a user can fix (job file, data, checkpoint, profile,
memory) is caught on the rank that sees it, shared with all ranks, reported once by rank 0,
and every rank exits with status 2 after finalizing MPI: no hang, no traceback, no file.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from . import watchdog
from .job import Job
from .planning import Decision, plan_step, profile_step
from .startup import EXIT_USER_ERROR, Log, UserError, agree, describe_ranks, setup, start_testbed


def load_stages(job: Job, spec, plan, device, tp):
    """Step 5 (load): build this rank's stages from its own tensors only."""
    from .kernels import load_stage
    from .weights import CheckpointError, weight_source

    stages, err = {}, None
    t0 = time.perf_counter()
    try:
        source = weight_source(job.model.source, spec, job.model.dtype, job.model.seed)
        for i in plan.stages_of(tp.rank):
            st = plan.stages[i]
            stages[i] = load_stage(
                spec, st.start, st.end, job.model.dtype, device, source, job.runtime.kernels
            )
    except CheckpointError as e:
        err = str(e)
    except MemoryError:
        err = (
            f"out of memory while loading units of {plan.describe()}; give this rank "
            "fewer layers or more memory"
        )
    agree(tp, err)
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
    agree(tp, err)
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
        kind = Runtime
        if job.partition.strategy == "ce-collm":  # early exit at the edge (cecollm.py)
            from functools import partial

            from .cecollm import EarlyExitRuntime

            kind = partial(EarlyExitRuntime, job)
        runtime = kind(
            tp,
            [st.rank for st in plan.stages],
            stages,
            sch.Shape(groups=len(todo), slots=dec.micro_batches, steps=wl.new_tokens),
            dec.order,
            Workload(feed, b, wl.prompt_tokens, wl.new_tokens, wl.stop_at_eos, eos),
            device,
            record_events=job.output.events,
            wire=plan.info.get("wires", job.transport.wire),  # auto: one codec per hop
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


def start_watchdog(tp):
    """The stall watchdog of this rank (watchdog.py), started before any collective."""
    import socket

    watchdog.die_with_launcher()
    wd = watchdog.Watchdog(tp.comm, watchdog.DEFAULT_LIMIT_S, socket.gethostname())
    wd.start()
    return wd


@contextlib.contextmanager
def watched_write(tp, wd):
    """Rank 0 writes the job's file inside this block while the others wait for it in a
    sleeping barrier, every watchdog still on: a rank 0 stopped while it writes ends the job
    (exit 3, phase 'write') instead of leaving every rank in MPI_Finalize. Only after the
    barrier do the watchdogs stop, so none of them pings a rank that has left."""
    watchdog.phase("write")
    try:
        yield
    finally:
        tp.quiet_barrier()
        wd.stop()


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
    agree(tp, err)
    return book


def run_job(job_path: str, resume: str | None = None, exclude: tuple[str, ...] = ()) -> int:
    """Run one job under MPI; returns the process exit status. `resume`: the journal of a
    killed run of this job; `exclude`: device names the plan must leave out."""
    from mpi4py import MPI

    from .comm import Transport

    tp = Transport(MPI.COMM_WORLD)
    log = Log(tp.rank)
    wd = start_watchdog(tp)
    try:
        job, spec, prompts, out = setup(job_path, tp)
        wd.set_limit(watchdog.auto_limit(None, job.runtime.stall_timeout_s))
        book = _open_resume(resume, tp)
        if book is not None:
            from .resume import output_of

            out = output_of(book.path)
        if prompts is not None and prompts.note:
            log.info(f"note: {prompts.note}")
        tb, emulation = start_testbed(job, tp)
        if tb is not None:
            log.info(f"testbed {tb.name}: {tb.n} devices, emulated by the {emulation}")
        watchdog.phase("devices")
        devices, device = describe_ranks(job, tp, tb)
        from . import resume as rs

        try:
            excluded = rs.excluded_ranks(devices, exclude)
            job = rs.exclude_from_job(job, excluded, tp.size)
        except rs.ResumeError as e:  # the same verdict on every rank
            raise UserError(str(e)) from None
        watchdog.phase("profile")
        prof = rs.exclude_from_profile(
            profile_step(job, spec, devices, device, tp, log, out), excluded
        )
        watchdog.phase("plan")
        plan, predicted, others, dec = plan_step(job, spec, devices, prof, tp, log)
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
        stages, load_s = load_stages(job, spec, plan, device, tp)
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
    with watched_write(tp, wd):
        if tp.rank != 0:
            return 0
        failpoint("stop-before-write")
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
        record["attrs"]["wire"] = job.transport.wire  # activations between ranks (wire.py)
        if job.partition.strategy == "ce-collm":  # exit rate, bytes uploaded, cloud time
            from . import cecollm

            record["ce_collm"] = cecollm.summary(results, plan.stages[-1].rank)
            cecollm.log_summary(log, record["ce_collm"])
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
        if job.output.show_text:
            from .data import continuation

            generated = record["workload"]["generated_ids"][0]
            log.info(continuation(job, spec, prompts.ids[0], generated))
        taken = f" ({out.name} was taken by another run)" if written != out else ""
        log.info(f"wrote {written}{taken}")
        return 0


def failpoint(name: str) -> None:
    """EDGESHARD_FAILPOINT=NAME stops this process (SIGSTOP) at the point called NAME: how
    the tests freeze a rank at a moment too short to hit from outside."""
    if os.environ.get("EDGESHARD_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGSTOP)


def profile_job(job_path: str, out_path: str | None) -> int:
    """`edgeshard-mpi profile JOB`: measure and save a profile, nothing else."""
    from dataclasses import replace

    from mpi4py import MPI

    from .comm import Transport

    tp = Transport(MPI.COMM_WORLD)
    log = Log(tp.rank)
    wd = start_watchdog(tp)
    try:
        job, spec, _, out = setup(job_path, tp, need_prompts=False)
        wd.set_limit(watchdog.auto_limit(None, job.runtime.stall_timeout_s))
        if out_path and Path(out_path).exists():
            raise UserError(f"--out: {out_path} already exists; profiles are never overwritten")
        tb, _ = start_testbed(job, tp)
        devices, device = describe_ranks(job, tp, tb)
        job = replace(
            job,
            profile=replace(job.profile, reuse=None, save=None),
            partition=replace(job.partition, strategy="edgeshard"),
        )
        watchdog.phase("profile")
        prof = profile_step(job, spec, devices, device, tp, log, out)
        watchdog.phase("gather")
        tp.quiet_barrier()
    except UserError as e:
        wd.stop()
        for line in str(e).splitlines():
            log.error(line)
        return EXIT_USER_ERROR
    with watched_write(tp, wd):
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
