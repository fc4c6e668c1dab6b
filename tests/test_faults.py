"""Bad input and faults: every case ends with one clear message, the right exit status, in
bounded time, leaving no file behind (or, for a killed run, a journal that resumes it).

Cheap bad-input cases share one process: `edgeshard-mpi run` (runner.run_job, the same code
path mpiexec runs, as a singleton MPI world) is called once per job file, and the other
commands run in-process through typer. The distributed faults (stopped, killed ranks, a
dead proxy, concurrent runs, resume, memory limits, a full disk) run real mpiexec jobs of a
tiny model (tests/test_faults_mpi.py).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeshard_mpi import toml_out
from edgeshard_mpi.cli import app
from edgeshard_mpi.outfiles import OutputError, publish
from edgeshard_mpi.resume import Journal

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"source": "tiny"},
    "workload": {"tokenizer": "bytes", "prompts": 2, "new_tokens": 4},
}


def _job(**sections) -> dict:
    job = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            job.setdefault(key, {}).update(value)
        else:
            job[key] = value
    return job


def _bad_profile(kind: str, folder: Path) -> Path:
    text = resources.files("edgeshard_mpi").joinpath("resources/profiles/paper-llama2-7b.json")
    d = json.loads(text.read_text())
    first = next(iter(d["device_types"].values()))
    first["prefill_s"][0]["layer"] = -0.01 if kind == "negative" else math.nan
    path = folder / f"{kind}.json"
    path.write_text(json.dumps(d))
    return path


def _files(tmp: Path) -> dict[str, Path]:
    """Bad files of every kind a job can point at."""
    binary = tmp / "binary.raw"
    binary.write_bytes(bytes(range(256)) * 64)
    sp = tmp / "tokenizer.model"
    sp.write_bytes(b"\x0a\x05garbage, not a protobuf" * 10)
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    journal = tmp / "x.h5.journal"
    journal.write_bytes(b"\x00\x01 not a journal")
    other = tmp / "other.h5.journal"  # a journal of a different workload
    j, _ = Journal.create(tmp / "other.h5", {"prompts_digest": "0" * 64, "new_tokens": 99})
    j.close()
    taken = tmp / "taken.profile.json"
    taken.write_text("{}")
    return {
        "binary": binary,
        "sp": sp,
        "model": model,
        "journal": journal,
        "other": other,
        "taken": taken,
        "negative": _bad_profile("negative", tmp),
        "nan": _bad_profile("nan", tmp),
    }


# (id, job sections, extra args or None, message parts); "{binary}" etc. are files above.
RUN_CASES = [
    ("threads", _job(runtime={"threads": 100000}), None, ["runtime.threads", "1024"]),
    (
        "poll",
        _job(runtime={"poll_min_us": 1e8, "poll_max_us": 1e8}),
        None,
        ["runtime.poll_min_us", "out of range"],
    ),
    (
        "template-typo",
        _job(output={"path": "{root}/{nme}.h5"}),
        None,
        ["output.path", "{nme}", "{name}"],
    ),
    (
        "template-positional",
        _job(output={"path": "{root}/{0}.h5"}),
        None,
        ["output.path", "positional"],
    ),
    (
        "template-brace",
        _job(output={"path": "{root}/{.h5"}),
        None,
        ["output.path", "not a valid template"],
    ),
    ("seed", _job(workload={"seed": -1}), None, ["workload.seed", "out of range"]),
    ("name-escapes", _job(name="../../.."), None, ["name:", "no '/' or '..'"]),
    (
        "eos-negative",
        _job(workload={"stop_at_eos": True, "eos_token_id": -1}),
        None,
        ["workload.eos_token_id = -1", "never stop"],
    ),
    (
        "eos-huge",
        _job(workload={"stop_at_eos": True, "eos_token_id": 99999999}),
        None,
        ["workload.eos_token_id = 99999999", "never stop"],
    ),
    (
        "binary-dataset",
        _job(workload={"dataset": "{binary}"}),
        None,
        ["workload.dataset", "not a UTF-8 text file"],
    ),
    (
        "garbage-tokenizer",
        _job(workload={"tokenizer": "{sp}"}),
        None,
        ["workload.tokenizer", "not a SentencePiece model"],
    ),
    (
        "config-missing-key",
        _job(model={"source": "{model}"}),
        None,
        ["model.source", "missing 'num_attention_heads'", "incomplete"],
    ),
    (
        "profile-negative",
        _job(
            model={"source": "llama2-7b"},
            partition={"strategy": "edgeshard"},
            profile={"reuse": "{negative}"},
        ),
        None,
        ["profile.reuse", "times must be >= 0"],
    ),
    (
        "profile-nan",
        _job(
            model={"source": "llama2-7b"},
            partition={"strategy": "edgeshard"},
            profile={"reuse": "{nan}"},
        ),
        None,
        ["profile.reuse", "is nan"],
    ),
    (
        "profile-save-template",
        _job(profile={"save": "{outptu}.json"}),
        None,
        ["profile.save", "{outptu}"],
    ),
    (
        "stall-timeout",
        _job(runtime={"stall_timeout_s": 0}),
        None,
        ["runtime.stall_timeout_s", "out of range"],
    ),
    # Weights + KV cache (2.2 MB) fit 4 MB; the prefill's activations (6 MB) do not.
    (
        "memory-activations",
        _job(
            workload={"prompts": 16, "batch_size": 16, "prompt_tokens": 64, "new_tokens": 8},
            cluster={"devices": [{"rank": 0, "memory": "4MB"}]},
        ),
        None,
        ["rank 0", "activations", "memory budget is", "(job)", "smaller batch"],
    ),
    ("resume-garbage", _job(), ["--resume", "{journal}"], ["--resume", "not an edgeshard"]),
    ("resume-other-job", _job(), ["--resume", "{other}"], ["--resume", "differ"]),
    ("exclude-source", _job(), ["--exclude", "SRC"], ["--exclude", "source"]),
    ("exclude-unknown", _job(), ["--exclude", "nope"], ["--exclude nope", "no such device"]),
    ("profile-out-taken", _job(), ["profile", "{taken}"], ["--out", "already exists"]),
]

BATCH = textwrap.dedent(
    """
    import contextlib, io, json, sys, time
    from pathlib import Path
    from edgeshard_mpi import runner
    from edgeshard_mpi.cluster import local_view

    out = {}
    for case in json.loads(Path(sys.argv[1]).read_text()):
        err = io.StringIO()
        args = [a.replace("SRC", f"{local_view()['host']}/r0") for a in case["args"]]
        t0 = time.monotonic()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if args[:1] == ["profile"]:
                rc = runner.profile_job(case["job"], args[1])
            else:
                kw = dict(zip(args[0::2], args[1::2]))
                rc = runner.run_job(case["job"], kw.get("--resume"),
                                    tuple(v for k, v in kw.items() if k == "--exclude"))
        out[case["id"]] = {"rc": rc, "stderr": err.getvalue(), "s": time.monotonic() - t0}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def run_batch(tmp_path_factory):
    """Every RUN_CASES job through runner.run_job in one process; {id: rc, stderr, s}."""
    tmp = tmp_path_factory.mktemp("faults")
    files = _files(tmp)
    cases = []
    for cid, job, args, _ in RUN_CASES:
        root = tmp / cid
        root.mkdir()
        job = json.loads(json.dumps(job).replace("{root}", str(root / "results")))
        for k, p in files.items():
            job = json.loads(json.dumps(job).replace("{" + k + "}", str(p)))
        job.setdefault("output", {}).setdefault("path", str(root / "results" / "run.h5"))
        path = root / "job.toml"
        path.write_text(toml_out.dumps(job))
        args = [files[a[1:-1]].as_posix() if a[1:-1] in files else a for a in args or []]
        cases.append({"id": cid, "job": str(path), "args": args})
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    script = tmp / "batch.py"
    script.write_text(BATCH)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(script), str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("cid, message", [(c[0], c[3]) for c in RUN_CASES])
