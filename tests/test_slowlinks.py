"""Slow links: wire codecs (wire.py) round-trip within their stated bounds, the planner
prices hops at the compressed size, and `eval` (evaluate.py) gives the same perplexity
through 1 stage and 3 ranks, equal to transformers' unsplit model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from edgeshard_mpi import wire
from edgeshard_mpi.evaluate import agreement, window_nll, windows
from edgeshard_mpi.job import JobError, parse_job
from edgeshard_mpi.planner.baselines import make_plan
from edgeshard_mpi.planner.problem import compress_activations, make_problem
from edgeshard_mpi.wire import Codec
from tests.conftest import ROOT, mpiexec
from tests.test_mpi import hf_generate


def activations(tokens=40, hidden=64, seed=0) -> torch.Tensor:
    """Hidden states with a wide spread of magnitudes per token, and one all-zero token."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g) * torch.logspace(-3, 3, tokens).view(-1, 1)
    h[3] = 0.0
    h[5, 7] = 1e5  # beyond fp16's range: clamped, and the bound says so
    return h


@pytest.mark.parametrize("name", wire.WIRES)
def test_codec_round_trip_within_bound(name):
    codec, h = Codec(name), activations()
    enc = codec.encode(h)
    assert enc.dtype == torch.uint8 and enc.numel() == codec.nbytes(40, 64, torch.float32)
    assert enc.numel() == 40 * wire.bytes_per_token(name, 64, 4)
    padded = torch.cat([enc, torch.zeros(100, dtype=torch.uint8)])  # a longer buffer
    back = codec.decode(padded, 40, 64, torch.float32)
    assert back.dtype == torch.float32 and back.shape == (40, 64)
    err = (back - h).abs()
    assert (err <= codec.error_bound(h)).all(), float((err - codec.error_bound(h)).max())
    if name == "exact":
        assert torch.equal(back, h)  # bitwise
    else:
        assert err.max() > 0  # lossy: the test could fail


def test_wire_ratios():
    assert wire.ratio("exact", 4096, 4) == 1.0
    assert wire.ratio("bf16", 4096, 4) == 0.5 and wire.ratio("bf16", 4096, 2) == 1.0
    assert wire.ratio("int8", 4096, 4) == pytest.approx(4100 / 16384)
    with pytest.raises(ValueError, match="wire 'int4'"):
        Codec("int4")


def test_plan_moves_when_the_wire_is_compressed():
    """Paper testbed, Llama2-7B, every link 1 MB/s (8 Mb/s): exact activations keep the
    model on the source, int8 ones make offloading to the cloud pay."""
    from edgeshard_mpi.bench.planner_cases import testbed_profile

    p = testbed_profile("llama2-7b", devices=4, nx=1)
    p = replace(p, bandwidth=np.full_like(p.bandwidth, 1e6))
    r = wire.ratio("int8", p.model.hidden_size, 4)
    small = compress_activations(p, r, "int8")
    assert np.allclose(small.activation_bytes_per_token[:-1], p.activation_bytes_per_token[:-1] * r)
    assert small.activation_bytes_per_token[-1] == p.activation_bytes_per_token[-1]  # tokens
    assert compress_activations(p, 1.0, "exact") is p
    exact = make_plan(make_problem(p), "edgeshard", "latency", "exact")
    int8 = make_plan(make_problem(small), "edgeshard", "latency", "exact")
    assert len(exact.stages) == 1 and len(int8.stages) > 1, (exact.describe(), int8.describe())


def test_windows_score_every_token_once():
    w = windows(1000, 128, 48)
    assert w[0].tolist() == [0, 128, 128] and w[-1][1] == 1000
    assert w[:, 2].sum() == 1000 and (w[:, 1] - w[:, 0] <= 128).all()
    assert len(windows(1000, 128, 48, max_windows=3)) == 3
    logits = torch.randn(10, 7, dtype=torch.float32)
    ids = torch.randint(0, 7, (10,))
    nll, n = window_nll(logits, ids, 4)
    ref = -torch.log_softmax(logits, -1)[5:9].gather(1, ids[6:10].view(-1, 1)).sum()
    assert n == 4 and nll == pytest.approx(float(ref), rel=1e-6)
    assert window_nll(logits, ids, 10)[1] == 9  # the first token has no prediction


def test_agreement():
    a = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = np.array([[1, 2, 3, 4], [1, 9, 3, 4]])
    assert agreement(a, b) == {"token_agreement": 7 / 8, "prefix_agreement": (1 + 0.25) / 2}


@pytest.mark.parametrize(
    "section, text, match",
    [
        ("transport", 'wire = "int4"', "transport.wire: 'int4' is not one of"),
        ("eval", "stride = 0", "eval.stride: an integer >= 1"),
        ("eval", "window = 1", "eval.window: 1 is out of range"),
        ("eval", "window = 64\nstride = 65", "eval.stride: 65 is out of range"),
        ("eval", "windows = 3", r"unknown field\(s\) in \[eval\]: windows"),
    ],
)
def test_bad_fields_are_refused(section, text, match, tmp_path):
    job = f'[model]\nsource = "tiny"\n[{section}]\n{text}\n'
    with pytest.raises(JobError, match=match):
        parse_job(job, tmp_path / "j.toml")


