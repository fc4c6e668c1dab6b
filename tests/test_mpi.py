"""End to end through mpiexec: distributed tokens equal single-process transformers
generate (greedy), the HDF5 file is complete, and bad input fails fast and cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeshard_mpi.metrics import read_run
from edgeshard_mpi.model import reference_model
from edgeshard_mpi.presets import resolve
from edgeshard_mpi.weights import weight_source
from tests.conftest import mpiexec, run_mpi

pytestmark = pytest.mark.mpi


def hf_generate(
    source: str,
    prompt_ids: np.ndarray,
    new_tokens: int,
    batch: int,
    eos: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Reference tokens from transformers' own generate, batch by batch; eos=None: a fixed
    token count, like benchmarks."""
    spec = resolve(source)
    model = reference_model(spec, weight_source(source, spec, "float32", seed))
    model.generation_config.eos_token_id = eos
    out = []
    for i in range(0, len(prompt_ids), batch):
        ids = torch.from_numpy(prompt_ids[i : i + batch])
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=0,
        )[:, ids.shape[1] :]
        gen = gen.numpy()  # shorter when every sequence of the batch stopped: pad with 0
        out.append(np.pad(gen, ((0, 0), (0, new_tokens - gen.shape[1]))))
    return np.concatenate(out)


def check_file(path: Path, n_ranks: int, prompts: int, new_tokens: int) -> dict:
    r = read_run(path)
    assert r["@schema_version"] == 1 and r["@world_size"] == n_ranks
    assert r["workload"]["generated_ids"].shape == (prompts, new_tokens)
    assert np.all(np.diff(r["workload"]["token_time_s"], axis=1) >= 0)
    for key in ("compute_s", "recv_wait_s", "bytes_sent", "peak_rss_bytes", "weights_bytes"):
        assert r["ranks"][key].shape == (n_ranks,)
    s = r["summary"]
    assert s["@latency_ms_per_token"] > 0 and s["@tokens_per_s"] > 0
    assert s["@generated_tokens"] == (r["workload"]["generated_ids"] >= 0).sum()
    assert (len(r["events"]) > 0 and "job_text" in str(r.keys())) or r["@job_text"]
    return r


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_synthetic_tokens_equal_generate(n, write_job, tmp_path):
    job = write_job(
        {
            "model": {"source": "tiny", "seed": 11},
            "workload": {"tokenizer": "bytes", "prompts": 4, "batch_size": 2, "new_tokens": 24},
        }
    )
    proc = run_mpi(n, job)
    assert proc.returncode == 0, proc.stderr
    r = check_file(tmp_path / "results" / "run.h5", n, 4, 24)
    expected = hf_generate("tiny", r["workload"]["prompt_ids"], 24, 2, seed=11)
    assert np.array_equal(r["workload"]["generated_ids"], expected)
    assert r["plan"]["stages"].shape == (n, 3)
    assert "latency" in proc.stdout and "wrote" in proc.stdout


@pytest.mark.parametrize(
    "n, stages",
    [
        (1, None),
        (2, None),
        (3, [(0, 0, 1), (1, 1, 4), (2, 4, 7)]),  # embedding alone on the source
        (4, [(0, 0, 3), (2, 3, 6), (3, 6, 7)]),  # rank 1 idles; the head alone on rank 3
    ],
)
def test_trained_model_tokens_equal_generate(n, stages, shared_data, write_job, tmp_path):
    source = str(shared_data / "stories260K-hf")
    part = (
        {"strategy": "even"}
        if stages is None
        else {
            "strategy": "explicit",
            "stages": [{"rank": r, "layers": [a, b]} for r, a, b in stages],
        }
    )
    job = write_job(
        {
            "model": {"source": source},
            "workload": {
                "dataset": str(shared_data / "wikitext-2-raw-v1" / "wiki.test.raw"),
                "prompts": 4,
                "batch_size": 2,
                "new_tokens": 96,
            },
            "partition": part,
        }
    )
    proc = run_mpi(n, job)
    assert proc.returncode == 0, proc.stderr
    r = check_file(tmp_path / "results" / "run.h5", n, 4, 96)
    assert r["workload"]["@prompt_source"].startswith("wikitext-2:")
    expected = hf_generate(source, r["workload"]["prompt_ids"], 96, 2)
    assert np.array_equal(r["workload"]["generated_ids"], expected)
    if stages is not None and n == 4:
        assert r["ranks"]["weights_bytes"][1] == 0 and r["ranks"]["actions"][1] == 0


