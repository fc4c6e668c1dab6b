"""Where a pipelined run leaves its prediction: each stage's decode compute, measured (the
run's event log) against predicted (the plan's stage time), for `edgeshard-mpi report`.

A pipelined run's throughput is set by its slowest stage; when the measured throughput
is off, this table says which stage's compute is, and whether the run executed the
schedule that was predicted (the plan, micro-batch size and count in flight are in the
same row).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import read_run

OFF = 0.15
"""A stage whose decode compute is more than this far from its prediction is named."""


def stage_rows(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        try:
            r = read_run(f)
        except (OSError, KeyError, ValueError, TypeError):
            continue
        ev = r.get("events")
        pred = (r.get("plan", {}).get("@predicted") or {}).get("stage_s")
        if r.get("@mode") != "pipeline" or ev is None or len(ev) == 0 or not pred:
            continue
        meas = []
        for st in range(len(pred)):
            sel = ev[(ev["stage"] == st) & (ev["op"] == 1) & (ev["it"] > 0)]  # decode computes
            meas.append(float(np.median(sel["t1"] - sel["t0"])) if len(sel) else np.nan)
        pipe = r.get("pipeline", {})
        rows.append({
            "run": f"{f.parent.name}/{f.stem}",
            "plan": r["plan"]["@description"],
            "schedule": f"{pipe.get('@micro_batches', '?')} x {pipe.get('@micro_batch_size', '?')}"
                        f" {pipe.get('@order', '')}",
            "predicted_ms": [p * 1e3 for p in pred],
            "measured_ms": [m * 1e3 for m in meas],
            "ratio": pipe.get("@measured_over_predicted", np.nan),
        })  # fmt: skip
    return rows


def stages_section(paths: list[Path]) -> list[str]:
    files = []
    for p in paths:
        files += sorted(p.rglob("*.h5")) if p.is_dir() else [p]
    rows = stage_rows([f for f in files if "profiles" not in f.parts])
    if not rows:
        return []
    out = [
        "## Pipelined runs: each stage's decode compute, measured / predicted",
        "",
        "Medians over the run's decode steps (event log) against the plan's predicted stage "
        f"time; stages more than {OFF:.0%} off are in bold. Schedule: micro-batches in "
        "flight x sequences each, order.",
        "",
        "| run | plan | schedule | tokens/s measured / predicted | stage ms measured / "
        "predicted |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for m, p in zip(r["measured_ms"], r["predicted_ms"], strict=True):
            c = f"{m:.1f}/{p:.1f}"
            cells.append(f"**{c}**" if np.isfinite(m) and abs(m / p - 1) > OFF else c)
        out.append(f"| {r['run']} | {r['plan'][:60]} | {r['schedule']} | {r['ratio']:.2f} | "
                   f"{', '.join(cells)} |")  # fmt: skip
    return [*out, ""]
