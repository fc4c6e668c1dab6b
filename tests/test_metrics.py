"""HDF5 run files: atomic write, schema, summary figures."""

import os

import numpy as np
import pytest

from edgeshard_mpi.metrics import SCHEMA_VERSION, read_run, summarize, write_run


def test_summarize_matches_hand_computation():
    # Two groups of 2 sequences, 3 steps; group 1 starts at 1.0 s.
    tokens = np.ones((2, 2, 3), dtype=np.int64)
    token_time = np.array([[0.10, 0.20, 0.30], [1.40, 1.50, 1.60]])
    start = np.array([0.0, 1.0])
    s = summarize(tokens, token_time, start)
    assert s["latency_ms_per_token"] == pytest.approx((0.30 / 3 + 0.60 / 3) / 2 * 1e3)
    assert s["ttft_ms"] == pytest.approx((0.10 + 0.40) / 2 * 1e3)
    assert s["generated_tokens"] == 12
    assert s["tokens_per_s"] == pytest.approx(12 / 1.60)


def test_summarize_counts_only_tokens_before_eos():
    tokens = np.array([[[5, 2, -1]]])
    token_time = np.array([[0.1, 0.2, np.nan]])
    s = summarize(tokens, token_time, np.array([0.0]))
    assert s["generated_tokens"] == 2
    assert s["latency_ms_per_token"] == pytest.approx(100.0)


def _run(tmp_path):
    return {
        "attrs": {"job_name": "t", "versions": {"torch": "x"}, "hosts": ["a"]},
        "plan": {
            "strategy": "even",
            "objective": "latency",
            "description": "r0[0,6)",
            "stages": [[0, 0, 6]],
            "info": {},
        },
        "devices": [{"rank": 0, "host": "a", "memory_budget": 10, "cores": 2.0}],
        "workload": {
            "attrs": {"prompt_source": "builtin"},
            "prompt_ids": np.zeros((2, 4)),
            "prompt_text": ["x", "y"],
            "generated_ids": np.zeros((2, 3)),
            "group_start_s": np.zeros(2),
            "token_time_s": np.zeros((2, 3)),
        },
        "ranks": {"compute_s": [1.0], "bytes_sent": [5]},
        "stages": {"compute_s": [1.0]},
        "events": None,
        "summary": {"latency_ms_per_token": 1.5},
        "pipeline": {
            "order": "no-bubbles",
            "micro_batches": 2,
            "micro_batch_size": 1,
            "tokens_per_s": 10.0,
            "busy_fraction": [0.5],
            "idle_s": [1.0],
            "predicted": {"tokens_per_s": 12.5, "busy_fraction": [0.6], "idle_s": [0.8]},
            "measured_over_predicted": 0.8,
            "candidates": [{"micro_batch_size": 1, "micro_batches": 2, "feasible": True}],
        },
    }


def test_write_and_read_roundtrip(tmp_path):
    path = write_run(tmp_path / "out" / "run.h5", _run(tmp_path))
    r = read_run(path)
    assert r["@schema_version"] == SCHEMA_VERSION
    assert r["@versions"] == {"torch": "x"} and r["@hosts"] == ["a"]
    assert r["plan"]["stages"].tolist() == [[0, 0, 6]]
    assert r["summary"]["@latency_ms_per_token"] == 1.5
    assert list(r["workload"]["prompt_text"]) == ["x", "y"]
    assert r["devices"]["host"][0] in (b"a", "a")
    p = r["pipeline"]
    assert p["@micro_batches"] == 2 and p["@predicted_tokens_per_s"] == 12.5
    assert p["busy_fraction"].tolist() == [0.5] and p["predicted_idle_s"].tolist() == [0.8]
    assert p["@candidates"][0]["feasible"] is True
    assert os.listdir(tmp_path / "out") == ["run.h5"]  # no temporary file left


def test_failed_write_leaves_nothing(tmp_path):
    bad = _run(tmp_path)
    bad["stages"] = {"compute_s": object()}  # cannot be stored
    with pytest.raises(TypeError):
        write_run(tmp_path / "run.h5", bad)
    assert os.listdir(tmp_path) == []