def test_stop_at_eos_matches_generate(shared_data, write_job, tmp_path):
    """TinyStories models end a story with token 1: stop there. Groups of one prompt, so a
    group that stops sends the stop message down the chain."""
    source = str(shared_data / "stories260K-hf")
    job = write_job(
        {
            "model": {"source": source},
            "workload": {
                "prompts": 8,
                "batch_size": 1,
                "new_tokens": 200,
                "stop_at_eos": True,
                "eos_token_id": 1,
            },
        }
    )
    proc = run_mpi(3, job)
    assert proc.returncode == 0, proc.stderr
    r = read_run(tmp_path / "results" / "run.h5")
    got = r["workload"]["generated_ids"]
    expected = hf_generate(source, r["workload"]["prompt_ids"], 200, 1, eos=1)
    stopped = 0
    for g, e in zip(got, expected, strict=True):
        n = int((g >= 0).sum())
        assert np.array_equal(g[:n], e[:n])
        if n < 200:  # stopped early: the last kept token is EOS, generate stopped there too
            stopped += 1
            assert g[n - 1] == 1 and (g[n:] == -1).all() and (e[n:] == 0).all()
    assert stopped > 0, "no prompt reached EOS within 200 tokens; the test proves nothing"
    assert r["summary"]["@generated_tokens"] == (got >= 0).sum()
    # Every rank skipped the stopped steps (a full run: recv, compute, send per token).
    assert (r["ranks"]["actions"] < 3 * 200 * 8).all()


BAD_JOBS = [
    ({"model": {"source": "tiny", "colour": "red"}}, "unknown field(s) in [model]: colour"),
    ({"model": {"source": "no-such-model"}}, "no-such-model' is neither a preset"),
    (
        {"model": {"source": "tiny"}, "workload": {"prompts": "many"}},
        "workload.prompts: expected int",
    ),
    (
        {"model": {"source": "tiny"}, "workload": {"dataset": "/nonexistent/wiki.test.raw"}},
        "no file at /nonexistent/wiki.test.raw",
    ),
    (
        {
            "model": {"source": "tiny"},
            "partition": {
                "strategy": "explicit",
                "stages": [{"rank": 0, "layers": [0, 3]}, {"rank": 1, "layers": [3, 5]}],
            },
        },
        "cover [0, 5) but the model has 6 units",
    ),
    (
        {
            "model": {"source": "tiny"},
            "partition": {
                "strategy": "explicit",
                "stages": [{"rank": 0, "layers": [0, 3]}, {"rank": 7, "layers": [3, 6]}],
            },
        },
        "rank 7 does not exist",
    ),
    ({"model": {"source": "tiny"}, "workload": {"new_tokens": 1000}}, "max_position_embeddings"),
]


@pytest.mark.parametrize("job_dict, message", BAD_JOBS)
def test_bad_jobs_exit_2_fast_without_output(job_dict, message, write_job, tmp_path):
    job = write_job(job_dict)
    t0 = time.monotonic()
    proc = run_mpi(2, job, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert message in proc.stderr
    assert proc.stderr.count("error:") == 1  # reported once, by rank 0
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_bad_checkpoint_exits_2(tmp_path, write_job):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, '
        '"num_hidden_layers": 2, "num_attention_heads": 8, "vocab_size": 512}'
    )
    job = write_job({"model": {"source": str(model)}, "workload": {"tokenizer": "bytes"}})
    proc = run_mpi(2, job, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no model.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_job_file_exits_2(tmp_path):
    proc = run_mpi(2, tmp_path / "absent.toml", timeout=60)
    assert proc.returncode == 2 and "job file" in proc.stderr and "not found" in proc.stderr


def test_dead_rank_aborts_the_job(write_job, tmp_path):
    """SIGKILL one rank mid-run: the job ends non-zero, promptly, with no results file."""
    job = write_job(
        {
            "model": {"source": "small"},
            "workload": {"tokenizer": "bytes", "prompts": 16, "new_tokens": 96},
        }
    )
    env = dict(os.environ, MPIEXEC_TIMEOUT="300")
    cmd = [
        mpiexec(),
        "-n",
        "3",
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "edgeshard_mpi",
        "run",
        str(job),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.5)
            # Anchored at the interpreter, so mpiexec's own command line does not match.
            out = subprocess.run(
                ["pgrep", "-f", f"^{sys.executable} -m mpi4py -m edgeshard_mpi run {job}"],
                capture_output=True,
                text=True,
            ).stdout.split()
            ranks = sorted(int(p) for p in out)
            if len(ranks) == 3:
                time.sleep(8)  # let it load and start generating
                victim = ranks[1]
        assert victim is not None, "ranks did not start"
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - t_kill < 60
    assert not (tmp_path / "results").exists() or not any(
        p.suffix == ".h5" for p in (tmp_path / "results").iterdir()
    )
