"""runtime.kernels: the fast layout holds the checkpoint's own weights, once; 1 rank and N
ranks give bitwise-identical logits (in process) and tokens (through mpiexec) under either
kernels; tokens equal transformers generate on the trained stories260K under both."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from edgeshard_mpi.job import JobError, parse_job
from edgeshard_mpi.kernels import FastLinear, load_stage
from edgeshard_mpi.model import first_position, position_ids
from edgeshard_mpi.presets import resolve
from edgeshard_mpi.weights import weight_source
from tests.conftest import run_mpi
from tests.test_mpi import check_file, hf_generate

B, P, G = 2, 6, 5


@contextlib.contextmanager
def torch_threads(n: int):
    """torch at n threads inside the block (the kernels chosen depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stories(shared_data):
    path = str(shared_data / "stories260K-hf")
    spec = resolve(path)
    return path, spec, weight_source(path, spec, "float32", 0)


def logits(spec, source, cuts, kernels, ids):
    """Greedy steps through the stages of `cuts`: logits of every step."""
    stages = [load_stage(spec, a, b, "float32", "cpu", source, kernels) for a, b in cuts]
    p = ids.shape[1]
    caches = [st.new_cache(B, p + G) for st in stages]
    out, x = [], ids
    for step in range(G):
        h = x
        for st, cache in zip(stages, caches, strict=True):
            h = st(h, cache, position_ids(B, p, step), first_position(p, step))
        out.append(h)
        x = h.argmax(-1, keepdim=True)
    return out


def test_fast_stage_holds_the_checkpoints_weights_once(shared_data):
    _, spec, source = stories(shared_data)
    fast = load_stage(spec, 0, spec.n_units, "float32", "cpu", source, "fast")
    exact = load_stage(spec, 0, spec.n_units, "float32", "cpu", source, "exact")
    fast_linears = [m for m in fast.modules() if isinstance(m, FastLinear)]
    # Every projection and the head are swapped; nothing is left on the slow layout.
    assert len(fast_linears) == 7 * spec.num_layers + 1
    assert not any(isinstance(m, nn.Linear) for m in fast.modules())
    assert fast.weight_bytes() == exact.weight_bytes()  # no second copy
    # ... all of them slots of the stage's one weight buffer (huge pages where given).
    assert len({m.weight_t.untyped_storage().data_ptr() for m in fast_linears}) == 1
    # Read every tensor back through the modules and compare with the file itself.
    with safe_open(str(shared_data / "stories260K-hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name, module in fast.named_modules():
            if not isinstance(module, FastLinear):
                continue
            hf = f"model.{name}.weight" if name.startswith("layers.") else f"{name}.weight"
            stored = hf if hf in names else "model.embed_tokens.weight"  # tied head
            assert module.weight_t.is_contiguous()
            assert torch.equal(module.weight, f.get_tensor(stored)), name


@pytest.mark.parametrize("kernels,threads", [("fast", 1), ("exact", 1), ("fast", 2)])
@pytest.mark.parametrize("p", [P, 12])  # 12: 24 prompt rows, the fast prompt path (oneDNN)
def test_partitions_give_bitwise_identical_logits(shared_data, kernels, threads, p, request):
    """threads 2: decode products through native.py's product (EDGESHARD_NATIVE=1)."""
    if threads > 1:
        request.getfixturevalue("native_on")
    _, spec, source = stories(shared_data)
    with torch_threads(threads):
        _partitions_agree(spec, source, kernels, p)


def _partitions_agree(spec, source, kernels, p):
    ids = torch.randint(3, spec.vocab_size, (B, p), generator=torch.Generator().manual_seed(1))
    n = spec.n_units
    whole = logits(spec, source, [(0, n)], kernels, ids)
    for cuts in ([0, 1, n], [0, 3, n - 1, n], list(range(n + 1))):
        split = logits(spec, source, list(itertools.pairwise(cuts)), kernels, ids)
        assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True)), cuts


def test_fast_logits_stay_within_rounding_of_exact(shared_data):
    _, spec, source = stories(shared_data)
    # 12 prompt tokens: 24 rows, the prompt's products through oneDNN, then decode's numpy
    ids = torch.randint(3, spec.vocab_size, (B, 12), generator=torch.Generator().manual_seed(2))
    n = spec.n_units
    fast = logits(spec, source, [(0, n)], "fast", ids)
    exact = logits(spec, source, [(0, n)], "exact", ids)
    diff = max(float((a - b).abs().max()) for a, b in zip(fast, exact, strict=True))
    scale = max(float(b.abs().max()) for b in exact)
    print(f"largest |fast - exact| logit difference: {diff:.3g} (logits up to {scale:.3g})")
    assert diff < 1e-4 * scale
    assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(fast, exact, strict=True))


