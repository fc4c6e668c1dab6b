"""CE-CoLLM (cecollm.py): job fields refused with one message each, the planner's latency
model (planner/cecollm.py), and under MPI on the trained stories260K: threshold 1.0 gives
the exact tokens, threshold 0 never calls the cloud, and the cloud's KV cache after a mix
of exited and non-exited tokens equals the unsplit model's."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from edgeshard_mpi.job import JobError, parse_job
from edgeshard_mpi.planner.cecollm import choose_split, predict
from edgeshard_mpi.planner.problem import make_problem
from edgeshard_mpi.presets import resolve
from tests.conftest import ROOT, mpiexec
from tests.test_mpi import hf_generate

CE = '[model]\nsource = "tiny"\n[partition]\nstrategy = "ce-collm"\n[cluster]\ncloud = 1\n'


@pytest.mark.parametrize(
    "extra, match",
    [
        ("[ce_collm]\nthreshold = -0.1\n", r"ce_collm.threshold: -0.1 is out of range"),
        ("[ce_collm]\nthreshold = 3\n", r"ce_collm.threshold: 3.0 is out of range"),
        ('[ce_collm]\nsplit = "middle"\n', r'ce_collm.split: an integer unit .* or "auto"'),
        ("[ce_collm]\nsplit = 0\n", r"ce_collm.split = 0: .* must be >= 1"),
        ("[ce_collm]\nexit_rate = 1.5\n", r"ce_collm.exit_rate: 1.5 is out of range"),
        ("[ce_collm]\nthresold = 0.5\n", r"unknown field\(s\) in \[ce_collm\]: thresold"),
        ("[pipeline]\nmode = 'pipeline'\n", r"'ce-collm' is sequential"),
        ("[workload]\nbatch_size = 2\nprompts = 2\n", r"workload.batch_size = 2: ce-collm"),
    ],
)
def test_bad_fields_are_refused(extra, match, tmp_path):
    with pytest.raises(JobError, match=match):
        parse_job(CE + extra, tmp_path / "j.toml")


def test_section_needs_the_strategy_and_context_checks(tmp_path):
    with pytest.raises(JobError, match=r"\[ce_collm\] is only read with partition.strategy"):
        parse_job('[model]\nsource = "tiny"\n[ce_collm]\nthreshold = 0.5\n', tmp_path / "j.toml")
    spec = resolve("tiny")
    job = parse_job(CE + f"[ce_collm]\nsplit = {spec.n_units}\n", tmp_path / "j.toml")
    with pytest.raises(JobError, match=rf"ce_collm.split = {spec.n_units}: the cloud must"):
        job.check_context(2, spec)
    bare = parse_job(CE.replace("[cluster]\ncloud = 1\n", ""), tmp_path / "j.toml")
    with pytest.raises(JobError, match=r"needs 2 ranks or more"):
        bare.check_context(1, spec)
    with pytest.raises(JobError, match=r"needs cluster.cloud"):
        bare.check_context(2, spec)
    ok = parse_job(CE + "[ce_collm]\nsplit = 3\nthreshold = 0.9\n", tmp_path / "j.toml")
    ok.check_context(2, spec)
    assert ok.ce_collm.split == 3 and ok.ce_collm.threshold == 0.9


def slow_link_problem(mbps: float):
    """The paper testbed (Llama2-7B): source 0, cloud 3, every link `mbps` Mb/s."""
    from edgeshard_mpi.bench.planner_cases import testbed_profile

    p = testbed_profile("llama2-7b", devices=4, nx=1)
    p = replace(p, bandwidth=np.full_like(p.bandwidth, mbps * 1e6 / 8), cloud=3)
    return make_problem(p, 1, "workload")


def test_prediction_follows_the_exit_rate():
    prob = slow_link_problem(1.0)
    never, half, always = (predict(prob, 10, 3, e) for e in (0.0, 0.5, 1.0))
    # At 1 Mb/s every cloud call costs more than the edge's layers: exits pay.
    assert never.per_token_s > half.per_token_s > always.per_token_s > 0
    assert always.cloud_calls_per_token == 0 and always.upload_bytes_per_token == 0
    assert never.cloud_calls_per_token == 1.0 and half.cloud_calls_per_token == 0.5
    # Every hidden state goes up once the cloud is called at all: (P + G - 1) / G per token.
    p = prob.profile
    per_state = prob.act_decode[9]
    assert never.upload_bytes_per_token == pytest.approx(
        per_state * (p.prompt_tokens + p.new_tokens - 1) / p.new_tokens
    )
    assert predict(prob, 10, 3, 0.3, standalone=True) == always
    # The edge alone (standalone) is the per-token edge time: no link, no cloud.
    assert always.per_token_s == pytest.approx(always.edge_s)


def test_split_choice_least_latency_that_fits():
    fast = slow_link_problem(1000.0)  # 1 Gb/s: the cloud (an RTX 3090) is worth reaching
    roomy = make_problem(
        replace(fast.profile, memory_budget=fast.profile.memory_budget * 0 + 1e12), 1, "workload"
    )
    at = choose_split(roomy, 3, 0.0)
    every = [predict(roomy, s, 3, 0.0).per_token_s for s in range(1, roomy.n_units)]
    assert at.per_token_s == min(every) and at.split == 1 + int(np.argmin(every))
    # The real budgets: Llama2-7B in fp32 (27 GB) does not fit the 3090's 24 GB, so the
    # cloud cannot take everything: the split moves deeper, to what fits.
    real = choose_split(fast, 3, 0.0)
    assert real.split > at.split and real.per_token_s > at.per_token_s
    # Standalone: the deepest split the edge holds (latency alone would pick the shallowest).
    solo = choose_split(roomy, 3, 0.0, standalone=True)
    assert solo.split == roomy.n_units - 1
    tight = replace(fast.profile, memory_budget=fast.profile.memory_budget * 0 + 1e6)
    from edgeshard_mpi.planner.problem import Infeasible

    with pytest.raises(Infeasible, match="ce-collm: no split fits"):
        choose_split(make_problem(tight, 1, "workload"), 3, 0.5)


def ce_job(shared_data, tmp_path, name: str, ce: dict, wire: str = "exact") -> dict:
    model = shared_data / "stories260K-hf"
    return {
        "name": name,
        "model": {"source": str(model)},
        "workload": {
            "dataset": str(shared_data / "wikitext-2-raw-v1" / "wiki.test.raw"),
            "tokenizer": str(model / "tokenizer.model"),
            "prompt_tokens": 8,
            "new_tokens": 16,
            "prompts": 2,
        },
        "partition": {"strategy": "ce-collm"},
        "ce_collm": {"split": 3} | ce,
        "cluster": {"cloud": 1},
        "transport": {"wire": wire},
        "output": {"path": str(tmp_path / f"{name}.h5"), "events": False},
    }


def run_2(script: list[str], timeout: int = 240) -> None:
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(timeout), PYTHONPATH=str(ROOT))
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.mpi
def test_thresholds_one_and_zero_and_standalone(shared_data, write_job, tmp_path):
    jobs = [
        write_job(ce_job(shared_data, tmp_path, "never", {"threshold": 1.0}), "never.toml"),
        write_job(ce_job(shared_data, tmp_path, "always", {"threshold": 0.0}), "always.toml"),
        write_job(
            ce_job(shared_data, tmp_path, "solo", {"threshold": 1.0, "standalone": True}, "int8"),
            "solo.toml",
        ),
        write_job(ce_job(shared_data, tmp_path, "int8", {"threshold": 1.0}, "int8"), "int8.toml"),
    ]
    run_2([str(ROOT / "tests" / "mpi_jobs.py"), *map(str, jobs)])
    got = {}
    for name in ("never", "always", "solo", "int8"):
        with h5py.File(tmp_path / f"{name}.h5") as f:
            g = f["ce_collm"]
            got[name] = (
                dict(g.attrs),
                f["workload/generated_ids"][:],
                f["workload/prompt_ids"][:],
                f["plan"].attrs["description"],
            )
    attrs, tokens, prompts, plan = got["never"]
    assert plan == "r0[0,3) -> r1[3,7)"
    # Threshold 1.0: no token's max probability reached 1.0, so none exited, and the
    # tokens are transformers' own greedy tokens of the unsplit model.
    assert attrs["exit_rate"] == 0 and attrs["cloud_calls"] == 32
    assert np.array_equal(tokens, hf_generate(str(shared_data / "stories260K-hf"), prompts, 16, 1))
    # Each call uploads exactly the states the cloud lacks: 8 + 15 per prompt, 64 floats.
    assert attrs["states_uploaded"] == 2 * (8 + 15)
    assert attrs["bytes_uploaded"] == 32 * 16 + 2 * 23 * 64 * 4
    assert attrs["cloud_compute_s"] > 0
    # int8 uploads: 68 bytes a state instead of 256.
    assert got["int8"][0]["bytes_uploaded"] == 32 * 16 + 2 * 23 * (64 + 4)
    # Threshold 0: every token from the edge, the cloud never called.
    a0 = got["always"][0]
    assert a0["exit_rate"] == 1 and a0["cloud_calls"] == 0 and a0["bytes_uploaded"] == 0
    assert a0["cloud_compute_s"] == 0 and a0["states_uploaded"] == 0
    assert not np.array_equal(got["always"][1], tokens)  # the partial model differs
    # Standalone: the exit head answers even at threshold 1.0 (no wire used at all).
    s0 = got["solo"][0]
    assert s0["cloud_calls"] == 0 and s0["bytes_uploaded"] == 0
    assert np.array_equal(got["solo"][1], got["always"][1])


@pytest.mark.mpi
def test_cloud_cache_equals_the_unsplit_models(shared_data, write_job, tmp_path):
    """Threshold 0.96 mixes exits and cloud calls (some with several pending states); the
    cloud's KV cache after the last prompt equals transformers' over the same tokens."""
    from edgeshard_mpi.model import reference_model
    from edgeshard_mpi.weights import weight_source

    job = write_job(ce_job(shared_data, tmp_path, "mix", {"threshold": 0.96}), "mix.toml")
    out = str(tmp_path / "mix")
    run_2([str(ROOT / "tests" / "mpi_cecollm_cache.py"), str(job), out])
    edge, cloud = np.load(out + ".edge.npz"), np.load(out + ".cloud.npz")
    exited, sent = edge["exited"][-1], edge["states_per_upload"][-1]
    assert exited.any() and (~exited).any(), exited  # a mix in the last prompt
    assert sent.max() > 1  # pending states of exited tokens went up in one batch
    n = int(cloud["length"])
    assert n == sent.sum()  # the cloud holds every state it was sent, once
    seq = np.concatenate([edge["prompt_ids"][-1], edge["tokens"][-1]])[:n]
    path = str(shared_data / "stories260K-hf")
    spec = resolve(path)
    model = reference_model(spec, weight_source(path, spec, "float32", 0))
    with torch.inference_mode():
        cache = model(torch.from_numpy(seq).view(1, -1), use_cache=True).past_key_values
    for k, layer in enumerate(cloud["layers"]):
        ref_k = cache.layers[int(layer)].keys[0].numpy()
        ref_v = cache.layers[int(layer)].values[0].numpy()
        np.testing.assert_allclose(cloud["keys"][k], ref_k, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cloud["values"][k], ref_v, rtol=1e-4, atol=1e-5)
    assert list(cloud["layers"]) == [2, 3, 4]  # decoder layers 2..4 = units 3..5


@pytest.mark.mpi
def test_eval_prices_early_exit(shared_data, write_job, tmp_path):
    """`eval` of a ce-collm job: a threshold no token reaches gives the exact perplexity and
    tokens; standalone scores every token with the exit head."""
    evals = {"window": 64, "stride": 32, "max_windows": 2}
    never = ce_job(shared_data, tmp_path, "ev-never", {"threshold": 2.0}) | {"eval": evals}
    solo = ce_job(shared_data, tmp_path, "ev-solo", {"standalone": True}) | {"eval": evals}
    jobs = [write_job(never, "ev-never.toml"), write_job(solo, "ev-solo.toml")]
    run_2([str(ROOT / "tests" / "mpi_evals.py"), *map(str, jobs)])
    with h5py.File(tmp_path / "ev-never.h5") as a, h5py.File(tmp_path / "ev-solo.h5") as b:
        assert a.attrs["exit_rate"] == 0 and b.attrs["exit_rate"] == 1
        assert a.attrs["perplexity"] == pytest.approx(a.attrs["perplexity_exact"], rel=1e-12)
        assert a.attrs["token_agreement"] == 1.0
        assert b.attrs["perplexity_exact"] == a.attrs["perplexity_exact"]
        assert b.attrs["perplexity"] != b.attrs["perplexity_exact"]


def test_wire_auto_picks_the_lightest_codec_worth_its_loss():
    """planner/wire_auto.py: per hop, fp16 if halving saves min_gain of the per-token time,
    else int8 if a quarter does, else exact."""
    from edgeshard_mpi.planner.plan import Plan
    from edgeshard_mpi.planner.plan import Stage as PStage
    from edgeshard_mpi.planner.wire_auto import choose_wires, hop_saving_s

    prob = slow_link_problem(8.0)
    plan = Plan((PStage(0, 0, 10), PStage(1, 10, 20), PStage(1, 20, 25), PStage(3, 25, 34)))
    ratios = {"exact": 1.0, "fp16": 0.5, "int8": 0.25}
    assert choose_wires(plan, prob, ratios, 0.0) == ("fp16", "exact", "fp16")  # same rank
    assert choose_wires(plan, prob, ratios, 1.0) == ("exact", "exact", "exact")
    from edgeshard_mpi.planner.cost import evaluate

    base = evaluate(plan, prob).per_token_s
    half = hop_saving_s(prob, 10, 0, 1, 0.5) / base
    quarter = hop_saving_s(prob, 10, 0, 1, 0.25) / base
    assert quarter > half > 0
    between = (half + quarter) / 2  # fp16 saves too little, int8 enough
    assert choose_wires(plan, prob, ratios, between)[0] == "int8"
    with pytest.raises(JobError, match=r"transport\.auto_min_gain is only read with wire"):
        parse_job('[model]\nsource = "tiny"\n[transport]\nauto_min_gain = 0.1\n', Path("j.toml"))


@pytest.mark.mpi
def test_wire_auto_compresses_only_the_slow_link(write_job, tmp_path):
    """tiny on 3 ranks, a hand-written profile: 0 -> 1 at 0.1 Mb/s, 1 -> 2 at 1 Gb/s. The
    run compresses the first hop (fp16: the lightest that pays) and not the second."""
    import json

    times = {"embed": 1e-4, "layer": 1e-3, "head": 1e-3}
    dev = {"prefill_s": times, "decode_s": times, "memory_budget": "1GiB"}
    prof = {
        "format": "edgeshard-profile", "version": 1, "model": "tiny", "dtype": "float32",
        "prompt_tokens": 8, "new_tokens": 6, "batch_sizes": [1], "source": 0, "cloud": None,
        "devices": [dev | {"name": f"d{i}"} for i in range(3)],
        "links": {"default": {"latency_s": 1e-3, "bandwidth_mbps": 1000},
                  "pairs": [{"a": 0, "b": 1, "bandwidth_mbps": 0.1}]},
    }  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(prof))
    job = write_job(
        {
            "model": {"source": "tiny"},
            "workload": {"prompt_tokens": 8, "new_tokens": 6, "prompts": 2},
            "partition": {
                "strategy": "explicit",
                "stages": [{"rank": r, "layers": [2 * r, 2 * r + 2]} for r in range(3)],
            },
            "profile": {"reuse": str(tmp_path / "p.json")},
            "transport": {"wire": "auto"},
            "output": {"path": str(tmp_path / "auto.h5"), "events": False},
        }
    )
    env = dict(os.environ, MPIEXEC_TIMEOUT="200", PYTHONPATH=str(ROOT))
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "mpi4py", "-m", "edgeshard_mpi", "run"]
    proc = subprocess.run([*cmd, str(job)], capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with h5py.File(tmp_path / "auto.h5") as f:
        info = json.loads(f["plan"].attrs["info"])
        sent = f["ranks/bytes_sent"][:]
    assert info["wires"] == ["fp16", "exact"]
    states = 2 * (8 + 6 - 1)  # hidden states crossing each hop: prompts x (P + G - 1)
    assert sent[0] == states * 64 * 2 and sent[1] == states * 64 * 4
