"""Pipelined inference: predict a schedule's throughput from profile costs, and choose the
plan, micro-batch size and micro-batches in flight together (pure: numpy, no torch or MPI).

The paper plans for one batch size and leaves batch-size-aware planning as future work.
Here memory counts the KV cache of every micro-batch in flight (Problem.slots), so a plan
that holds more micro-batches, or larger ones, is traded against one that computes faster.
The choice is joint over plan x micro-batch size x count in flight: for each (size b, in
flight S) every candidate plan is simulated (the same action lists the runtime walks) and
the best predicted tokens/s wins, ties going to the smaller memory footprint. EdgeShard's
candidates are its bottleneck-optimal and latency-optimal plans and the plan of every
baseline (Edge-Solo, Cloud-Edge-Even/Opt, EdgeShard-Even): all lie in its search space, so
its predicted throughput is never below theirs. The bottleneck-optimal plan alone can lose:
an extra stage that S micro-batches in flight cannot keep busy costs more than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import schedule as sch
from .contention import stage_factors
from .plan import Plan
from .problem import TOKEN_BYTES, Infeasible, PlannerLimit, Problem, Profile, make_problem

SIM_ACTION_LIMIT = 200_000  # beyond this a prediction simulates a few rounds and scales
TIE = 0.01  # candidates within 1% of the best throughput count as tied


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float
    makespan_s: float
    busy_fraction: tuple[float, ...]
    """Per stage: compute time / makespan."""
    idle_s: tuple[float, ...]
    """Per stage: makespan - compute (the bubbles, plus waiting on links)."""
    simulated_groups: int

    def to_dict(self) -> dict:
        return {
            "tokens_per_s": float(self.tokens_per_s),
            "makespan_s": float(self.makespan_s),
            "busy_fraction": [float(x) for x in self.busy_fraction],
            "idle_s": [float(x) for x in self.idle_s],
            "simulated_groups": self.simulated_groups,
        }


def cost_functions(plan: Plan, prob: Problem, in_flight: int = 1):
    """(compute_s(stage, step), hop_s(src, dst, stage, step)) for schedule.simulate, from
    the profile at the problem's batch size, `in_flight` micro-batches in flight. Step 0
    is the prefill."""
    stages = plan.stages
    # Stages busy together share their host's cores (planner/contention.py).
    slow = stage_factors(prob.profile, [s.rank for s in stages], in_flight)
    pre = [float(prob.prefill[s.rank, s.start : s.end].sum()) for s in stages]
    dec = [float(prob.decode[s.rank, s.start : s.end].sum()) for s in stages]
    pre, dec = (
        [x * f for x, f in zip(pre, slow, strict=True)],
        [x * f for x, f in zip(dec, slow, strict=True)],
    )
    extra = prob.source_stage_extra_s(stages[0].end)  # its wake-up past the embedding
    pre[0], dec[0] = pre[0] + extra, dec[0] + extra
    lat, bw = prob.profile.latency_s, prob.profile.bandwidth
    ret = prob.return_s()
    last = len(stages) - 1
    # A dilated device sleeps its dilation after every call, so each of its calls pays
    # its wake-up (self_wake_s) whether it waited or not: CPU it spends, charged to its
    # compute here and taken out of the hop into it, which would otherwise hold the link
    # for it (a pipeline's busy stages do not wait, and a link carries the next message
    # before the last one's wake-up is over).
    # The source's return hop of a chain carries only the embedding's part (Problem.return_s).
    own = prob.self_wake_s()
    moved = [float(own[st.rank]) for st in stages]
    if last > 0 and moved[0] > 0:
        moved[0] = max(moved[0] - prob.source_layers_wake_s(), 0.0)
    pre = [x + w for x, w in zip(pre, moved, strict=True)]
    dec = [x + w for x, w in zip(dec, moved, strict=True)]

    def compute_s(stage: int, step: int) -> float:
        return pre[stage] if step == 0 else dec[stage]

    def hop_s(src: int, dst: int, stage: int, step: int) -> tuple[float, float]:
        """(the link busy, the message's arrival): only its bytes hold the link."""
        if stage == last:
            busy = prob.batch * TOKEN_BYTES / bw[src, dst]
            return float(busy), float(max(ret[src] - moved[0], busy))
        cut = stages[stage].end - 1
        size = prob.act_prefill[cut] if step == 0 else prob.act_decode[cut]
        busy = size / bw[src, dst]
        return float(busy), float(max(lat[src, dst] - moved[stage + 1], 0.0) + busy)

    return compute_s, hop_s


def predict(
    plan: Plan, prob: Problem, groups: int, slots: int, order: str = "no-bubbles"
) -> Prediction:
    """Simulated throughput of `groups` micro-batches of prob.batch sequences, `slots` in
    flight. A long workload is simulated for a few rounds of slots and scaled."""
    steps = prob.profile.new_tokens
    n_stages = len(plan.stages)
    per_group = steps * (3 * n_stages + 1)
    sim_groups = groups
    if groups * per_group > SIM_ACTION_LIMIT:
        rounds = max(2, SIM_ACTION_LIMIT // (per_group * slots))
        sim_groups = min(groups, rounds * slots)
    shape = sch.Shape(groups=sim_groups, slots=min(slots, sim_groups), steps=steps)
    compute_s, hop_s = cost_functions(plan, prob, shape.active_slots)
    ranks = [s.rank for s in plan.stages]
    sim = sch.simulate(ranks, shape, order, compute_s, hop_s)
    busy = [0.0] * n_stages
    for s in range(n_stages):  # per stage, not per rank: a rank may hold two stages
        busy[s] = sum(
            compute_s(s, shape.group_step(j, it)[1])
            for j in range(shape.active_slots)
            for it in range(shape.iterations(j))
        )
    span = sim.makespan
    return Prediction(
        tokens_per_s=sim_groups * prob.batch * steps / span,
        makespan_s=span * groups / sim_groups,
        busy_fraction=tuple(b / span for b in busy),
        idle_s=tuple((span - b) * groups / sim_groups for b in busy),
        simulated_groups=sim_groups,
    )


def max_in_flight(plan: Plan, profile: Profile, batch: int) -> int:
    """The most micro-batches of `batch` sequences the plan's devices can hold (weights
    once, one KV cache per micro-batch in flight)."""
    weights = profile.unit_memory(batch, 0)
    kv = profile.unit_memory(batch, 1) - weights
    best = None
    for rank in plan.ranks:
        units = [u for s in plan.stages if s.rank == rank for u in range(s.start, s.end)]
        room = profile.memory_budget[rank] - weights[units].sum()
        need = kv[units].sum()
        if room < 0:
            return 0
        if need > 0:
            k = int(room // need)
            best = k if best is None else min(best, k)
    return 10**6 if best is None else best


@dataclass
class Choice:
    plan: Plan
    micro_batch_size: int
    micro_batches: int
    prediction: Prediction
    problem: Problem
    candidates: list[dict] = field(default_factory=list)


def candidate_plans(
    prob: Problem, strategy: str, objective: str = "throughput", algorithm: str = "exact"
) -> list[Plan]:
    """The plans a pipelined `strategy` chooses among (see the module doc); Infeasible if
    none fits."""
    from .baselines import STRATEGIES, make_plan

    if strategy != "edgeshard":
        return [make_plan(prob, strategy, objective, algorithm)]
    out, errors = [], []
    tries = [("edgeshard", o) for o in (objective, "latency", "throughput")]
    tries += [(s, o) for s in STRATEGIES[1:] for o in ("throughput", "latency")]
    for s, o in tries:
        try:
            plan = make_plan(prob, s, o, algorithm)
        except (Infeasible, PlannerLimit) as e:
            errors.append(str(e))
            continue
        if all(plan.stages != p.stages for p in out):
            # Labelled as the job's plan; where it came from stays in info["candidate"].
            info = plan.info | {"candidate": f"{plan.strategy}/{plan.objective}"}
            out.append(Plan(plan.stages, strategy, objective, info))
    if not out:
        raise Infeasible(errors[0])
    return out


def choose(
    profile: Profile,
    prompts: int,
    make_plan,
    sizes: tuple[int, ...],
    slots: tuple[int, ...],
    order: str = "no-bubbles",
    profile_strategy: str = "average",
) -> Choice:
    """The best (plan, micro-batch size, micro-batches in flight) by predicted throughput.

    make_plan(problem) -> Plan, or a list of plans to choose among (candidate_plans), for
    one candidate size and count (the DP for planned strategies, or a fixed plan); it may
    raise Infeasible. Sizes must divide `prompts`; `slots` are tried
    as given (capped at the number of micro-batches)."""
    candidates, best, best_key = [], None, None
    for b in sizes:
        if prompts % b:
            continue
        groups = prompts // b
        for s in sorted({min(x, groups) for x in slots}):
            row = {"micro_batch_size": b, "micro_batches": s}
            try:
                prob = make_problem(profile, b, profile_strategy, slots=s)
                plans = make_plan(prob)
            except (Infeasible, PlannerLimit) as e:
                candidates.append(row | {"feasible": False, "error": str(e)})
                continue
            for plan in plans if isinstance(plans, list) else [plans]:
                pred = predict(plan, prob, groups, s, order)
                candidates.append(
                    row
                    | {
                        "feasible": True,
                        "plan": plan.info.get("candidate", f"{plan.strategy}/{plan.objective}"),
                        "stages": [[st.rank, st.start, st.end] for st in plan.stages],
                        "predicted_tokens_per_s": pred.tokens_per_s,
                        "max_micro_batches": max_in_flight(plan, profile, b),
                    }
                )
                # Highest throughput; within TIE of it, the smallest footprint (b * s).
                key = (pred.tokens_per_s, -b * s)
                if best is None or _better(key, best_key):
                    best, best_key = Choice(plan, b, s, pred, prob), key
    if best is None:
        reasons = "; ".join(
            f"b={c['micro_batch_size']} x {c['micro_batches']}: {c['error']}" for c in candidates
        )
        raise Infeasible(
            "no micro-batch size and count fits: " + (reasons or "no size divides the prompts")
        )
    best.candidates = candidates
    return best


def _better(key, best_key) -> bool:
    tps, neg_mem = key
    best_tps, best_neg_mem = best_key
    if tps > best_tps * (1 + TIE):
        return True
    if tps >= best_tps * (1 - TIE):
        return neg_mem > best_neg_mem or (neg_mem == best_neg_mem and tps > best_tps)
    return False


def closed_form_bubbles(n_stages: int, micro_batches: int, steps: int) -> dict:
    """Unit compute per stage, free links: the bubbles order runs each step in
    micro_batches + n_stages - 1 units (GPipe's fill and drain), so each stage idles
    n_stages - 1 units per step; no-bubbles with micro_batches >= n_stages never lets
    the source idle after the first fill."""
    return {
        "bubbles_makespan": steps * (micro_batches + n_stages - 1),
        "bubbles_idle_per_stage": steps * (n_stages - 1),
        "no_bubbles_makespan": (
            steps * micro_batches + n_stages - 1 if micro_batches >= n_stages else None
        ),
    }


def pipeline_summary(
    stage_compute_s: np.ndarray, wall_s: float, tokens: int, predicted: Prediction | None
) -> dict:
    """Measured figures of a run beside the prediction: throughput, busy and idle."""
    busy = np.asarray(stage_compute_s, dtype=float)
    out = {
        "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "busy_fraction": (busy / wall_s).tolist(),
        "idle_s": (wall_s - busy).tolist(),
    }
    if predicted is not None:
        out["predicted"] = predicted.to_dict()
        out["measured_over_predicted"] = out["tokens_per_s"] / predicted.tokens_per_s
    return out
