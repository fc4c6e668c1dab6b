"""`edgeshard-mpi plan --pipeline / --sweep`: offline throughput work without MPI.

--pipeline: the choice a pipelined job would make, per strategy: micro-batch size and count
in flight (auto, or given), order, the plan (for EdgeShard: among its candidates, see
planner/pipeline.py), predicted tokens/s, and every candidate tried.
--sweep a,b:1,2,5,10,20,50: the bandwidth of link a <-> b set to each value (Mb/s); per
point every strategy's predicted latency (ms/token, sequential, the latency objective) and
throughput (tokens/s: the pipelined choice with --pipeline, else the bound batch /
bottleneck of the throughput objective's plan); a table and a PNG (the paper's Figs. 7-8, offline).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .planner.baselines import STRATEGIES, make_plan
from .planner.cost import evaluate
from .planner.pipeline import candidate_plans, choose
from .planner.problem import Infeasible, PlannerLimit, Profile, make_problem

SLOTS = (1, 2, 4, 8)  # counts in flight tried offline when not given


def parse_sweep(text: str, n_devices: int) -> tuple[int, int, list[float]]:
    """'a,b:1,2,5' -> (a, b, [1, 2, 5]); ValueError naming the fix."""
    try:
        pair, values = text.split(":")
        a, b = (int(x) for x in pair.split(","))
        mbps = [float(x) for x in values.split(",") if x]
    except ValueError:
        raise ValueError(
            f"--sweep {text!r}: write DEVICE,DEVICE:MBPS,MBPS,... e.g. 0,14:1,2,5,10,20,50"
        ) from None
    if not (0 <= a < n_devices and 0 <= b < n_devices and a != b) or not mbps:
        raise ValueError(f"--sweep {text!r}: two different devices in 0..{n_devices - 1}")
    if min(mbps) <= 0:
        raise ValueError(f"--sweep {text!r}: bandwidths must be > 0 Mb/s")
    return a, b, mbps


def with_link(prof: Profile, a: int, b: int, mbps: float) -> Profile:
    bw = prof.bandwidth.copy()
    bw[a, b] = bw[b, a] = mbps * 1e6 / 8
    return dataclasses.replace(prof, bandwidth=bw)


def pipeline_choice(
    prof: Profile,
    strategy: str,
    objective: str,
    algorithm: str,
    profile_strategy: str,
    prompts: int,
    size: int | None,
    count: int | None,
    order: str,
) -> dict:
    sizes = (size,) if size else tuple(b for b in prof.batch_sizes if prompts % b == 0)
    try:
        ch = choose(
            prof,
            prompts,
            lambda p: candidate_plans(p, strategy, objective, algorithm),
            sizes,
            (count,) if count else SLOTS,
            order,
            profile_strategy,
        )
    except (Infeasible, PlannerLimit) as e:
        return {"strategy": strategy, "feasible": False, "error": str(e)}
    return {
        "strategy": strategy,
        "feasible": True,
        "micro_batch_size": ch.micro_batch_size,
        "micro_batches": ch.micro_batches,
        "order": order,
        "plan_from": ch.plan.info.get("candidate", f"{ch.plan.strategy}/{ch.plan.objective}"),
        "plan": ch.plan.describe(),
        "tokens_per_s": ch.prediction.tokens_per_s,
        "candidates": ch.candidates,
    }


def format_pipeline(rows: list[dict], prompts: int) -> str:
    lines = [
        f"pipelined choice for {prompts} prompts (predicted by the schedule simulator):",
        f"{'strategy':<16}{'size':>5}{'count':>6}{'tokens/s':>10}  plan (from)",
    ]
    for r in rows:
        if not r["feasible"]:
            lines.append(f"{r['strategy']:<16}{'-':>5}  {r['error']}")
            continue
        lines.append(
            f"{r['strategy']:<16}{r['micro_batch_size']:>5}{r['micro_batches']:>6}"
            f"{r['tokens_per_s']:>10.2f}  {r['plan']} ({r['plan_from']})"
        )
    lines += ["", "candidates (size x count in flight, plan, predicted tokens/s):"]
    for r in rows:
        for c in r.get("candidates", []):
            what = (
                f"{c['predicted_tokens_per_s']:.2f}  {c.get('plan', '')}"
                if c["feasible"]
                else c["error"][:70]
            )
            lines.append(
                f"  {r['strategy']:<16}{c['micro_batch_size']:>3} x {c['micro_batches']:<3} {what}"
            )
    return "\n".join(lines)


def sweep(
    prof: Profile,
    spec: str,
    strategies,
    algorithm: str,
    profile_strategy: str,
    batch: int | None,
    pipeline: dict | None,
) -> dict:
    """Every strategy's predicted latency and throughput at every bandwidth of one link."""
    a, b, mbps = parse_sweep(spec, prof.n_devices)
    points = []
    for x in mbps:
        p = with_link(prof, a, b, x)
        prob = make_problem(p, batch, profile_strategy)
        row = {"mbps": x}
        for s in strategies:
            try:
                lat = evaluate(make_plan(prob, s, "latency", algorithm), prob).per_token_s
            except (Infeasible, PlannerLimit):
                lat = None
            if pipeline is not None:
                ch = pipeline_choice(p, s, "throughput", algorithm, profile_strategy, **pipeline)
                thr = ch["tokens_per_s"] if ch["feasible"] else None
            else:
                try:
                    plan = make_plan(prob, s, "throughput", algorithm)
                    thr = evaluate(plan, prob).pipeline_tokens_per_s
                except (Infeasible, PlannerLimit):
                    thr = None
            row[s] = {"ms_per_token": None if lat is None else lat * 1e3, "tokens_per_s": thr}
        points.append(row)
    return {
        "link": [prof.names[a], prof.names[b]],
        "pipelined": pipeline is not None,
        "strategies": list(strategies),
        "points": points,
    }


