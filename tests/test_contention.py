"""Pipelined stages that share a host's cores are charged the measured slowdown (pure)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from edgeshard_mpi.planner.contention import stage_factors
from edgeshard_mpi.planner.pipeline import predict
from edgeshard_mpi.planner.plan import even_plan
from edgeshard_mpi.planner.problem import load_profile, make_problem


@pytest.fixture(scope="module")
def prof():
    base = load_profile("paper-llama2-7b")
    n = len(base.names)
    meta = dict(base.meta, hosts=["vm"] * n, host_cores=[2] * n, contention=[1.5] * n)
    return base, dataclasses.replace(base, meta=meta)


def test_factor_grows_with_the_ranks_busy_beyond_the_cores(prof):
    _, p = prof
    n = len(p.names)
    assert stage_factors(p, [0, 1], in_flight=4) == [1.0, 1.0]  # fits 2 cores
    assert stage_factors(p, list(range(n)), in_flight=n) == [1.5] * n  # every rank busy
    mid = stage_factors(p, [0, 1, 2], in_flight=4)
    assert all(1.0 < f < 1.5 for f in mid)
    assert stage_factors(p, [0, 1, 2], in_flight=1) == [1.0] * 3  # one at a time


def test_no_measurement_no_charge(prof):
    base, _ = prof
    assert stage_factors(base, [0, 1, 2], in_flight=4) == [1.0] * 3


def test_pipelined_prediction_pays_the_contention(prof):
    base, p = prof
    n = len(p.names)
    plan = even_plan(p.model.n_units, list(range(n)))
    slow = predict(plan, make_problem(p, 1, "workload"), groups=n, slots=n)
    fast = predict(plan, make_problem(base, 1, "workload"), groups=n, slots=n)
    assert slow.tokens_per_s < fast.tokens_per_s
    one = predict(plan, make_problem(p, 1, "workload"), groups=1, slots=1)
    same = predict(plan, make_problem(base, 1, "workload"), groups=1, slots=1)
    assert one.tokens_per_s == pytest.approx(same.tokens_per_s)


def with_meta(base, **meta):
    return dataclasses.replace(base, meta=dict(base.meta, **meta))


def test_stages_within_the_cores_pay_the_cores_factor(prof):
    """Busy ranks that fit the cores share memory bandwidth: charged up to the factor
    measured with as many ranks as cores at once, then on to the all-ranks factor."""
    base, p = prof
    n = len(p.names)
    q = with_meta(p, contention_cores=[1.3] * n)
    assert stage_factors(q, [0], in_flight=4) == [1.0]  # alone: its profile
    assert stage_factors(q, [0, 1], in_flight=4) == pytest.approx([1.3, 1.3])
    assert stage_factors(q, [0, 1], in_flight=1) == [1.0, 1.0]  # one computes at a time
    three = stage_factors(q, [0, 1, 2], in_flight=4)
    assert all(1.3 < f < 1.5 for f in three)
    assert stage_factors(q, list(range(n)), in_flight=n) == pytest.approx([1.5] * n)
    # A host with no more ranks than cores: every rank at once is the cores' measurement.
    fits = with_meta(base, hosts=["a", "a"] + ["b"] * (n - 2), host_cores=[4] * n,
                     contention=[1.2] * n, contention_cores=[9.0] * n)  # fmt: skip
    assert stage_factors(fits, [0, 1], in_flight=2) == pytest.approx([1.2, 1.2])


def test_core_groups_measure_every_rank_once_with_the_cores_busy():
    from edgeshard_mpi.contention import core_groups

    for n, cores in itertools.product(range(1, 9), range(1, 5)):
        groups = core_groups(n, cores)
        measured = [r for _, m in groups for r in m]
        assert sorted(measured) == list(range(n)), (n, cores)
        for running, m in groups:
            assert len(set(running)) == min(n, cores) and set(m) <= set(running)
