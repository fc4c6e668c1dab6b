"""The paper's qualitative results on its testbed (shipped, hand-written profiles), and the
offline `plan` command."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeshard_mpi.planner.baselines import STRATEGIES, make_plan, plan_all
from edgeshard_mpi.planner.cost import evaluate
from edgeshard_mpi.planner.plan import Plan
from edgeshard_mpi.planner.problem import Infeasible, load_profile, make_problem, shipped_profiles


@pytest.fixture(scope="module", params=["llama2-7b", "llama2-13b", "llama2-70b"])
def testbed(request):
    prof = load_profile(f"paper-{request.param}")
    return request.param, prof, make_problem(prof, 1, "average")


def test_shipped_profiles_describe_the_paper_testbed():
    assert shipped_profiles() == ["paper-llama2-13b", "paper-llama2-70b", "paper-llama2-7b"]
    prof = load_profile("paper-llama2-7b")
    assert prof.n_devices == 15 and prof.source == 0 and prof.cloud == 14
    assert prof.names[:1] == ("agx-0",) and prof.names[12:] == ("nx-0", "nx-1", "cloud-3090")
    assert prof.bandwidth[0, 14] == pytest.approx(1e6 / 8)  # 1 Mb/s source <-> cloud
    others = prof.bandwidth[1:14, 1:14][~np.eye(13, dtype=bool)]
    assert others.min() >= 40e6 / 8 and others.max() <= 60e6 / 8  # 50 Mb/s +-20%
    assert "roofline" in prof.notes


def test_7b_cloud_edge_opt_equals_edge_solo():
    """With 1 Mb/s to the cloud, shipping activations there never pays off for 7B."""
    prob = make_problem(load_profile("paper-llama2-7b"), 1, "average")
    for objective in ("latency", "throughput"):
        opt = make_plan(prob, "cloud-edge-opt", objective)
        solo = make_plan(prob, "edge-solo", objective)
        assert opt.stages == solo.stages


def test_70b_fits_only_with_edgeshard():
    prob = make_problem(load_profile("paper-llama2-70b"), 1, "average")
    for objective in ("latency", "throughput"):
        plans = plan_all(prob, objective)
        assert isinstance(plans["edgeshard"], Plan)
        for name in ("edge-solo", "cloud-edge-even", "cloud-edge-opt"):
            assert isinstance(plans[name], Infeasible), name
            assert "GB" in str(plans[name])
        assert len(plans["edgeshard"].ranks) >= 10  # 276 GB over 30.5 GB devices


def test_edgeshard_never_worse_than_cloud_edge_opt(testbed):
    _, _, prob = testbed
    for objective in ("latency", "throughput"):
        plans = plan_all(prob, objective)
        es = evaluate(plans["edgeshard"], prob)
        key = "latency_s" if objective == "latency" else "bottleneck_s"
        for name, p in plans.items():
            if isinstance(p, Plan):
                assert getattr(es, key) <= getattr(evaluate(p, prob), key) + 1e-12, name


def test_paper_algorithm1_never_beats_the_exact_solver(testbed):
    _, _, prob = testbed
    exact = evaluate(make_plan(prob, "edgeshard", "latency"), prob)
    try:
        paper = make_plan(prob, "edgeshard", "latency", algorithm="paper")
    except Infeasible:
        return
    ev = evaluate(paper, prob)
    distinct = len(paper.ranks) == len(paper.stages)
    if distinct and ev.feasible:  # comparable: a plan of the exact solver's kind
        assert exact.latency_s <= ev.latency_s + 1e-12


def test_plan_command_text_and_json():
    py = [sys.executable, "-m", "edgeshard_mpi"]
    text = subprocess.run(
        [*py, "plan", "-p", "paper-llama2-70b"], capture_output=True, text=True, check=True
    ).stdout
    assert "edgeshard" in text and "infeasible" in text and "cloud-3090" in text
    out = subprocess.run(
        [
            *py,
            "plan",
            "-p",
            "paper-llama2-7b",
            "--objective",
            "throughput",
            "--json",
            "--source",
            "12",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rep = json.loads(out)
    assert rep["source"] == "nx-0" and [r["strategy"] for r in rep["plans"]] == list(STRATEGIES)
    es = rep["plans"][0]
    assert es["feasible"] and es["plan"]["stages"][0][0] == 12  # the source holds unit 0
    bad = subprocess.run([*py, "plan", "-p", "no-such-profile"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_a_hand_written_profile_in_compact_form(tmp_path):
    """A user's cluster they do not have: two device types, default links, one slow pair."""
    prof = {
        "format": "edgeshard-profile",
        "version": 1,
        "model": "llama2-7b",
        "batch_sizes": [1],
        "source": 0,
        "cloud": 2,
        "device_types": {
            "jetson": {
                "prefill_s": {"embed": 1e-4, "layer": 0.01, "head": 0.02},
                "decode_s": {"embed": 1e-4, "layer": 0.004, "head": 0.008},
                "memory_budget": "16GB",
            },
            "server": {
                "prefill_s": {"embed": 1e-5, "layer": 0.001, "head": 0.002},
                "decode_s": {"embed": 1e-5, "layer": 0.0005, "head": 0.001},
                "memory_budget": "80GB",
            },
        },
        "devices": [
            {"name": "j0", "type": "jetson"},
            {"name": "j1", "type": "jetson"},
            {"name": "srv", "type": "server"},
        ],
        "links": {
            "default": {"latency_s": 0.001, "bandwidth_mbps": 1000},
            "pairs": [{"a": 0, "b": 2, "bandwidth_mbps": 10}],
        },
    }
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(prof))
    p = load_profile(path)
    assert p.memory_budget[0] == 16e9 and p.bandwidth[0, 2] == 10e6 / 8
    plan = make_plan(make_problem(p), "edgeshard")
    assert plan.stages[0].rank == 0 and plan.stages[-1].rank == 2  # relays via j1
    assert [s.rank for s in plan.stages] == [0, 1, 2]


