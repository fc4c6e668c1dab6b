"""The paper bench's runs, several per MPI launch (`bench/world.py`): the runs of one model
on one testbed variant share a world, so the 15 ranks start Python, torch and transformers
once per batch rather than once per run (30-70 s of a run's time on this 2-core host, the
larger part of most runs). Each job still builds its own model, plan and output file.

A progress line is printed as each job ends (its marker `[world] run JOB: status N`); a job
the planner refuses (status 2) leaves the bench's .infeasible.json with rank 0's message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import mpiexec_path

MARKER = re.compile(r"\[world\] run (\S+?): status (-?\d+)")
BATCH = 8
"""Jobs per world at most: a failure loses at most this many runs' progress."""


@dataclass
class Item:
    exp: str
    name: str
    model: str
    partition: dict
    job: Path  # the job file
    out: Path  # the HDF5 file it writes


def world_argv(tb, jobs: list[Path], emulation: str) -> list[str]:
    py = sys.executable
    tail = [py, "-m", "mpi4py", "-m", "edgeshard_mpi.bench.world", "run", *map(str, jobs)]
    if emulation != "os":
        return [mpiexec_path(), "-n", str(tb.n), *tail]
    argv = [mpiexec_path()]
    for i in range(tb.n):
        argv += [*([":"] if i else []), "-n", "1", py, "-m", "edgeshard_mpi.testbed",
                 "enter", str(tb.path), str(i), "--", *tail]  # fmt: skip
    return argv


def run_batch(bench, tb, items: list[Item]) -> None:
    """Launch one world for `items` (one model, one testbed variant) and record each job."""
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(bench.timeout))
    t0 = last = time.time()
    log: list[str] = []
    status: dict[str, int] = {}
    order = [str(it.job) for it in items]
    done = 0  # items[:done] are recorded
    proc = subprocess.Popen(world_argv(tb, [it.job for it in items], bench.emulation),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    assert proc.stdout is not None
    used = 0  # log lines before this index belong to jobs already recorded

    def record_until(k: int) -> None:
        """Record items[done:k]: finished on rank 0 (a later job has begun and ended)."""
        nonlocal done, used, last
        while done < k:
            it = items[done]
            took, last = time.time() - last, time.time()
            # rank 0's lines of this job: it prints them before its own marker, in order
            mine = [i for i in range(used, len(log)) if "[rank 0]" in log[i]
                    and ("prompts x" in log[i] or " error" in log[i])]  # fmt: skip
            if it.out.is_file():
                mine = [i for i in mine if "prompts x" in log[i]][:1] or mine
            _record(bench, it, status.get(str(it.job), -1), took, [log[i] for i in mine[:1]])
            used = mine[0] + 1 if mine else used
            done += 1

    for line in proc.stdout:
        log.append(line)
        # 15 ranks print through one pipe: a marker may share a line with another's
        for m in MARKER.finditer(line):
            path, code = m.group(1), int(m.group(2))
            if path in order:
                status.setdefault(path, code)
                # every rank ends job k only after rank 0 ended (and wrote) job k - 1; job
                # k itself is done once rank 0 published its file
                k = order.index(path)
                record_until(k + 1 if items[k].out.is_file() else k)
    proc.wait()
    if proc.returncode == 0:
        record_until(len(items))
    if proc.returncode != 0 or done < len(items):
        left = ", ".join(it.name for it in items[done:])
        sys.exit(f"a world of {len(items)} runs failed ({proc.returncode}; not done: {left}):"
                 f"\n{''.join(log)[-6000:]}")  # fmt: skip
    bench.launches += 1
    bench.world_s += time.time() - t0


def _record(bench, it: Item, status: int, took: float, lines: list[str]) -> None:
    # The host's load when the run ended and its seconds (the first of a world carries the
    # world's start): the report states the load beside each figure.
    it.out.with_suffix(".load.json").write_text(json.dumps(
        {"load_avg_1m": os.getloadavg()[0], "seconds": took}))  # fmt: skip
    bench.seen += 1
    bench.launched += 1
    spent = time.time() - bench.t_start
    head = f"  [{bench.seen}/{bench.total}, {spent / 60:.0f} min, {bench.eta()}] {it.exp}/{it.name}"
    if status in (0, -1) and it.out.is_file():
        res = [x for x in lines if "ms/token" in x and "prompts x" in x]
        print(f"{head}: {took:.0f} s: {res[-1].split(': ', 1)[-1].strip() if res else 'done'}",
              flush=True)  # fmt: skip
    elif status == 2:
        err = [x for x in lines if "[rank 0] error" in x]
        msg = err[0].split("error: ", 1)[-1].strip() if err else "refused (status 2)"
        it.out.with_suffix(".infeasible.json").write_text(json.dumps(
            {"run": it.name, "model": it.model, "infeasible": msg,
             "partition": it.partition}))  # fmt: skip
        print(f"{head}: infeasible: {msg[:90]}", flush=True)
    else:
        sys.exit(f"{it.name} failed (status {status}):\n{''.join(lines)[-4000:]}")
    bench.done += 1


def pending_key(tb, model: str) -> tuple[Path, str]:
    return (Path(tb.path).resolve(), model)
