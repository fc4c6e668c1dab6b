"""`edgeshard-mpi plan`: every strategy's plan and predictions for a profile, without MPI."""

from __future__ import annotations

import json
from dataclasses import replace

from .planner.baselines import STRATEGIES, make_plan
from .planner.cost import evaluate
from .planner.plan import Plan
from .planner.problem import Infeasible, PlannerLimit, load_profile, make_problem


def plan_report(
    profile: str,
    objective: str = "latency",
    strategies=None,
    algorithm: str = "exact",
    profile_strategy: str = "average",
    batch: int | None = None,
    source: int | None = None,
) -> dict:
    prof = load_profile(profile)
    if source is not None:
        if not 0 <= source < prof.n_devices:
            raise ValueError(f"--source {source}: the profile has devices 0..{prof.n_devices - 1}")
        prof = replace(prof, source=source)
    prob = make_problem(prof, batch, profile_strategy)
    rows = []
    for s in strategies or STRATEGIES:
        try:
            plan = make_plan(prob, s, objective, algorithm)
        except (Infeasible, PlannerLimit) as e:
            rows.append({"strategy": s, "feasible": False, "error": str(e)})
            continue
        ev = evaluate(plan, prob)
        rows.append(
            {
                "strategy": s,
                "feasible": True,
                "plan": plan.to_dict(),
                "description": describe(plan, prof.names),
                "devices": len(plan.ranks),
                "predicted": ev.to_dict(),
            }
        )
    return {
        "profile": profile,
        "model": prof.model.name,
        "objective": objective,
        "algorithm": algorithm,
        "profile_strategy": profile_strategy,
        "batch": prob.batch,
        "new_tokens": prof.new_tokens,
        "source": prof.names[prof.source],
        "cloud": None if prof.cloud is None else prof.names[prof.cloud],
        "plans": rows,
    }


def describe(plan: Plan, names) -> str:
    return " -> ".join(f"{names[st.rank]}[{st.start},{st.end})" for st in plan.stages)


def format_report(rep: dict) -> str:
    head = (
        f"{rep['model']} on {rep['profile']}: objective {rep['objective']}, algorithm "
        f"{rep['algorithm']}, profile strategy {rep['profile_strategy']}, batch "
        f"{rep['batch']}, source {rep['source']}, cloud {rep['cloud']}"
    )
    lines = [
        head,
        "",
        f"{'strategy':<16}{'devices':>8}{'ms/token':>11}{'tokens/s':>10}{'bottleneck':>12}"
        f"{'pipelined':>11}{'solve':>9}  plan",
    ]
    for r in rep["plans"]:
        if not r["feasible"]:
            lines.append(f"{r['strategy']:<16}{'-':>8}  {r['error']}")
            continue
        p = r["predicted"]
        info = r["plan"]["info"]
        solve = info.get("solve_s")
        note = ""
        if info.get("exact") is False:  # past the exact solver's budget: say so
            gap = info.get("gap")
            note = f"  [heuristic: bound {info['lower_bound_s'] * 1e3:.1f} ms" + (
                "]" if gap is None else f", gap {gap * 100:.1f}%]"
            )
        lines.append(
            f"{r['strategy']:<16}{r['devices']:>8}{p['per_token_s'] * 1e3:>11.1f}"
            f"{p['tokens_per_s']:>10.2f}{p['bottleneck_s'] * 1e3:>10.1f}ms"
            f"{p['pipeline_tokens_per_s']:>11.2f}"
            f"{'' if solve is None else f'{solve * 1e3:.0f}ms':>9}  {r['description']}{note}"
        )
    lines += [
        "",
        f"ms/token and tokens/s: sequential inference (a prefill + {rep['new_tokens'] - 1} "
        "decode steps per prompt); bottleneck: slowest stage or link (weighted by the "
        "profile strategy); pipelined: tokens/s bound with enough micro-batches in flight.",
    ]
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    return json.dumps(rep, indent=1)