def reference_nll(path: str, ids: np.ndarray, wins: np.ndarray) -> np.ndarray:
    """Per-window NLL from transformers' unsplit model, in this process."""
    from edgeshard_mpi.model import reference_model
    from edgeshard_mpi.presets import resolve
    from edgeshard_mpi.weights import weight_source

    spec = resolve(path)
    model = reference_model(spec, weight_source(path, spec, "float32", 0))
    out = []
    with torch.inference_mode():
        for begin, end, scored in wins:
            x = torch.from_numpy(ids[begin:end]).view(1, -1)
            out.append(window_nll(model(x).logits[0], x[0], int(scored)))
    return np.array(out)


@pytest.mark.mpi
def test_eval_one_stage_equals_three_ranks_and_int8_prices(shared_data, write_job, tmp_path):
    model = str(shared_data / "stories260K-hf")
    tokenizer = str(shared_data / "stories260K-hf" / "tokenizer.model")
    common = {
        "model": {"source": model},
        "workload": {
            "dataset": str(shared_data / "wikitext-2-raw-v1" / "wiki.test.raw"),
            "tokenizer": tokenizer,  # the SentencePiece file: HF's conversion takes 15 s
            "prompt_tokens": 8,
            "new_tokens": 12,
            "prompts": 2,
        },
        "eval": {"window": 64, "stride": 32, "max_windows": 3},
    }
    one = write_job(
        common
        | {
            "partition": {"strategy": "explicit", "stages": [{"rank": 0, "layers": [0, 7]}]},
            "output": {"path": str(tmp_path / "one.h5")},
        },
        "one.toml",
    )
    three = write_job(
        common
        | {
            "partition": {"strategy": "even"},
            "transport": {"wire": "int8"},
            "output": {"path": str(tmp_path / "three.h5")},
        },
        "three.toml",
    )
    env = dict(os.environ, MPIEXEC_TIMEOUT="240", PYTHONPATH=str(ROOT))
    cmd = [
        mpiexec(),
        "-n",
        "3",
        sys.executable,
        "-m",
        "mpi4py",
        str(ROOT / "tests" / "mpi_evals.py"),
    ]
    proc = subprocess.run(
        [*cmd, str(one), str(three)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "three.h5") as b:
        assert a.attrs["kind"] == "eval" and a.attrs["windows"] == 3
        assert a.attrs["plan"] == "r0[0,7)" and b.attrs["plan"].count("->") == 2
        # Exact wire: the 3-rank split equals one stage bitwise, window by window.
        assert np.array_equal(a["nll_exact"][:], b["nll_exact"][:])
        assert a.attrs["perplexity"] == b.attrs["perplexity_exact"]
        # ...and equals transformers' unsplit model to float precision (fast kernels
        # change the order of sums, hence rounding only).
        ids_ok = b["windows"][:]
        assert ids_ok[:, 2].sum() == a.attrs["tokens_scored"] + 1  # the first has no target
        # int8 costs a little perplexity, a quarter of the bytes, and some tokens.
        p, q = b.attrs["perplexity_exact"], b.attrs["perplexity"]
        assert p != q and abs(math.log(q / p)) < 0.05
        assert b.attrs["bytes_sent"] < 0.35 * b.attrs["bytes_sent_exact"]
        assert 0 <= b.attrs["token_agreement"] <= 1 and 0 <= b.attrs["prefix_agreement"] <= 1
        assert b["generated_exact"].shape == b["generated_int8"].shape == (2, 12)
        wins, nll = a["windows"][:], a["nll_exact"][:]
        prompt_ids, generated = b["prompt_ids"][:], b["generated_exact"][:]
    # The exact wire through the 3-rank runtime: transformers' own greedy tokens.
    assert np.array_equal(generated, hf_generate(model, prompt_ids, 12, 1))
    from edgeshard_mpi.data import load_tokenizer

    tok = load_tokenizer(tokenizer, model, 512)
    text = (shared_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()
    ids = np.asarray(tok.encode(text[:20000]), dtype=np.int64)
    ref = reference_nll(model, ids, wins)
    assert np.array_equal(ref[:, 1], nll[:, 1])
    np.testing.assert_allclose(nll[:, 0], ref[:, 0], rtol=1e-5)


def test_eval_text_prefix_tokens_equal_the_full_texts(shared_data, tmp_path):
    """With max_windows only a prefix of whole lines is tokenized: its tokens are the
    full text's first tokens. No dataset: one message naming the field."""
    from edgeshard_mpi.data import load_tokenizer
    from edgeshard_mpi.evaluate import _eval_tokens, _needed_text
    from edgeshard_mpi.presets import resolve

    model = shared_data / "stories260K-hf"
    tok = load_tokenizer(str(model / "tokenizer.model"), str(model), 512)
    text = (shared_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()[:100_000]
    full = tok.encode(text)
    part = _needed_text(text, tok, 3000)
    assert len(part) < len(text) and part.endswith("\n")
    ids = tok.encode(part)
    assert len(ids) >= 3000 and ids == full[: len(ids)]
    job = parse_job(f'[model]\nsource = "{model}"\n', tmp_path / "j.toml")
    with pytest.raises(JobError, match=r"eval\.dataset: no text to evaluate on"):
        _eval_tokens(job, resolve(str(model)))