@pytest.mark.parametrize(
    "broken, words",
    [
        ({"format": "other"}, "not an edgeshard-profile file"),
        ({"version": 9}, "version 9 is not supported"),
        (
            {
                "devices": [
                    {"name": "x", "memory_budget": "lots", "prefill_s": [1], "decode_s": [1]}
                ]
            },
            "cannot read 'lots' as a size",
        ),
        (
            {
                "devices": [
                    {"name": "x", "memory_budget": 1e9, "prefill_s": [1, 2], "decode_s": [1]}
                ]
            },
            "expected 34 per-unit seconds",
        ),
    ],
)
def test_bad_profiles_say_what_is_wrong(tmp_path, broken, words):
    from edgeshard_mpi.planner.problem import ProfileError

    base = {
        "format": "edgeshard-profile",
        "version": 1,
        "model": "llama2-7b",
        "devices": [
            {
                "name": "x",
                "memory_budget": 1e9,
                "prefill_s": {"embed": 1, "layer": 1, "head": 1},
                "decode_s": {"embed": 1, "layer": 1, "head": 1},
            }
        ],
        "links": {"default": {"bandwidth_mbps": 10}},
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(base | broken))
    with pytest.raises(ProfileError, match=words):
        load_profile(path)


def test_13b_cloud_edge_opt_runs_up_to_batch_4_and_edge_solo_never():
    """The paper ran 13B with Cloud-Edge-Opt at batch sizes up to 4 (Sec. V.C)."""
    prof = load_profile("paper-llama2-13b")
    for batch, fits in ((1, True), (2, True), (4, True), (8, False)):
        prob = make_problem(prof, batch, "average")
        if fits:
            assert isinstance(make_plan(prob, "cloud-edge-opt", "latency"), Plan)
        else:
            with pytest.raises(Infeasible):
                make_plan(prob, "cloud-edge-opt", "latency")
        with pytest.raises(Infeasible):
            make_plan(prob, "edge-solo", "latency")


def test_plan_pipeline_and_sweep_offline(tmp_path):
    """`plan --pipeline --sweep`: the choice per strategy, candidates, a table per point
    and a PNG; a malformed sweep is refused with exit 2."""
    py = [sys.executable, "-m", "edgeshard_mpi", "plan", "-p", "paper-llama2-7b"]
    png = tmp_path / "sweep.png"
    args = ["--strategy", "edgeshard", "--strategy", "edge-solo", "--micro-batch-size", "4"]
    out = subprocess.run(
        [*py, *args, "--pipeline", "--sweep", "0,14:1,50", "--png", str(png), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rep = json.loads(out)
    es, solo = rep["pipeline"]
    assert es["micro_batch_size"] == 4 and es["candidates"]
    assert es["tokens_per_s"] >= solo["tokens_per_s"]
    pts = rep["sweep"]["points"]
    assert [p["mbps"] for p in pts] == [1.0, 50.0]
    for p in pts:
        assert p["edgeshard"]["tokens_per_s"] >= p["edge-solo"]["tokens_per_s"] * 0.99
    assert png.stat().st_size > 10_000
    bad = subprocess.run([*py, "--sweep", "0:1,2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--sweep" in bad.stderr
