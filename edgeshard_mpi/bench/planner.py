"""`make bench-planner`: the planner at every scale, and the pipeline check.

1. Solve time and peak memory (tracemalloc) of the exact solvers, both objectives, on the
   paper's testbed resized: (devices, units, layers alike or not, device types), against
   the targets: 15 x 82 non-uniform <= 1 s; 20 x 162 non-uniform <= 10 s; 100 devices of
   <= 4 types <= 10 s, exact; 200 distinct devices: a plan in <= 30 s; peak <= 1 GB.
2. The pipeline check: over the shipped profiles and a 1-50 Mb/s source-cloud sweep,
   EdgeShard's pipelined choice (plan x micro-batch size x count in flight) predicts at
   least the tokens/s of Cloud-Edge-Opt's and Edge-Solo's own choices.

    python -m edgeshard_mpi.bench.planner [--quick] [--out DIR] [--seeds 0,1,2] [--cases "20 x"]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import tracemalloc
from pathlib import Path

from ..planner.baselines import make_plan
from ..planner.chain import solve_chain
from ..planner.cost import evaluate
from ..planner.pipeline import TIE, candidate_plans, choose
from ..planner.problem import Infeasible, PlannerLimit, load_profile
from .planner_cases import testbed_problem

# (label, testbed_problem kwargs, time target s or None, must be exact)
CASES = [
    ("15 x 82, alike layers", dict(devices=15), None, True),
    ("15 x 82, non-uniform", dict(devices=15, jitter=0.1), 1.0, True),
    ("20 x 82, non-uniform", dict(devices=20, jitter=0.1), None, True),
    ("20 x 162, non-uniform", dict(devices=20, units=162, jitter=0.1), 10.0, True),
    (
        "100 x 82, 4 types, non-uniform",
        dict(devices=100, nx=30, jitter=0.1, typed=True),
        10.0,
        True,
    ),
    ("200 x 82, distinct, non-uniform", dict(devices=200, nx=60, jitter=0.1), 30.0, False),
]
MEMORY_TARGET = 1e9


def solve_row(label, kw, objective):
    prob = testbed_problem(model="llama2-70b", **kw)
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        plan = solve_chain(prob, objective)
        err = None
    except (Infeasible, PlannerLimit) as e:
        plan, err = None, str(e)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row = {
        "case": label,
        "devices": prob.n_devices,
        "units": prob.n_units,
        "objective": objective,
        "seconds": secs,
        "cpu_s": cpu,
        "peak_bytes": peak,
        "error": err,
    }
    if plan is not None:
        ev = evaluate(plan, prob)
        row |= {
            "types": plan.info.get("types"),
            "exact": plan.info.get("exact", True),
            "tie_break_exact": plan.info.get("tie_break_exact", True),
            "algorithm": plan.info.get("algorithm"),
            "gap": plan.info.get("gap"),
            "value_s": ev.latency_s if objective == "latency" else ev.bottleneck_s,
            "stages": len(plan.stages),
        }
    return row


def pipeline_check(models, mbps_list, log) -> list[dict]:
    rows = []
    kw = dict(prompts=8, sizes=(1,), slots=(1, 2, 4), order="no-bubbles")
    for model in models:
        base = load_profile(f"paper-llama2-{model}")
        for mbps in mbps_list:
            bw = base.bandwidth.copy()
            bw[base.source, base.cloud] = bw[base.cloud, base.source] = mbps * 1e6 / 8
            prof = dataclasses.replace(base, bandwidth=bw)
            row = {"model": model, "mbps": mbps}
            for name in ("edgeshard", "cloud-edge-opt", "edge-solo"):
                try:
                    if name == "edgeshard":
                        ch = choose(prof, make_plan=lambda p: candidate_plans(p, "edgeshard"), **kw)
                    else:
                        ch = choose(
                            prof, make_plan=lambda p, n=name: make_plan(p, n, "throughput"), **kw
                        )
                    row[name] = ch.prediction.tokens_per_s
                    came = ch.plan.info.get("candidate", f"{ch.plan.strategy}/{ch.plan.objective}")
                    row[name + "_plan"] = f"{came} x{ch.micro_batches}"
                except Infeasible:
                    row[name] = None
            es = row["edgeshard"]
            row["ok"] = es is not None and all(
                row[b] is None or es >= row[b] * (1 - TIE) for b in ("cloud-edge-opt", "edge-solo")
            )
            rows.append(row)
            log(row)
    return rows


def yes(x) -> str:
    return "yes" if x else "no"


def fmt_s(x) -> str:
    return "-" if x is None else (f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="skip the 20 x 162 case, fewer sweep points"
    )
    ap.add_argument("--out", type=Path, default=Path("results/bench-planner"))
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds of the non-uniform layers' jitter (each such case per seed)",
    )
    ap.add_argument("--cases", default="", help="only the cases whose label contains this")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the pipeline check")
    args = ap.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]

    def log(row):
        print("  " + json.dumps(row, default=str), flush=True)

    print("solvers (paper testbed, Llama2-70B, resized; seconds on this machine):")
    rows = []
    for label, kw, target, must_exact in CASES:
        if (args.quick and kw.get("units") == 162) or args.cases not in label:
            continue
        for seed in seeds if kw.get("jitter") else [0]:
            name = f"{label}, seed {seed}" if kw.get("jitter") and seeds != [0] else label
            for objective in ("latency", "throughput"):
                r = solve_row(name, kw | {"seed": seed}, objective)
                r |= {"target_s": target, "must_exact": must_exact, "seed": seed}
                rows.append(r)
                log(r)
    pipe = []
    if not args.no_pipeline:
        print("pipeline check (EdgeShard's choice vs the baselines' own choices, tokens/s):")
        mbps = (1, 10, 50) if args.quick else (1, 2, 5, 10, 20, 50)
        pipe = pipeline_check(("7b", "13b", "70b"), mbps, log)

    print()
    print(
        f"{'case':<42}{'objective':>11}{'time':>10}{'cpu':>9}{'peak':>9}{'types':>6}{'exact':>7}"
        f"{'ties':>6}{'gap':>8}  verdict"
    )
    for r in rows:
        verdict = []
        if r["error"]:
            verdict.append("ERROR " + r["error"][:60])
        if r["target_s"] is not None:
            verdict.append(
                "time ok" if r["seconds"] <= r["target_s"] else f"MISSED {r['target_s']} s"
            )
        verdict.append("mem ok" if r["peak_bytes"] <= MEMORY_TARGET else "MEM MISSED")
        if r["must_exact"] and not r.get("exact", False):
            verdict.append("NOT EXACT")
        gap = r.get("gap")
        print(
            f"{r['case']:<42}{r['objective']:>11}{fmt_s(r['seconds']):>10}{fmt_s(r['cpu_s']):>9}"
            f"{r['peak_bytes'] / 1e6:>7.0f}MB{r.get('types') or '-':>6}"
            f"{yes(r.get('exact')):>7}{yes(r.get('tie_break_exact')):>6}"
            f"{'-' if gap is None else f'{gap * 100:.1f}%':>8}  {', '.join(verdict)}"
        )
    print("ties: 'yes' when the least latency among bottleneck-optimal plans was proven")
    print("time: wall clock; cpu: this process's CPU seconds (what a loaded host inflates less)")
    print()
    print(
        f"{'model':>6}{'Mb/s':>6}{'edgeshard':>11}{'c-e-opt':>9}{'solo':>8}  check  edgeshard plan"
    )
    for r in pipe:

        def f(x):
            return "OOM" if x is None else f"{x:.1f}"

        print(
            f"{r['model']:>6}{r['mbps']:>6}{f(r['edgeshard']):>11}{f(r['cloud-edge-opt']):>9}"
            f"{f(r['edge-solo']):>8}  {'ok' if r['ok'] else 'LOSES':>5}  "
            f"{r.get('edgeshard_plan', '')}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "planner.json"
    out.write_text(json.dumps({"solvers": rows, "pipeline": pipe}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
