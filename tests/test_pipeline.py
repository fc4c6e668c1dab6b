"""Pipelined schedules and batch-size-aware planning (pure: no MPI, no torch)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeshard_mpi import schedule as sch
from edgeshard_mpi.planner.baselines import check_fits, make_plan
from edgeshard_mpi.planner.cost import evaluate
from edgeshard_mpi.planner.pipeline import (
    choose,
    closed_form_bubbles,
    max_in_flight,
    predict,
)
from edgeshard_mpi.planner.plan import even_plan
from edgeshard_mpi.planner.problem import Infeasible, load_profile, make_problem

UNIT = (lambda stage, step: 1.0, lambda src, dst, stage, step: 0.0)


@pytest.mark.parametrize("n_stages", [1, 2, 3, 5])
@pytest.mark.parametrize("micro", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_bubbles_order_matches_the_closed_form(n_stages, micro, steps):
    shape = sch.Shape(groups=micro, slots=micro, steps=steps)
    sim = sch.simulate(list(range(n_stages)), shape, "bubbles", *UNIT)
    cf = closed_form_bubbles(n_stages, micro, steps)
    assert sim.makespan == cf["bubbles_makespan"]
    for rank in range(n_stages):
        assert sim.idle(rank) == cf["bubbles_idle_per_stage"]
    nb = sch.simulate(list(range(n_stages)), shape, "no-bubbles", *UNIT)
    if cf["no_bubbles_makespan"] is not None:
        assert nb.makespan == cf["no_bubbles_makespan"]
    assert nb.makespan <= sim.makespan  # no-bubbles is never slower


def test_grid_of_a_small_case():
    shape = sch.Shape(groups=2, slots=2, steps=2)
    assert sch.grid([0, 1], shape, "bubbles").splitlines() == [
        "rank 0  |P0 P1 ...D0 D1 ...",
        "rank 1  |...P0 P1 ...D0 D1 ",
        "makespan 6 ticks; idle per rank: r0 2, r1 2",
    ]
    assert sch.grid([0, 1], shape, "no-bubbles").splitlines() == [
        "rank 0  |P0 P1 D0 D1 ...",
        "rank 1  |...P0 P1 D0 D1 ",
        "makespan 5 ticks; idle per rank: r0 1, r1 1",
    ]


def test_grid_with_a_slow_prefill_and_a_recurring_rank():
    shape = sch.Shape(groups=1, slots=1, steps=2)
    text = sch.grid([0, 1, 0], shape, "no-bubbles", lambda s, k: 2.0 if k == 0 else 1.0)
    rows = text.splitlines()
    # Ticks of 1: rank 0 runs stages 0 and 2, so it waits for rank 1 in between.
    assert rows[0] == "rank 0  |P0 P0 ......P0 P0 D0 ...D0 "
    assert rows[1] == "rank 1  |......P0 P0 .........D0 ..."


@pytest.fixture(scope="module")
def prof7b():
    return load_profile("paper-llama2-7b")


def test_prediction_of_a_sequential_run_equals_the_cost_model(prof7b):
    prob = make_problem(prof7b, 1, "workload")
    plan = make_plan(prob, "edgeshard", "latency")
    pred = predict(plan, prob, groups=3, slots=1)
    ev = evaluate(plan, prob)
    g = prof7b.new_tokens
    # One group at a time: its wall time is the prefill plus G-1 decode steps, each a
    # full walk of the chain (token return included).
    assert pred.makespan_s == pytest.approx(3 * (ev.prefill_s + (g - 1) * ev.decode_s))
    assert pred.tokens_per_s == pytest.approx(1 / ev.per_token_s)


def test_more_micro_batches_in_flight_raise_predicted_throughput(prof7b):
    prob = make_problem(prof7b, 1)
    plan = make_plan(prob, "edgeshard", "throughput")
    tps = [predict(plan, prob, 8, s).tokens_per_s for s in (1, 2, 4, 8)]
    assert tps == sorted(tps) and tps[-1] > 1.5 * tps[0]
    # ... up to the bottleneck bound of the cost model.
    bound = evaluate(plan, prob).pipeline_tokens_per_s
    assert tps[-1] <= bound * 1.001


def test_no_bubbles_beats_bubbles_on_a_real_plan(prof7b):
    prob = make_problem(prof7b, 4)
    plan = make_plan(prob, "edgeshard", "throughput")
    s = len(plan.stages)
    nb = predict(plan, prob, 2 * s, s, "no-bubbles")
    bb = predict(plan, prob, 2 * s, s, "bubbles")
    assert nb.tokens_per_s > bb.tokens_per_s


def test_memory_counts_every_micro_batch_in_flight(prof7b):
    # Shrink the budgets so that KV caches matter: 7B on the source plus a little room.
    plan = even_plan(prof7b.n_units, [0])
    weights = prof7b.unit_memory(8, 0).sum()
    kv = prof7b.unit_memory(8, 1).sum() - weights
    budget = prof7b.memory_budget.copy()
    budget[0] = weights + 3.5 * kv
    tight = dataclasses.replace(prof7b, memory_budget=budget)
    assert max_in_flight(plan, tight, 8) == 3
    check_fits(plan, make_problem(tight, 8, slots=3))
    with pytest.raises(Infeasible, match="out of memory"):
        check_fits(plan, make_problem(tight, 8, slots=4))


def test_choose_takes_the_best_feasible_candidate(prof7b):
    choice = choose(
        prof7b,
        prompts=32,
        make_plan=lambda prob: make_plan(prob, "edgeshard", "throughput"),
        sizes=(1, 2, 4, 8),
        slots=(1, 2, 4),
        order="no-bubbles",
    )
    feasible = [c for c in choice.candidates if c["feasible"]]
    assert len(feasible) == 12
    best = max(c["predicted_tokens_per_s"] for c in feasible)
    assert choice.prediction.tokens_per_s >= best * 0.99
    chosen = evaluate(choice.plan, choice.problem)
    assert chosen.feasible and choice.problem.slots == choice.micro_batches
    assert 1 <= choice.micro_batches <= max_in_flight(choice.plan, prof7b, choice.micro_batch_size)


def test_choose_trades_batch_size_against_memory(prof7b):
    """With room for one small KV cache only, large micro-batches are infeasible and the
    planner says so per candidate, choosing among those that fit."""
    one_device = dataclasses.replace(
        prof7b,
        memory_budget=np.where(
            np.arange(prof7b.n_devices) == 0,
            prof7b.unit_memory(0, 0).sum()
            + 1.01 * (prof7b.unit_memory(2, 1) - prof7b.unit_memory(2, 0)).sum(),
            1.0,
        ),
    )
    choice = choose(
        one_device,
        prompts=8,
        make_plan=lambda prob: make_plan(prob, "edgeshard", "throughput"),
        sizes=(1, 2, 4, 8),
        slots=(1, 2),
    )
    assert choice.micro_batch_size * choice.micro_batches <= 2
    errors = [c for c in choice.candidates if not c["feasible"]]
    assert errors and all("memory" in c["error"] or "GB" in c["error"] for c in errors)


def test_choose_with_nothing_feasible_says_why(prof7b):
    none = dataclasses.replace(prof7b, memory_budget=np.full(prof7b.n_devices, 1e6))
    with pytest.raises(Infeasible, match="no micro-batch size and count fits"):
        choose(none, 4, lambda p: make_plan(p, "edgeshard", "throughput"), (1, 2), (1,))


def with_cloud_link(prof, mbps: float):
    bw = prof.bandwidth.copy()
    s, c = prof.source, prof.cloud
    bw[s, c] = bw[c, s] = mbps * 1e6 / 8
    return dataclasses.replace(prof, bandwidth=bw)


@pytest.mark.parametrize(("model", "mbps"), [("7b", 1), ("7b", 10), ("7b", 50), ("13b", 50)])
def test_edgeshard_pipeline_never_loses_to_a_baseline_it_contains(model, mbps):
    """Joint over plan x size x count: EdgeShard's predicted tokens/s is at least every
    baseline's (their plans are among its candidates), within the 1% margin in which the
    choice prefers the smaller memory footprint."""
    from edgeshard_mpi.planner.pipeline import TIE, candidate_plans

    prof = with_cloud_link(load_profile(f"paper-llama2-{model}"), mbps)
    kw = dict(prompts=8, sizes=(1,), slots=(1, 2, 4), order="no-bubbles")
    es = choose(prof, make_plan=lambda p: candidate_plans(p, "edgeshard"), **kw)
    es_best = max(c["predicted_tokens_per_s"] for c in es.candidates if c["feasible"])
    for base in ("cloud-edge-opt", "edge-solo"):
        try:
            ch = choose(prof, make_plan=lambda p, b=base: make_plan(p, b, "throughput"), **kw)
        except Infeasible:
            continue
        assert es_best >= ch.prediction.tokens_per_s * (1 - 1e-12), base
        assert es.prediction.tokens_per_s >= ch.prediction.tokens_per_s * (1 - TIE), base
