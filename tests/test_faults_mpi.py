"""Distributed faults through real mpiexec jobs: ranks stopped or killed at chosen phases,
a dead process manager, concurrent runs, resume after a kill, a memory limit, a full disk.
Each case asserts the exit status, the message, the time to exit and the files left."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeshard_mpi import toml_out, watchdog
from edgeshard_mpi.metrics import read_run
from edgeshard_mpi.resume import Journal
from tests.conftest import mpiexec

pytestmark = pytest.mark.mpi

# 6 groups of ~1 s each on 3 ranks of a 2-core host: long enough to hit a phase.
WORK = {
    "model": {"source": "small"},
    "workload": {"tokenizer": "bytes", "prompts": 6, "new_tokens": 32},
}
GROUPS = 6


def write(folder: Path, job: dict, name: str = "job") -> Path:
    job = {k: dict(v) if isinstance(v, dict) else v for k, v in job.items()}
    job.setdefault("output", {}).setdefault("path", str(folder / "results" / "run.h5"))
    path = folder / f"{name}.toml"
    path.write_text(toml_out.dumps(job))
    return path


class Job:
    """One mpiexec job in the background, its output in files we can poll."""

    def __init__(self, n: int, job: Path, *extra: str, command: str = "run", preexec=None):
        self.out, self.err = job.with_suffix(".out"), job.with_suffix(".err")
        env = dict(os.environ, MPIEXEC_TIMEOUT="240", PYTHONUNBUFFERED="1")
        cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "edgeshard_mpi"]
        cmd += [command, str(job), *extra]
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(
                cmd, stdout=o, stderr=e, env=env, cwd=job.parent, preexec_fn=preexec
            )
        self.t_end = None

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.out.read_text() + self.err.read_text():
                return
            assert self.proc.poll() is None, f"ended before {text!r}: {self.err.read_text()}"
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen in {timeout} s")

    def proxy(self) -> int:
        return int(subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()[0])  # fmt: skip

    def ranks(self) -> dict[int, int]:
        """rank -> pid, from each rank's PMI_RANK (children of the hydra proxy)."""
        kids = subprocess.run(["pgrep", "-P", str(self.proxy())], capture_output=True,
                              text=True).stdout.split()  # fmt: skip
        out = {}
        for pid in map(int, kids):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(int(v.split(b"=")[1]) for v in env if v.startswith(b"PMI_RANK="))
            out[rank] = pid
        return out

    def finish(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.t_end = time.monotonic()
        return rc

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    @property
    def stdout(self) -> str:
        return self.out.read_text()


def h5_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.h5")) + sorted(folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two runs of WORK started together with one output name (an uninterrupted run's
    tokens, twice): both must keep their results."""
    tmp = tmp_path_factory.mktemp("concurrent")
    umask = lambda: os.umask(0o022)  # noqa: E731
    jobs = [Job(1, write(tmp, WORK, name), preexec=umask) for name in ("a", "b")]
    codes = [j.finish(240) for j in jobs]
    return tmp, jobs, codes


def test_concurrent_runs_keep_both_results(reference):
    tmp, jobs, codes = reference
    assert codes == [0, 0], [j.stderr for j in jobs]
    files = h5_files(tmp)
    assert [f.name for f in files] == ["run-2.h5", "run.h5"]
    said = sorted(line.split("wrote ")[1].split()[0] for j in jobs for line in
                  j.stdout.splitlines() if "wrote " in line)  # fmt: skip
    assert said == [str(f) for f in files]
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)
    a, b = (read_run(f)["workload"]["generated_ids"] for f in files)
    assert np.array_equal(a, b)
    assert not list(tmp.rglob("*.journal"))  # removed once the file is written


@pytest.mark.parametrize("victim, phase", [(1, "infer"), (0, "infer"), (2, "profile")])
def test_stopped_rank_ends_the_job_naming_it(victim, phase, tmp_path):
    # Enough work that the stop lands in inference: 6 prompts of `small` end in ~0.8 s
    # with the fast kernels, so a stop 0.5 s after prompt 2 could land after the run
    # (then the phase is 'write', the next test's case).
    job = dict(WORK, runtime={"stall_timeout_s": 5})
    job["workload"] = dict(WORK["workload"], prompts=16, new_tokens=64)
    if phase == "profile":
        job |= {"partition": {"strategy": "edgeshard"}, "profile": {"repeats": 10}}
    run = Job(3, write(tmp_path, job))
    try:
        run.wait_for("prompts 2/" if phase == "infer" else "profile: timing")
        time.sleep(0.5)
        pid = run.ranks()[victim]
        os.kill(pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        rc = run.finish(60)
    finally:
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(pid, signal.SIGCONT)
    assert rc != 0
    assert run.t_end - t_stop <= 5 + 10, run.t_end - t_stop
    err = run.stderr
    assert err.count("stall:") == 1, err
    assert f"stall: rank {victim} (host {socket.gethostname()})" in err
    assert f"in phase '{phase}'" in err and "Traceback" not in err
    assert not h5_files(tmp_path)


def _stopped_pid(run: Job, rank: int, timeout: float = 120) -> int:
    """Wait until `rank` of the job is in the stopped state (T); its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.proc.poll() is None, run.stderr
        with contextlib.suppress(IndexError, KeyError, StopIteration, OSError):
            pid = run.ranks()[rank]
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                return pid
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} not stopped in {timeout} s")