def test_bad_run_input_exits_2_with_one_message(cid, message, run_batch):
    tmp, results = run_batch
    r = results[cid]
    assert r["rc"] == 2, r
    for part in message:
        assert part in r["stderr"], (part, r["stderr"])
    assert r["stderr"].count("error:") == 1 and "Traceback" not in r["stderr"]
    assert r["s"] < 30
    assert not (tmp / cid / "results").exists()  # not even an empty folder


# -- the other commands, in-process ------------------------------------------------------


def _cli(*args: str):
    t0 = time.monotonic()
    res = CliRunner().invoke(app, list(args))
    return res, time.monotonic() - t0


@pytest.fixture
def bad(tmp_path):
    return _files(tmp_path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("hosts-binary", "is not a text file"),
        ("hosts-huge-slots", "99999999999999999999 slots"),
        ("hosts-negative-n", "-n -1"),
        ("plan-negative", "times must be >= 0"),
        ("plan-nan", "is nan"),
        ("plan-binary", "not a JSON profile"),
        ("report-binary", "no run files"),
        ("report-not-hdf5", "no run files"),
        ("testbed-missing-job", "not found"),
        ("testbed-bad-command", "--command"),
        ("testbed-binary-file", "not a valid TOML text file"),
        ("plan-batch-negative", "batch size -1"),
        ("schedule-huge", "at most 100000 actions"),
    ],
)
def test_bad_command_input_exits_2(case, message, bad, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:99999999999999999999\n")
    (tmp_path / "run.h5").write_bytes(b"\x89HDF not really")
    args = {
        "hosts-binary": ["hosts", str(bad["binary"])],
        "hosts-huge-slots": ["hosts", str(hostfile)],
        "hosts-negative-n": ["hosts", str(bad["taken"].with_name("ok")), "-n", "-1"],
        "plan-negative": ["plan", "--profile", str(bad["negative"])],
        "plan-nan": ["plan", "--profile", str(bad["nan"])],
        "plan-binary": ["plan", "--profile", str(bad["binary"])],
        "report-binary": ["report", str(bad["binary"]), "--out", str(tmp_path / "rep")],
        "report-not-hdf5": ["report", str(tmp_path / "run.h5"), "--out", str(tmp_path / "rep")],
        "testbed-missing-job": ["testbed", "launch", "small", str(tmp_path / "absent.toml")],
        "plan-batch-negative": ["plan", "--profile", "paper-llama2-7b", "--batch", "-1"],
        "schedule-huge": ["schedule", "--stages", "100000", "--micro-batches", "100000"],
        "testbed-binary-file": ["testbed", "status", str(bad["binary"])],
        "testbed-bad-command": ["testbed", "launch", "small", str(bad["taken"]), "--command", "rm"],
    }[case]
    if case == "hosts-negative-n":
        Path(args[1]).write_text("a:2\n")
    res, seconds = _cli(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert seconds < 10


def test_testbed_launch_line_works_as_written_in_the_job_comment():
    """jobs/testbed-small.toml says: $(edgeshard-mpi testbed launch small JOB). A shell
    does not read VAR=value out of $(...), so the line must start with `env`, and need no
    quoting (word splitting is all $(...) does)."""
    res, _ = _cli("testbed", "launch", "small", str(ROOT / "jobs" / "testbed-small.toml"))
    assert res.exit_code == 0, res.output
    line = res.output.strip()
    words = line.split()
    assert words[0] == "env" and shlex.split(line) == words
    i = next(k for k, w in enumerate(words[1:], 1) if "=" not in w)
    assert all("=" in w for w in words[1:i]) and Path(words[i]).name == "mpiexec"
    assert (
        "$(edgeshard-mpi testbed launch small jobs/testbed-small.toml)"
        in (ROOT / "jobs" / "testbed-small.toml").read_text()
    )


# -- result files ------------------------------------------------------------------------


def test_publish_never_replaces_and_respects_umask(tmp_path):
    target = tmp_path / "sub" / "run.h5"
    old = os.umask(0o027)
    try:
        first = publish(lambda p: p.write_bytes(b"1"), target)
        second = publish(lambda p: p.write_bytes(b"2"), target)
    finally:
        os.umask(old)
    assert (first, second) == (target, target.with_name("run-2.h5"))
    assert target.read_bytes() == b"1" and second.read_bytes() == b"2"
    assert (target.stat().st_mode & 0o777) == 0o640
    with pytest.raises(OutputError, match="never overwritten"):
        publish(lambda p: p.write_bytes(b"3"), target, rename_ok=False)
    assert target.read_bytes() == b"1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run-2.h5", "run.h5"]


def test_profile_save_never_overwrites(tmp_path):
    from edgeshard_mpi.planner.problem import load_profile

    prof = load_profile("paper-llama2-7b")
    path = tmp_path / "p.json"
    path.write_text("mine")
    assert prof.save(path) == tmp_path / "p-2.json"
    assert path.read_text() == "mine"
    with pytest.raises(OutputError):
        prof.save(path, rename_ok=False)


def test_failed_write_leaves_nothing(tmp_path):
    def boom(p: Path) -> None:
        p.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        publish(boom, tmp_path / "run.h5")
    assert list(tmp_path.iterdir()) == []


def test_journal_drops_a_torn_record(tmp_path):
    j, out = Journal.create(tmp_path / "run.h5", {"new_tokens": 2})
    for g in range(3):
        j.append(g, np.full((1, 2), g), np.arange(2.0), 0.0)
    j.close()
    with open(j.path, "r+b") as f:  # a kill in the middle of the last record
        f.truncate(j.path.stat().st_size - 5)
    back = Journal.read(j.path)
    assert sorted(back.done) == [0, 1] and back.todo(4) == [2, 3]
    assert out == tmp_path / "run.h5" and not out.exists()
    # A second run racing for the same name gets its own journal and output name.
    j2, out2 = Journal.create(tmp_path / "run.h5", {})
    j2.close()
    assert out2 == tmp_path / "run-2.h5" and j2.path.name == "run-2.h5.journal"


def test_huge_hostfile_slot_count_is_refused_fast(tmp_path):
    from edgeshard_mpi.cluster import HostEntry, HostfileError, block_placement, parse_hostfile

    f = tmp_path / "h"
    f.write_text("localhost:99999999999999999999\n")
    t0 = time.monotonic()
    with pytest.raises(HostfileError, match="at most 4096"):
        parse_hostfile(f)
    assert block_placement([HostEntry("a", 4096), HostEntry("b", 4096)], 3) == ["a"] * 3
    assert time.monotonic() - t0 < 1