def _record_kernels(monkeypatch, **names) -> list:
    """Wrap kernels.py's product functions (label=function name) so each call appends its
    label to the returned list, then runs as before."""
    from edgeshard_mpi import kernels

    calls: list = []
    for label, name in names.items():
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, f=fn, k=label: calls.append(k) or f(*a))
    return calls


def test_prompt_rows_take_onednn_and_decode_rows_numpy(monkeypatch):
    """The product's kernel is chosen by its rows alone: > NUMPY_MAX_ROWS through oneDNN
    (where torch has it), fewer through numpy's OpenBLAS (at one thread); both equal x @ W to
    rounding."""
    from edgeshard_mpi import kernels

    if not (kernels._ONEDNN and kernels.USE_NUMPY_BLAS):
        pytest.skip("torch without oneDNN or numpy without OpenBLAS here")
    calls = _record_kernels(monkeypatch, dnn="_linear_pointwise", np="_np_matmul")
    lin = nn.Linear(48, 40)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    fast = FastLinear(lin)
    with torch_threads(1):  # at 2+ threads decode rows may go native (the test below)
        for rows, kernel in ((1, "np"), (kernels.NUMPY_MAX_ROWS, "np"), (40, "dnn")):
            calls.clear()
            x = torch.randn(1, rows, 48)
            torch.testing.assert_close(fast(x), x @ ref_w.T + ref_b, rtol=1e-5, atol=1e-5)
            assert calls == [kernel], rows


@pytest.fixture
def native_on(monkeypatch):
    """The native decode product turned on (EDGESHARD_NATIVE=1) for this test alone."""
    from edgeshard_mpi import native

    monkeypatch.setenv("EDGESHARD_NATIVE", "1")
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_LIB", None)
    gemv = native.gemv()
    if gemv is None:
        pytest.skip(f"native product unavailable: {native.REASON}")
    yield gemv
    monkeypatch.setattr(native, "_TRIED", False)  # the next test reads the env again


@pytest.mark.parametrize(
    # big enough to split (>= 256 KiB of weights per thread), and one that stays whole
    "n_in,n_out,rows", [(512, 1000, 1), (1376, 517, 3), (700, 333, 16), (37, 33, 3)]
)
def test_native_product_has_the_same_bits_at_any_thread_count(native_on, n_in, n_out, rows):
    """Each output is one fixed chain of fused multiply-adds whatever the column split: 1, 2,
    3 and 5 threads give the same bits (so do 1 and N ranks), and the value is x @ W to
    rounding (against float64)."""
    gemv = native_on
    g = torch.Generator().manual_seed(n_in + n_out)
    w, x = torch.randn(n_in, n_out, generator=g), torch.randn(rows, n_in, generator=g)
    ys = []
    for t in (1, 2, 3, 5):
        y = torch.full((rows, n_out), float("nan"))  # every output must be written
        gemv(x.data_ptr(), w.data_ptr(), y.data_ptr(), rows, n_in, n_out, t)
        ys.append(y)
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    ref = (x.double() @ w.double()).float()
    torch.testing.assert_close(ys[0], ref, rtol=1e-5, atol=1e-5 * n_in**0.5)


def test_decode_rows_at_two_threads_take_the_native_product(native_on, monkeypatch):
    """A rank at 2+ threads multiplies decode-sized inputs through the native product (one
    thread: numpy's OpenBLAS, as before); both equal x @ W to rounding."""
    from edgeshard_mpi import kernels

    if not kernels.USE_NUMPY_BLAS:
        pytest.skip("numpy without OpenBLAS here")
    calls = _record_kernels(monkeypatch, c="_native_matmul", np="_np_matmul")
    lin = nn.Linear(96, 200)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    fast = FastLinear(lin)
    for threads, kernel in ((1, "np"), (2, "c")):
        with torch_threads(threads):
            calls.clear()
            x = torch.randn(1, 3, 96)
            torch.testing.assert_close(fast(x), x @ ref_w.T + ref_b, rtol=1e-5, atol=1e-5)
            assert calls == [kernel], threads