def test_rank_0_stopped_while_writing_the_results_ends_the_job(tmp_path, monkeypatch):
    # The last moment of a run: every rank has gathered, rank 0 is about to write. The
    # failpoint stops it there (SIGSTOP), a window of ~0.1 s too short to hit from outside.
    monkeypatch.setenv("EDGESHARD_FAILPOINT", "stop-before-write")
    job = dict(WORK, runtime={"stall_timeout_s": 5})
    job["workload"] = dict(WORK["workload"], prompts=1, new_tokens=4)
    run = Job(3, write(tmp_path, job))
    pid = None
    try:
        pid = _stopped_pid(run, 0)
        t_stop = time.monotonic()
        rc = run.finish(60)
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(pid, signal.SIGCONT)
    assert rc != 0
    assert run.t_end - t_stop <= 5 + 10, run.t_end - t_stop
    err = run.stderr
    assert err.count("stall:") == 1, err
    assert f"stall: rank 0 (host {socket.gethostname()})" in err
    assert "in phase 'write'" in err and "Traceback" not in err
    assert not h5_files(tmp_path)


def test_profiler_refuses_a_measurement_a_stop_disturbed(tmp_path):
    job = dict(WORK, partition={"strategy": "edgeshard"}, profile={"repeats": 10})
    run = Job(3, write(tmp_path, job))
    run.wait_for("profile: timing")
    time.sleep(0.5)
    pid = run.ranks()[1]
    os.kill(pid, signal.SIGSTOP)
    time.sleep(watchdog.FROZEN_GAP_S + 2)
    os.kill(pid, signal.SIGCONT)
    rc = run.finish(120)
    assert rc == 2, run.stderr
    assert "stopped or starved" in run.stderr and "profile again" in run.stderr
    assert run.stderr.count("error:") == 1 and "Traceback" not in run.stderr
    assert "plan (" not in run.stdout  # refused before planning with it
    assert not h5_files(tmp_path) and not (tmp_path / "results").exists()


def test_killed_run_resumes_without_the_dead_device(reference, tmp_path):
    run = Job(3, write(tmp_path, WORK))
    run.wait_for("prompts 3/")
    os.kill(run.ranks()[2], signal.SIGKILL)
    t_kill = time.monotonic()
    assert run.finish(60) != 0
    assert run.t_end - t_kill < 10
    assert not h5_files(tmp_path)
    journal = tmp_path / "results" / "run.h5.journal"
    done = sorted(Journal.read(journal).done)
    assert 3 <= len(done) < GROUPS
    # The device is gone: resume on two ranks; only the missing groups run.
    again = Job(2, write(tmp_path, WORK, "again"), "--resume", str(journal))
    assert again.finish(240) == 0, again.stderr
    assert f"{len(done)} of {GROUPS} groups done" in again.stdout
    r = read_run(tmp_path / "results" / "run.h5")
    assert r["@resumed_groups"] == done and r["@world_size"] == 2
    expected = read_run(h5_files(reference[0])[0])["workload"]["generated_ids"]
    assert np.array_equal(r["workload"]["generated_ids"], expected)
    assert not journal.exists()


