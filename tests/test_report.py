"""edgeshard-mpi report: tables, CSV and plots from run files and planner refusals."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import run_mpi

pytestmark = pytest.mark.mpi


def test_report_tables_csv_and_plots(write_job, tmp_path):
    results = tmp_path / "results"
    for name, part in (
        ("tiny-edge-solo-latency", {"strategy": "edge-solo", "objective": "latency"}),
        ("tiny-edgeshard-latency", {"strategy": "edgeshard", "objective": "latency"}),
    ):
        job = {
            "model": {"source": "tiny"},
            "workload": {"tokenizer": "bytes", "prompts": 1, "new_tokens": 4},
            "partition": part,
            "profile": {"repeats": 1, "link_repeats": 1, "cold_cache": False},
            "output": {"path": str(results / "table4" / f"{name}.h5")},
        }
        proc = run_mpi(2, write_job(job, name=f"{name}.toml"))
        assert proc.returncode == 0, proc.stderr
    marker = results / "table4" / "tiny-cloud-edge-opt-latency.infeasible.json"
    marker.write_text(
        json.dumps(
            {
                "model": "tiny",
                "infeasible": "cloud-edge-opt: the model needs 9 GB but ...",
                "partition": {"strategy": "cloud-edge-opt", "objective": "latency"},
            }
        )
    )
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeshard_mpi", "report", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "## Table IV" in md and "OOM (planner)" in md and "| tiny | edgeshard |" in md
    assert "## Predicted vs measured" in md
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["strategy"] for r in rows} == {"edge-solo", "edgeshard", "cloud-edge-opt"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["latency_ms_per_token"]) > 0 for r in ok)
    assert (out / "predicted_vs_measured.png").stat().st_size > 1000


def test_report_without_runs_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeshard_mpi", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no run files" in proc.stderr
