"""The planner against brute force: every plan of small instances is enumerated."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard_mpi.planner.baselines import make_plan, plan_all
from edgeshard_mpi.planner.chain import solve_chain
from edgeshard_mpi.planner.cost import evaluate
from edgeshard_mpi.planner.latency import exact_latency, paper_algorithm1
from edgeshard_mpi.planner.plan import Plan, Stage
from edgeshard_mpi.planner.problem import Infeasible, Profile, make_problem
from edgeshard_mpi.planner.throughput import exact_throughput, paper_algorithm2
from edgeshard_mpi.planner.uniform import uniform_structure
from edgeshard_mpi.presets import ModelSpec

EXAMPLES = int(os.environ.get("PLANNER_EXAMPLES", 60))  # raise it for a deeper search


def random_profile(
    rng: np.random.Generator,
    m: int,
    n: int,
    *,
    tight: float = 1.0,
    head_holders: int | None = None,
    cloud: bool = True,
) -> Profile:
    """m devices, n units; `tight` scales budgets (smaller = tighter); `head_holders` devices
    alone can run the last unit."""
    spec = ModelSpec("rand", 8, n - 2, 1, 1, 8, 16)
    pre = rng.uniform(0.5, 5.0, (1, m, n))
    dec = rng.uniform(0.1, 2.0, (1, m, n))
    if head_holders is not None:
        pre[0, head_holders:, -1] = np.inf
        dec[0, head_holders:, -1] = np.inf
    weights = rng.uniform(1, 10, n)
    budget = rng.uniform(0.2, 0.7, m) * weights.sum() * tight
    lat = rng.uniform(0.0, 1.0, (m, m))  # asymmetric on purpose
    bw = rng.uniform(0.5, 4.0, (m, m))
    np.fill_diagonal(lat, 0)
    np.fill_diagonal(bw, np.inf)
    return Profile(
        spec,
        "float32",
        2,
        3,
        (1,),
        tuple(f"d{i}" for i in range(m)),
        budget,
        pre,
        dec,
        weights,
        np.zeros(n),
        rng.uniform(0.5, 2, n),
        lat,
        bw,
        source=0,
        cloud=m - 1 if cloud and m > 1 else None,
    )


def brute(prob, objective: str, devices=None, repeats: bool = False):
    """Best feasible value over every chain (distinct devices unless `repeats`)."""
    m, n, src = prob.n_devices, prob.n_units, prob.source
    allowed = sorted(set(devices if devices is not None else range(m)) | {src})
    best, best_plan = np.inf, None
    if repeats:
        plans = (
            Plan.from_assignment([src, *rest]) for rest in itertools.product(allowed, repeat=n - 1)
        )
    else:
        others = [d for d in allowed if d != src]

        def gen():
            for k in range(min(len(others), n - 1) + 1):
                for seq in itertools.permutations(others, k):
                    chain = [src, *seq]
                    for cuts in itertools.combinations(range(1, n), len(chain) - 1):
                        b = [0, *cuts, n]
                        yield Plan(tuple(Stage(d, b[i], b[i + 1]) for i, d in enumerate(chain)))

        plans = gen()
    for plan in plans:
        ev = evaluate(plan, prob)
        if not ev.feasible:
            continue
        v = ev.latency_s if objective == "latency" else ev.bottleneck_s
        if v < best:
            best, best_plan = v, plan
    return best, best_plan


def value(plan, prob, objective):
    ev = evaluate(plan, prob)
    assert ev.feasible, (plan.describe(), ev.over_budget)
    assert len({s.rank for s in plan.stages}) == len(plan.stages), "a device repeats"
    assert plan.stages[0].rank == prob.source and plan.stages[0].start == 0
    return ev.latency_s if objective == "latency" else ev.bottleneck_s


instances = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(2, 5),
    st.integers(3, 8),
    st.sampled_from([0.6, 1.0, 2.0]),
    st.sampled_from([None, 1, 2]),
    st.sampled_from(["prefill", "decode", "average", "workload"]),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances, st.sampled_from(["latency", "throughput"]))
def test_exact_solvers_match_brute_force(inst, objective):
    seed, m, n, tight, heads, strategy = inst
    prob = make_problem(
        random_profile(np.random.default_rng(seed), m, n, tight=tight, head_holders=heads),
        strategy=strategy,
    )
    want, _ = brute(prob, objective)
    solver = exact_latency if objective == "latency" else exact_throughput
    if not np.isfinite(want):
        with pytest.raises(Infeasible):
            solver(prob)
        return
    got = value(solver(prob), prob, objective)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances)
def test_paper_algorithm2_matches_brute_force(inst):
    seed, m, n, tight, heads, strategy = inst
    prob = make_problem(
        random_profile(np.random.default_rng(seed), m, n, tight=tight, head_holders=heads),
        strategy=strategy,
    )
    want, _ = brute(prob, "throughput")
    if not np.isfinite(want):
        with pytest.raises(Infeasible):
            paper_algorithm2(prob)
        return
    assert value(paper_algorithm2(prob), prob, "throughput") == pytest.approx(want, rel=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(3, 7))
def test_paper_algorithm1_is_the_shortest_path_when_memory_is_ample(seed, m, n):
    """With memory to spare, Algorithm 1 is exact over chains where devices may recur."""
    prob = make_problem(random_profile(np.random.default_rng(seed), m, n, tight=100.0))
    want, _ = brute(prob, "latency", repeats=True)
    plan = paper_algorithm1(prob)
    assert evaluate(plan, prob).latency_s == pytest.approx(want, rel=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances)
def test_paper_algorithm1_plans_fit_their_memory(inst):
    seed, m, n, tight, heads, strategy = inst
    prob = make_problem(
        random_profile(np.random.default_rng(seed), m, n, tight=tight, head_holders=heads),
        strategy=strategy,
    )
    try:
        plan = paper_algorithm1(prob)
    except Infeasible:
        return
    ev = evaluate(plan, prob)
    assert ev.feasible
    exact, _ = brute(prob, "latency", repeats=True)
    assert ev.latency_s >= exact - 1e-9  # greedy memory can only lose, never beat


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 5),
    st.integers(3, 7),
    st.sampled_from(["latency", "throughput"]),
)
def test_cloud_edge_opt_is_the_two_device_optimum(seed, m, n, objective):
    prob = make_problem(random_profile(np.random.default_rng(seed), m, n, tight=2.0))
    cloud = prob.profile.cloud
    want, _ = brute(prob, objective, devices=[0, cloud])
    try:
        plan = make_plan(prob, "cloud-edge-opt", objective)
    except Infeasible:
        assert not np.isfinite(want)
        return
    assert {s.rank for s in plan.stages} <= {0, cloud}
    assert value(plan, prob, objective) == pytest.approx(want, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 5),
    st.integers(4, 8),
    st.sampled_from(["latency", "throughput"]),
)
def test_edgeshard_is_never_worse_than_any_baseline(seed, m, n, objective):
    prob = make_problem(random_profile(np.random.default_rng(seed), m, n, tight=2.0))
    plans = plan_all(prob, objective)
    if isinstance(plans["edgeshard"], Infeasible):
        assert all(isinstance(p, Infeasible) for p in plans.values())
        return
    best = value(plans["edgeshard"], prob, objective)
    for name, p in plans.items():
        if isinstance(p, Plan):
            ev = evaluate(p, prob)
            assert ev.feasible, name
            assert best <= (ev.latency_s if objective == "latency" else ev.bottleneck_s) + 1e-9


def test_repeats_in_the_relaxation_are_resolved():
    """A head only the source can run tempts the relaxed DP into source -> fast -> source;
    the exact solver must still return a chain of distinct devices (or prove none)."""
    rng = np.random.default_rng(4)
    prof = random_profile(rng, 3, 6, tight=100.0, head_holders=1)
    prof.prefill_s[0, 1] *= 0.01  # device 1 very fast in the middle
    prof.decode_s[0, 1] *= 0.01
    prob = make_problem(prof)
    plan = exact_latency(prob)
    want, _ = brute(prob, "latency")
    assert value(plan, prob, "latency") == pytest.approx(want)
    assert plan.info["passes"] >= 2 and plan.info["tracked_devices"] >= 1
    relaxed = paper_algorithm1(prob)
    assert len({s.rank for s in relaxed.stages}) < len(relaxed.stages)  # Alg. 1 repeats


def test_infeasible_message_gives_numbers():
    rng = np.random.default_rng(0)
    prof = random_profile(rng, 3, 5, tight=0.3)
    prob = make_problem(prof)
    with pytest.raises(Infeasible) as err:
        make_plan(prob, "edge-solo")
    assert "infeasible" in str(err.value) and "GB" in str(err.value)


def uniform_profile(
    rng: np.random.Generator, m: int, n: int, tight: float, no_head: int, no_layers: bool
) -> Profile:
    """Alike decoder layers (as in a Llama): per device one layer cost; some devices cannot
    run the head, and optionally one device cannot run layers at all."""
    spec = ModelSpec("rand", 8, n - 2, 1, 1, 8, 16)

    def phase(lo, hi):
        t = np.repeat(rng.uniform(lo, hi, (1, m, 1)), n, axis=2)
        t[0, :, 0] = rng.uniform(0.01, 0.1, m)
        t[0, :, -1] = rng.uniform(lo, hi, m)
        t[0, m - no_head :, -1] = np.inf if no_head else t[0, m - no_head :, -1]
        if no_layers and m > 2:
            t[0, 1, 1:-1] = np.inf
        return t

    pre, dec = phase(0.5, 5.0), phase(0.1, 2.0)
    weights = np.full(n, rng.uniform(1, 10))
    weights[0], weights[-1] = rng.uniform(1, 10), rng.uniform(1, 10)
    budget = rng.uniform(0.2, 0.7, m) * weights.sum() * tight
    lat = rng.uniform(0.0, 1.0, (m, m))
    bw = rng.uniform(0.5, 4.0, (m, m))
    np.fill_diagonal(lat, 0)
    np.fill_diagonal(bw, np.inf)
    act = np.full(n, rng.uniform(0.5, 2))
    act[-1] = 0.1
    return Profile(
        spec,
        "float32",
        2,
        3,
        (1,),
        tuple(f"d{i}" for i in range(m)),
        budget,
        pre,
        dec,
        weights,
        np.zeros(n),
        act,
        lat,
        bw,
        source=0,
        cloud=m - 1,
    )


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 5),
    st.integers(3, 8),
    st.sampled_from([0.6, 1.0, 2.0, 10.0]),
    st.integers(0, 2),
    st.booleans(),
    st.sampled_from(["latency", "throughput"]),
    st.sampled_from(["prefill", "decode", "average", "workload"]),
)
def test_uniform_solver_matches_brute_force(
    seed, m, n, tight, no_head, no_layers, objective, strategy
):
    prob = make_problem(
        uniform_profile(np.random.default_rng(seed), m, n, tight, min(no_head, m - 1), no_layers),
        strategy=strategy,
    )
    assert uniform_structure(prob) is not None
    want, _ = brute(prob, objective)
    if not np.isfinite(want):
        with pytest.raises(Infeasible):
            solve_chain(prob, objective, method="uniform")
        return
    plan = solve_chain(prob, objective, method="uniform")
    assert plan.info["algorithm"] == "uniform-held-karp"
    assert value(plan, prob, objective) == pytest.approx(want, rel=1e-9, abs=1e-12)
    general = solve_chain(prob, objective, method="general")
    assert value(general, prob, objective) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_shipped_profiles_are_reproducible(tmp_path):
    """The testbed profiles are the roofline derivation's output, number for number."""
    import json

    from edgeshard_mpi.planner.roofline import write_shipped

    for path in write_shipped(tmp_path):
        shipped = path.parents[0].parent / path.name
        ours = json.loads(path.read_text())
        from importlib import resources

        ref = json.loads(
            resources.files("edgeshard_mpi").joinpath(f"resources/profiles/{path.name}").read_text()
        )
        assert ours == ref, shipped
