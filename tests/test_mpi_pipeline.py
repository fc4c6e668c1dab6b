"""Pipelined inference through mpiexec: any micro-batch count and either order yields each
prompt's tokens from single-process generate; the planner's choices and the measured and
predicted pipeline figures land in the HDF5."""

from __future__ import annotations

import numpy as np
import pytest

from edgeshard_mpi.metrics import read_run
from tests.conftest import run_mpi
from tests.test_mpi import check_file, hf_generate

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize(
    "ranks, micro_batches, size, order",
    [
        (3, 2, 1, "no-bubbles"),
        (3, 3, 1, "bubbles"),
        (3, 3, 2, "no-bubbles"),
        (2, 2, 3, "bubbles"),
        (4, 4, 1, "no-bubbles"),  # more in flight than a round of the workload needs
    ],
)
def test_pipelined_tokens_equal_generate(ranks, micro_batches, size, order, write_job, tmp_path):
    job = write_job(
        {
            "model": {"source": "tiny", "seed": 7},
            "workload": {"tokenizer": "bytes", "prompts": 6, "new_tokens": 12},
            "pipeline": {
                "mode": "pipeline",
                "order": order,
                "micro_batches": micro_batches,
                "micro_batch_size": size,
            },
        }
    )
    proc = run_mpi(ranks, job)
    assert proc.returncode == 0, proc.stderr
    r = check_file(tmp_path / "results" / "run.h5", ranks, 6, 12)
    expected = hf_generate("tiny", r["workload"]["prompt_ids"], 12, size, seed=7)
    assert np.array_equal(r["workload"]["generated_ids"], expected)
    assert r["@mode"] == "pipeline" and r["@order"] == order
    assert r["@micro_batches"] == micro_batches and r["@micro_batch_size"] == size
    p = r["pipeline"]
    assert p["busy_fraction"].shape == (ranks,) and ((p["busy_fraction"] > 0).all())
    assert (p["busy_fraction"] < 1).all() and (p["idle_s"] > 0).all()
    # Micro-batches were really in flight together: slot j's events interleave with j+1's.
    ev = r["events"]
    src = ev[(ev["rank"] == 0) & (ev["op"] == 1)]
    slots_seen = src["slot"][np.argsort(src["t0"])]
    assert len(set(slots_seen[: min(micro_batches, 6 // size)])) == min(micro_batches, 6 // size)


def test_planner_chooses_micro_batches_and_predicts(write_job, tmp_path):
    job = write_job(
        {
            "model": {"source": "tiny", "seed": 2},
            "workload": {"tokenizer": "bytes", "prompts": 8, "new_tokens": 16},
            "partition": {"strategy": "edgeshard"},
            "pipeline": {"mode": "pipeline", "micro_batch_size": "auto"},
            "profile": {"warmup": 1, "repeats": 2, "link_repeats": 2, "cold_cache": False},
        }
    )
    proc = run_mpi(3, job)
    assert proc.returncode == 0, proc.stderr
    assert "predicted" in proc.stdout and "% of predicted" in proc.stdout
    r = read_run(tmp_path / "results" / "run.h5")
    assert r["plan"]["@objective"] == "throughput"  # the pipelined default
    assert list(r["profile"]["@batch_sizes"]) == [1, 2, 4, 8]  # sizes dividing the prompts
    p = r["pipeline"]
    b, s = r["@micro_batch_size"], r["@micro_batches"]
    cands = p["@candidates"]
    # One row per candidate plan at each (size, count): EdgeShard's and the baselines'.
    chosen = [c for c in cands if c["micro_batch_size"] == b and c["micro_batches"] == s]
    assert chosen and all(c["feasible"] for c in chosen)
    best = max(c["predicted_tokens_per_s"] for c in cands if c["feasible"])
    assert max(c["predicted_tokens_per_s"] for c in chosen) >= 0.99 * best
    assert p["@predicted_tokens_per_s"] > 0 and p["@measured_over_predicted"] > 0
    assert p["predicted_busy_fraction"].shape == p["busy_fraction"].shape
    assert r["workload"]["generated_ids"].shape == (8, 16)
    expected = hf_generate("tiny", r["workload"]["prompt_ids"], 16, b, seed=2)
    assert np.array_equal(r["workload"]["generated_ids"], expected)


def test_pipelined_trained_model_stops_at_eos(shared_data, write_job, tmp_path):
    source = str(shared_data / "stories260K-hf")
    job = write_job(
        {
            "model": {"source": source},
            "workload": {
                "prompts": 8,
                "new_tokens": 200,
                "stop_at_eos": True,
                "eos_token_id": 1,
            },
            "partition": {
                "strategy": "explicit",
                "stages": [
                    {"rank": 0, "layers": [0, 3]},
                    {"rank": 1, "layers": [3, 7]},
                ],
            },
            "pipeline": {"mode": "pipeline", "micro_batches": 3, "order": "no-bubbles"},
        }
    )
    proc = run_mpi(2, job)
    assert proc.returncode == 0, proc.stderr
    r = read_run(tmp_path / "results" / "run.h5")
    got = r["workload"]["generated_ids"]
    expected = hf_generate(source, r["workload"]["prompt_ids"], 200, 1, eos=1)
    stopped = 0
    for g, e in zip(got, expected, strict=True):
        n = int((g >= 0).sum())
        assert np.array_equal(g[:n], e[:n])
        stopped += n < 200
    assert stopped > 0


def test_pipeline_fields_in_sequential_mode_exit_2(write_job, tmp_path):
    job = write_job(
        {
            "model": {"source": "tiny"},
            "workload": {"tokenizer": "bytes"},
            "pipeline": {"micro_batches": 3},
        }
    )
    proc = run_mpi(2, job, timeout=120)
    assert proc.returncode == 2
    assert "pipeline.micro_batches > 1 needs pipeline.mode = 'pipeline'" in proc.stderr
