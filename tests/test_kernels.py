"""runtime.kernels: the fast layout holds the checkpoint's own weights, once; 1 rank and N
ranks give bitwise-identical logits (in process) and tokens (through mpiexec) under either
kernels; tokens equal transformers generate on the trained stories260K under both."""

from __future__ import annotations

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


@pytest.mark.parametrize("kernels", ["fast", "exact"])
@pytest.mark.parametrize("p", [P, 12])  # 12: 24 prompt rows, the fast prompt path (oneDNN)
def test_partitions_give_bitwise_identical_logits(shared_data, kernels, p):
    _, spec, source = stories(shared_data)
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


def test_prompt_rows_take_onednn_and_decode_rows_numpy(monkeypatch):
    """The product's kernel is chosen by its rows alone: > NUMPY_MAX_ROWS through oneDNN
    (where torch has it), fewer through numpy's OpenBLAS; both equal x @ W to rounding."""
    from edgeshard_mpi import kernels

    if not (kernels._ONEDNN and kernels.USE_NUMPY_BLAS):
        pytest.skip("torch without oneDNN or numpy without OpenBLAS here")
    calls = []
    dnn, np_matmul = kernels._linear_pointwise, kernels._np_matmul
    monkeypatch.setattr(kernels, "_linear_pointwise", lambda *a: calls.append("dnn") or dnn(*a))
    monkeypatch.setattr(kernels, "_np_matmul", lambda *a: calls.append("np") or np_matmul(*a))
    lin = nn.Linear(48, 40)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    fast = FastLinear(lin)
    for rows, kernel in ((1, "np"), (kernels.NUMPY_MAX_ROWS, "np"), (40, "dnn")):
        calls.clear()
        x = torch.randn(1, rows, 48)
        torch.testing.assert_close(fast(x), x @ ref_w.T + ref_b, rtol=1e-5, atol=1e-5)
        assert calls == [kernel], rows


def test_kernels_field_is_checked(tmp_path):
    ok = parse_job('[model]\nsource = "tiny"\n[runtime]\nkernels = "exact"\n', tmp_path / "j")
    assert ok.runtime.kernels == "exact"
    assert parse_job('[model]\nsource = "tiny"\n', tmp_path / "j").runtime.kernels == "fast"
    with pytest.raises(JobError, match=r"runtime\.kernels"):
        parse_job('[model]\nsource = "tiny"\n[runtime]\nkernels = "turbo"\n', tmp_path / "j")


@pytest.mark.mpi
@pytest.mark.parametrize("kernels", ["fast", "exact"])
def test_ranks_agree_and_equal_generate_through_mpiexec(kernels, shared_data, write_job, tmp_path):
    path = str(shared_data / "stories260K-hf")
    tokens = {}
    for n in (1, 3):
        job = write_job(
            {
                "model": {"source": path},
                "workload": {"prompts": 2, "prompt_tokens": 20, "new_tokens": 12},  # 20: oneDNN
                "runtime": {"kernels": kernels, "threads": 1},
                "output": {"path": str(tmp_path / f"r{n}.h5")},
            },
            name=f"r{n}.toml",
        )
        proc = run_mpi(n, job, timeout=240)
        assert proc.returncode == 0, proc.stderr
        r = check_file(tmp_path / f"r{n}.h5", n, 2, 12)
        tokens[n] = r["workload"]["generated_ids"]
    assert np.array_equal(tokens[1], tokens[3])
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
