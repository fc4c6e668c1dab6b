"""`make bench-planner`: how fast the planners are on the paper's testbed profiles.

Times, on the same inputs: the exact solvers (alike-layer fast path and the general DP),
the paper's Algorithms 1 and 2 as published, a 20-device testbed, and the paper's
Algorithm 2 over growing device subsets (it is exponential in devices) with the speed-up of
the exact solver. Prints a table and writes results/bench-planner/planner.json.

    python -m edgeshard_mpi.bench.planner [--repeats 5] [--deadline 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ..planner.chain import solve_chain
from ..planner.cost import evaluate
from ..planner.latency import paper_algorithm1
from ..planner.problem import Infeasible, PlannerLimit, make_problem, profile_from_dict
from ..planner.roofline import paper_testbed
from ..planner.throughput import paper_algorithm2

OBJ_KEY = {"latency": "per_token_s", "throughput": "bottleneck_s"}


def problem(model: str, n_agx: int = 12, n_nx: int = 2):
    d = paper_testbed(model, batch_sizes=(1,), n_agx=n_agx, n_nx=n_nx)
    return make_problem(profile_from_dict(d, "testbed"), 1, "average")


def timed(repeats: int, fn, *args, **kw):
    """(median seconds, last result); an Infeasible result is returned, not raised; a
    PlannerLimit gives (None, None)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kw)
        except Infeasible as e:
            out = e
        except PlannerLimit:
            return None, None
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def value(plan, prob, objective: str) -> float | None:
    if plan is None or isinstance(plan, Infeasible):
        return None
    return float(getattr(evaluate(plan, prob), OBJ_KEY[objective]))


def n_stages(plan) -> int | None:
    return None if plan is None or isinstance(plan, Infeasible) else len(plan.stages)


def solvers_on_testbeds(repeats: int, deadline: float, log) -> list[dict]:
    rows = []
    cases = [(m, 12, 2) for m in ("llama2-7b", "llama2-13b", "llama2-70b")]
    cases.append(("llama2-70b", 17, 2))  # 20 devices
    for model, agx, nx in cases:
        prob = problem(model, agx, nx)
        for objective in ("latency", "throughput"):
            for method in ("uniform", "general"):
                reps = repeats if method == "uniform" else 1
                t, plan = timed(reps, solve_chain, prob, objective, method=method)
                row = {
                    "model": model,
                    "devices": prob.n_devices,
                    "units": prob.n_units,
                    "objective": objective,
                    "solver": f"exact-{method}",
                    "seconds": t,
                    "value_s": value(plan, prob, objective),
                    "stages": n_stages(plan),
                }
                rows.append(row)
                log(row)
            if prob.n_devices <= 15:
                if objective == "latency":
                    t, plan = timed(1, paper_algorithm1, prob)
                else:
                    t, plan = timed(1, paper_algorithm2, prob, deadline_s=deadline)
                row = {
                    "model": model,
                    "devices": prob.n_devices,
                    "units": prob.n_units,
                    "objective": objective,
                    "solver": "paper-algorithm-" + ("1" if objective == "latency" else "2"),
                    "seconds": t,
                    "value_s": None if plan is None else value(plan, prob, objective),
                    "stages": None
                    if plan is None or isinstance(plan, Infeasible)
                    else len(plan.stages),
                }
                rows.append(row)
                log(row)
    return rows


def algorithm2_scaling(deadline: float, log) -> list[dict]:
    """Algorithm 2 vs the exact throughput solver on 70B over the source, k-2 AGX and the
    cloud server, k growing until Algorithm 2 passes its deadline."""
    rows = []
    for k in range(3, 16):
        prob = problem("llama2-70b", n_agx=k - 1, n_nx=0)
        t_exact, exact = timed(3, solve_chain, prob, "throughput")
        t0 = time.perf_counter()
        try:
            paper = paper_algorithm2(prob, deadline_s=deadline)
            t_paper = time.perf_counter() - t0
        except PlannerLimit as e:
            row = {"devices": k, "paper_s": None, "exact_s": t_exact, "note": str(e)}
            rows.append(row)
            log(row)
            break
        except Infeasible as e:
            paper, t_paper = e, time.perf_counter() - t0
        v_exact, v_paper = value(exact, prob, "throughput"), value(paper, prob, "throughput")
        row = {
            "devices": k,
            "paper_s": t_paper,
            "exact_s": t_exact,
            "speedup": t_paper / t_exact,
            "paper_bottleneck_s": v_paper,
            "exact_bottleneck_s": v_exact,
            "same_optimum": v_paper == v_exact
            or (v_paper is not None and v_exact is not None and np.isclose(v_paper, v_exact)),
        }
        rows.append(row)
        log(row)
    return rows


def fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds per Algorithm 2 run")
    ap.add_argument("--out", type=Path, default=Path("results/bench-planner"))
    args = ap.parse_args(argv)

    def log(row):
        print("  " + json.dumps({k: v for k, v in row.items() if k != "note"}), flush=True)

    print("exact solvers and the paper's algorithms on the paper testbed profiles:")
    rows = solvers_on_testbeds(args.repeats, args.deadline, log)
    print(f"paper Algorithm 2 vs exact throughput, 70B, growing device sets ({args.deadline} s):")
    scaling = algorithm2_scaling(args.deadline, log)

    print()
    print(f"{'model':<12}{'dev':>4}{'objective':>11}  {'solver':<20}{'time':>10}{'value':>12}")
    for r in rows:
        v = "infeasible" if r["value_s"] is None else f"{r['value_s'] * 1e3:.2f} ms"
        t = "> limit" if r["seconds"] is None else fmt_s(r["seconds"])
        if r["seconds"] is None:
            v = "-"
        print(
            f"{r['model']:<12}{r['devices']:>4}{r['objective']:>11}  {r['solver']:<20}"
            f"{t:>10}{v:>12}"
        )
    print("> limit: Algorithm 2 passed --deadline, or the general DP its memory cap (2 GB)")
    print()
    print(f"{'devices':>8}{'Algorithm 2':>14}{'exact':>10}{'speed-up':>10}  same optimum")
    for r in scaling:
        if r["paper_s"] is None:
            print(f"{r['devices']:>8}{'> deadline':>14}{fmt_s(r['exact_s']):>10}")
            continue
        print(
            f"{r['devices']:>8}{fmt_s(r['paper_s']):>14}{fmt_s(r['exact_s']):>10}"
            f"{r['speedup']:>9.0f}x  {r['same_optimum']}"
        )
    targets = {
        (15, "latency"): 0.1,
        (15, "throughput"): 1.0,
        (20, "latency"): 30.0,
        (20, "throughput"): 30.0,
    }
    print()
    for (dev, obj), limit in targets.items():
        t = next(
            r["seconds"]
            for r in rows
            if r["model"] == "llama2-70b"
            and r["devices"] == dev
            and r["objective"] == obj
            and r["solver"] == "exact-uniform"
        )
        verdict = "ok" if t < limit else "MISSED"
        print(f"target: 70B, {dev} devices, exact {obj} < {limit} s: {fmt_s(t)} {verdict}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "planner.json"
    out.write_text(json.dumps({"solvers": rows, "algorithm2_scaling": scaling}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
