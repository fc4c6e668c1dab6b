"""concurrency.py: a pipelined prediction is capped by the cores its stages share."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np

from edgeshard_mpi.concurrency import host_bound_tokens_per_s, share_cores
from edgeshard_mpi.planner.pipeline import Prediction
from edgeshard_mpi.planner.plan import Plan, Stage


def _case(hosts, cores=2.0):
    plan = Plan((Stage(0, 0, 2), Stage(1, 2, 4), Stage(2, 4, 6)))
    prob = NS(batch=1, decode=np.full((3, 6), 0.005))  # 10 ms per stage and token
    devices = [NS(host=h, cores=cores, threads=1) for h in hosts]
    return plan, prob, devices


def test_three_stages_on_two_cores_are_capped():
    plan, prob, devices = _case(["h", "h", "h"])
    # 30 ms of core time per token on 2 cores: at most 66.7 tokens/s, not the 100 of the
    # slowest stage alone.
    assert np.isclose(host_bound_tokens_per_s(plan, prob, devices), 2 / 0.03)
    pred = Prediction(100.0, 1.0, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 4)
    capped = share_cores(pred, plan, prob, devices, emulated=False)
    assert np.isclose(capped.tokens_per_s, 2 / 0.03)
    assert np.isclose(capped.makespan_s, 1.5) and np.allclose(capped.busy_fraction, 2 / 3)
    assert share_cores(pred, plan, prob, devices, emulated=True) is pred


def test_no_cap_when_every_rank_has_a_core():
    plan, prob, devices = _case(["a", "b", "b"])
    assert host_bound_tokens_per_s(plan, prob, devices) == float("inf")
