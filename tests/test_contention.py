"""Pipelined stages that share a host's cores are charged the measured slowdown (pure)."""

from __future__ import annotations

import dataclasses

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