def format_sweep(rep: dict) -> str:
    a, b = rep["link"]
    thr = (
        "tokens/s of the pipelined choice"
        if rep["pipelined"]
        else "tokens/s bound (batch / bottleneck, enough micro-batches in flight)"
    )
    lines = [f"sweep of the {a} <-> {b} link: ms/token (latency objective) | {thr}"]
    lines.append(f"{'Mb/s':>7}  " + "".join(f"{s:>24}" for s in rep["strategies"]))
    for pt in rep["points"]:
        cells = []
        for s in rep["strategies"]:
            v = pt[s]
            ms = "OOM" if v["ms_per_token"] is None else f"{v['ms_per_token']:.1f}"
            tp = "OOM" if v["tokens_per_s"] is None else f"{v['tokens_per_s']:.2f}"
            cells.append(f"{ms + ' | ' + tp:>24}")
        lines.append(f"{pt['mbps']:>7g}  " + "".join(cells))
    return "\n".join(lines)


def plot_sweep(rep: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [pt["mbps"] for pt in rep["points"]]
    for s in rep["strategies"]:
        lat = [pt[s]["ms_per_token"] for pt in rep["points"]]
        thr = [pt[s]["tokens_per_s"] for pt in rep["points"]]
        ax1.plot(x, [float("nan") if v is None else v for v in lat], "o-", label=s)
        ax2.plot(x, [float("nan") if v is None else v for v in thr], "o-", label=s)
    a, b = rep["link"]
    for ax, title, unit in (
        (ax1, "latency (sequential)", "ms/token"),
        (
            ax2,
            # Without --pipeline the figure is the plan's bound (batch / bottleneck: enough
            # micro-batches in flight), as the table's header says, not a sequential rate.
            "throughput (pipelined choice)"
            if rep["pipelined"]
            else "throughput bound (batch / bottleneck)",
            "tokens/s",
        ),
    ):
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel(f"{a} <-> {b} bandwidth (Mb/s)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle("predicted by the planner's cost model (missing points: out of memory)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_offline(
    profile,
    strategies,
    objective,
    algorithm,
    profile_strategy,
    batch,
    source,
    pipeline,
    prompts,
    size,
    count,
    order,
    sweep_spec,
    png,
    as_json,
) -> str:
    """The text `plan --pipeline / --sweep` prints; ValueError/ProfileError for bad input."""
    import json

    from . import schedule as sch
    from .planner.problem import load_profile

    prof = load_profile(profile)
    if source is not None:
        if not 0 <= source < prof.n_devices:
            raise ValueError(f"--source {source}: the profile has devices 0..{prof.n_devices - 1}")
        prof = dataclasses.replace(prof, source=source)
    strategies = list(strategies or STRATEGIES)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"--strategy {bad[0]!r}: one of {', '.join(STRATEGIES)}")
    if order not in sch.ORDERS:
        raise ValueError(f"--order {order!r}: one of {', '.join(sch.ORDERS)}")
    if prompts < 1 or (size is not None and (size < 1 or prompts % size)):
        raise ValueError("--micro-batch-size must divide --prompts (both >= 1)")
    if count is not None and count < 1:
        raise ValueError("--micro-batches must be >= 1")
    pipe = {"prompts": prompts, "size": size, "count": count, "order": order} if pipeline else None
    out: dict = {}
    text = []
    if pipeline:
        rows = [
            pipeline_choice(prof, s, objective, algorithm, profile_strategy, **pipe)
            for s in strategies
        ]
        out["pipeline"] = rows
        text.append(format_pipeline(rows, prompts))
    if sweep_spec:
        rep = sweep(prof, sweep_spec, strategies, algorithm, profile_strategy, batch, pipe)
        out["sweep"] = rep
        path = plot_sweep(rep, Path(png))
        text += ["", format_sweep(rep), f"wrote {path}"]
    return json.dumps(out, indent=1, default=str) if as_json else "\n".join(text)


__all__ = ["STRATEGIES", "format_pipeline", "format_sweep", "pipeline_choice", "plot_sweep"]