def test_without_a_compiler_decode_keeps_numpy(monkeypatch, tmp_path):
    """No native product (the build fails, or not asked for): gemv() says why, and a
    2-thread rank's decode products take numpy's path, same values."""
    from edgeshard_mpi import native

    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setenv("EDGESHARD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("EDGESHARD_NATIVE", "1")
    assert native.gemv() is None and "failed" in native.REASON
    assert not list(tmp_path.iterdir())  # no half-written build left behind
    lin = nn.Linear(48, 128)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    with torch_threads(2):
        x = torch.randn(1, 2, 48)
        torch.testing.assert_close(FastLinear(lin)(x), x @ ref_w.T + ref_b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.delenv("EDGESHARD_NATIVE")  # off unless asked for
    assert native.gemv() is None and "EDGESHARD_NATIVE=1" in native.REASON
    monkeypatch.setattr(native, "_TRIED", False)


def test_kernels_field_is_checked(tmp_path):
    ok = parse_job('[model]\nsource = "tiny"\n[runtime]\nkernels = "exact"\n', tmp_path / "j")
    assert ok.runtime.kernels == "exact"
    assert parse_job('[model]\nsource = "tiny"\n', tmp_path / "j").runtime.kernels == "fast"
    with pytest.raises(JobError, match=r"runtime\.kernels"):
        parse_job('[model]\nsource = "tiny"\n[runtime]\nkernels = "turbo"\n', tmp_path / "j")


@pytest.mark.mpi
@pytest.mark.parametrize("kernels,threads", [("fast", 1), ("exact", 1), ("fast", 2)])
def test_ranks_agree_and_equal_generate_through_mpiexec(
    kernels, threads, shared_data, write_job, tmp_path
):
    """threads 2: the native decode product (EDGESHARD_NATIVE=1), 1 and 2 ranks."""
    path = str(shared_data / "stories260K-hf")
    tokens = {}
    for n in (1, 3) if threads == 1 else (1, 2):
        job = write_job(
            {
                "model": {"source": path},
                "workload": {"prompts": 2, "prompt_tokens": 20, "new_tokens": 12},  # 20: oneDNN
                "runtime": {"kernels": kernels, "threads": threads},
                "output": {"path": str(tmp_path / f"r{n}.h5")},
            },
            name=f"r{n}.toml",
        )
        env = {"EDGESHARD_NATIVE": "1"} if threads > 1 else None  # the native product
        proc = run_mpi(n, job, timeout=240, extra_env=env)
        assert proc.returncode == 0, proc.stderr
        r = check_file(tmp_path / f"r{n}.h5", n, 2, 12)
        tokens[n] = r["workload"]["generated_ids"]
    assert np.array_equal(tokens[1], tokens[n])
    expected = hf_generate(path, r["workload"]["prompt_ids"], 12, batch=1)
    assert np.array_equal(tokens[1], expected)


def test_profile_of_other_kernels_is_refused(tmp_path):
    """Predictions use the run's kernels: a profile measured with others is refused."""
    from dataclasses import replace

    from edgeshard_mpi.planner.problem import ProfileError, load_profile
    from edgeshard_mpi.planning import check_profile as _check_profile
    from edgeshard_mpi.presets import PRESETS

    prof = load_profile("paper-llama2-7b")  # says nothing about kernels: taken as it is
    job = parse_job('[model]\nsource = "llama2-7b"\n', tmp_path / "j")
    _check_profile(prof, PRESETS["llama2-7b"], job, prof.n_devices)
    _check_profile(replace(prof, meta={"kernels": "fast"}), PRESETS["llama2-7b"], job, 15)
    with pytest.raises(ProfileError, match="measured with exact kernels"):
        _check_profile(replace(prof, meta={"kernels": "exact"}), PRESETS["llama2-7b"], job, 15)


def test_a_weight_shared_by_two_modules_keeps_its_layout():
    """A head tied to the embedding as one Parameter is not transposed (no second table)."""
    from edgeshard_mpi.kernels import apply_kernels

    m = nn.Module()
    m.embed, m.head, m.proj = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.Linear(4, 4)
    m.head.weight = m.embed.weight
    apply_kernels(m, "fast")
    assert isinstance(m.head, nn.Linear) and m.head.weight is m.embed.weight
    assert isinstance(m.proj, FastLinear)
    x = torch.randn(3, 4)
    assert torch.allclose(m.proj(x), x @ m.proj.weight.T + m.proj.bias)


PEAK_SCRIPT = """
import gc, resource, torch
from torch import nn
from edgeshard_mpi.kernels import apply_kernels
# A freed 16 MB block raises glibc's mmap threshold (as loading a checkpoint does), so the
# model's 4 MB matrices below come from the heap, whose freed pages stay in the process.
torch.zeros(4 << 20)  # 16 MB, allocated and freed at once
m = nn.Sequential(*[nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(2)])
                    for _ in range(16)])  # 128 MiB of weights in 32 matrices, two per block
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
apply_kernels(m, "fast")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_fast_kernels_swap_without_holding_the_stage_twice():
    """The new layout is written while the old one is freed, weight by weight, and the freed
    heap pages go back to the OS: the load's peak grows by about one block's weights, not
    by the stage's (a fresh process, so its peak RSS is this load's)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    grown_mib = float(out.stdout.split()[-1])
    assert grown_mib < 40, f"apply_kernels grew the peak by {grown_mib:.0f} MiB of 128"