def test_dead_process_manager_leaves_no_results(tmp_path):
    run = Job(3, write(tmp_path, WORK))
    run.wait_for("prompts 2/")
    ranks = run.ranks()
    os.kill(run.proxy(), signal.SIGKILL)
    t_kill = time.monotonic()
    assert run.finish(60) != 0
    assert run.t_end - t_kill < 10
    time.sleep(0.5)
    alive = [p for p in ranks.values() if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]  # fmt: skip
    assert not alive  # every rank died with its proxy
    assert not h5_files(tmp_path)


CGROUP = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(
    os.geteuid() != 0 or not (CGROUP / "memory.limit_in_bytes").exists(),
    reason="needs root and cgroup v1 memory",
)
def test_memory_limited_run_is_refused_before_loading(shared_data, tmp_path):
    """A 256 x 256-token batch under a 2 GiB cgroup limit: weights and KV cache (0.65 GB)
    fit, the prefill's activations do not; refused before anything is loaded."""
    group = CGROUP / f"edgeshard-faults-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(2 * 2**30))
        job = {
            "model": {"source": "small"},
            "workload": {
                "dataset": str(shared_data / "wikitext-2-raw-v1" / "wiki.test.raw"),
                "tokenizer": "bytes", "prompts": 256, "batch_size": 256,
                "prompt_tokens": 256, "new_tokens": 8,
            },
        }  # fmt: skip
        t0 = time.monotonic()
        procs = group / "cgroup.procs"
        run = Job(1, write(tmp_path, job), preexec=lambda: procs.write_text(str(os.getpid())))
        rc = run.finish(120)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        with contextlib.suppress(OSError):
            time.sleep(0.5)
            group.rmdir()
    assert rc == 2, run.stderr
    err = run.stderr
    assert "activations" in err and "(cgroup after the runtime's own memory" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert time.monotonic() - t0 < 60
    assert peak < 1.0e9  # nothing was loaded: the weights + KV cache alone are 0.65 GB
    assert not (tmp_path / "results").exists()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
@pytest.mark.parametrize("size, lost", [("4k", "journal"), ("24k", "file")])
def test_full_disk_loses_at_most_the_group_in_progress(size, lost, reference, tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, size):
        pytest.skip("cannot mount tmpfs here")
    try:
        run = Job(2, write(tmp_path, dict(WORK, output={"path": str(disk / "run.h5")})))
        rc = run.finish(240)
        err = run.stderr
        journal = disk / "run.h5.journal"
        done = sorted(Journal.read(journal).done)
        saved = tmp_path / "saved"
        saved.mkdir()
        shutil.copy(journal, saved / journal.name)
        left = sorted(p.name for p in disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)  # lazy: a dying rank may hold it
    assert rc == 2, err
    assert "Traceback" not in err and err.count("error:") == 1
    assert "No space left on device" in err and str(journal) in err and "--resume" in err
    assert left == ["run.h5.journal"]  # no partial HDF5, no temporary file
    if lost == "journal":  # mid-run: the groups before the failing one are kept
        assert f"{len(done)} group(s) finished before it" in err and 1 <= len(done) < GROUPS
        return  # (resuming is test_killed_run_resumes_without_the_dead_device)
    assert "results not written" in err and done == list(range(GROUPS))
    # Space freed (the journal moved to a roomy disk): the resume writes the file.
    again = Job(2, write(tmp_path, WORK, "again"), "--resume", str(saved / "run.h5.journal"))
    assert again.finish(240) == 0, again.stderr
    expected = read_run(h5_files(reference[0])[0])["workload"]["generated_ids"]
    got = read_run(saved / "run.h5")["workload"]["generated_ids"]
    assert np.array_equal(got, expected)
