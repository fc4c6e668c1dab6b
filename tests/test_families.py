"""Every supported transformers family, exactly: tiny random checkpoints written by
transformers (tests/family_models.py), split into stages, against transformers' own
`generate` and the unsplit model's logits; plus the sizes the planner sees and the refusals.

Logits are compared with allclose, not bitwise: the stage attends over a static cache
padded to the context (masked), the unsplit forward over exactly the prompt's keys; SDPA
reduces over a different length, so the last bits may differ (about 1e-6). Tokens, and the
logits of 1 stage vs 3 stages, are equal exactly."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from edgeshard_mpi.families import UnsupportedModel
from edgeshard_mpi.kernels import apply_kernels
from edgeshard_mpi.model import Stage, first_position, position_ids
from edgeshard_mpi.presets import resolve
from edgeshard_mpi.weights import weight_source
from tests.family_models import FAMILIES, REFUSED, build

NEW = 12


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def reference(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None  # a fixed token count
    return model


def generate(model, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


def load_chain(path, cuts, cls=Stage, kernels="exact"):
    spec = resolve(str(path))
    src = weight_source(str(path), spec, "float32", 0)
    stages = [cls(spec, a, b) for a, b in itertools.pairwise(cuts)]
    for st in stages:
        st.load(src)
        apply_kernels(st, kernels)
    return stages


def run_chain(stages, ids: torch.Tensor, new: int = NEW):
    """Greedy decoding through the stages, as the runtime does; (tokens, logits per step)."""
    b, p = ids.shape
    caches = [st.new_cache(b, p + new) for st in stages]
    x, toks, logits = ids, [], []
    for step in range(new):
        pos, start = position_ids(b, p, step), first_position(p, step)
        for st, cache in zip(stages, caches, strict=True):
            x = st(x, cache, pos, start)
        logits.append(x)
        x = x.argmax(-1)
        toks.append(x)
        x = x[:, None]
    return torch.stack(toks, 1), logits


def prompt(b: int = 2, p: int = 7) -> torch.Tensor:
    return torch.randint(3, 380, (b, p), generator=torch.Generator().manual_seed(0))


class SkipLastLayer(Stage):
    """Test double: a stage that leaves out its last decoder layer."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.layer_ids:
            self.layers = self.layers[:-1]
            self.layer_types = self.layer_types[:-1]


class NoSlidingMask(Stage):
    """Test double: every layer gets the full causal mask (a dropped per-layer mask)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.layer_types = ["full_attention"] * len(self.layer_types)


class NoEmbedScale(Stage):
    """Test double: embeddings without their family scale (Gemma's sqrt(hidden) buffer,
    Granite's embedding_multiplier)."""

    def load(self, source):
        super().load(source)
        if self.embed_tokens is not None and hasattr(self.embed_tokens, "embed_scale"):
            self.embed_tokens.embed_scale.fill_(1.0)
        self.family = type(self.family)(**{**self.family.__dict__, "embed_multiplier": None})


@pytest.mark.parametrize("name", list(FAMILIES))
def test_split_equals_generate(name, ckpt_root):
    path = build(name, ckpt_root)
    ref = reference(path)
    ids = prompt(p=9)  # 18 prompt rows: the fast kernels' prompt path (> NUMPY_MAX_ROWS)
    expected = generate(ref, ids)
    with torch.no_grad():
        ref_logits = ref(ids).logits[:, -1]
    one, logits1 = run_chain(load_chain(path, [0, 6]), ids)
    three, logits3 = run_chain(load_chain(path, [0, 2, 4, 6]), ids)
    assert torch.equal(one, expected), f"{name}: 1 stage differs from generate"
    assert torch.equal(three, expected), f"{name}: 3 stages differ from generate"
    for a, b in zip(logits1, logits3, strict=True):
        assert torch.equal(a, b)  # the same modules on the same inputs: bitwise
    torch.testing.assert_close(logits1[0], ref_logits, rtol=1e-5, atol=1e-5)
    # The fast kernels (the runtime's default): the same tokens, 1 and 3 stages bitwise.
    fast1, flog1 = run_chain(load_chain(path, [0, 6], kernels="fast"), ids)
    fast3, flog3 = run_chain(load_chain(path, [0, 2, 4, 6], kernels="fast"), ids)
    assert torch.equal(fast1, expected) and torch.equal(fast3, expected), f"{name}: fast"
    assert all(torch.equal(a, b) for a, b in zip(flog1, flog3, strict=True))
    # The test can fail: the model's tokens depend on its last layer.
    wrong, _ = run_chain(load_chain(path, [0, 2, 4, 6], SkipLastLayer), ids)
    assert not torch.equal(wrong, expected), f"{name}: tokens ignore the last layer"


@pytest.mark.parametrize(
    "name, double",
    [
        ("mistral", NoSlidingMask),
        ("gemma2", NoSlidingMask),
        ("gemma3", NoSlidingMask),
        ("gemma", NoEmbedScale),
        ("gemma3", NoEmbedScale),
        ("granite", NoEmbedScale),
    ],
)
def test_a_dropped_quirk_is_caught(name, double, ckpt_root):
    """Proof that the comparison above can fail: a stage without the per-layer mask or the
    embedding scale gives other tokens than generate (prompts longer than the window)."""
    path = build(name, ckpt_root)
    ids = prompt(2, 9)
    expected = generate(reference(path), ids)
    right, _ = run_chain(load_chain(path, [0, 3, 6]), ids)
    assert torch.equal(right, expected)
    try:
        wrong, _ = run_chain(load_chain(path, [0, 3, 6], double), ids)
    except RuntimeError as e:  # Gemma's sliding caches hold the window: a full mask fails
        assert "size of tensor" in str(e)
        return
    assert not torch.equal(wrong, expected)


@pytest.mark.parametrize("name", ["llama-bias-tied", "mistral", "gemma3", "mixtral", "qwen2_moe"])
def test_unit_sizes_from_checkpoint(name, ckpt_root):
    """The planner's per-unit bytes (safetensors headers, every expert) equal what a
    loaded stage holds; KV bytes equal the allocated cache (sliding layers: the window)."""
    path = build(name, ckpt_root)
    spec = resolve(str(path))
    src = weight_source(str(path), spec, "float32", 0)
    for u in range(spec.n_units):
        st = Stage(spec, u, u + 1)
        st.load(src)
        held = sum(p.numel() * p.element_size() for p in st.parameters())
        assert spec.unit_weight_bytes(u) == held, f"unit {u}"
        if 0 < u < spec.n_units - 1:
            cache = st.new_cache(2, 16)
            assert Stage.cache_bytes(cache) == spec.unit_kv_bytes(u, 2, 16), f"unit {u}"
    if name in ("mistral", "gemma3"):
        assert (
            min(spec.unit_kv_bytes(u, 1, 16) for u in range(1, 5)) < spec.unit_kv_bytes(1, 1, 4) * 4
        ), "a sliding layer holds at most its window"


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_layouts_are_refused(name, ckpt_root):
    path = build(name, ckpt_root)
    with pytest.raises(UnsupportedModel, match=f"model_type '{name}'.*supported model_type"):
        resolve(str(path))


def test_unhandled_config_fields_are_refused(ckpt_root, monkeypatch):
    import json

    path = build("gemma3", ckpt_root)
    cfg = json.loads((path / "config.json").read_text())
    cfg["use_bidirectional_attention"] = True
    bad = ckpt_root / "gemma3-bidirectional"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="use_bidirectional_attention"):
        resolve(str(bad))
    # A top-level field the family table does not cover (here: Granite without its
    # multipliers in the table) is refused, not ignored.
    from edgeshard_mpi import families, hf

    monkeypatch.setitem(families.FAMILIES, "granite", families.Family())
    hf.skeleton.cache_clear()
    hf.converter.cache_clear()
    try:
        with pytest.raises(UnsupportedModel, match="embedding_multiplier"):
            Stage(resolve(str(build("granite", ckpt_root))), 0, 2)
    finally:
        hf.skeleton.cache_clear()
        hf.converter.cache_clear()


@pytest.mark.mpi
def test_families_over_mpi_equal_generate(ckpt_root, tmp_path):
    """Every family through the real runner on 1, 2 (even split) and 3 MPI ranks (one
    mpiexec per rank count runs every family's job), tokens equal to generate."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from edgeshard_mpi import toml_out
    from edgeshard_mpi.metrics import read_run
    from tests.conftest import mpiexec

    driver = Path(__file__).with_name("mpi_jobs.py")
    t0 = time.perf_counter()
    for n in (1, 2, 3):
        jobs = []
        for name in FAMILIES:
            part = (
                {"strategy": "even"}
                if n < 3
                else {
                    "strategy": "explicit",
                    "stages": [
                        {"rank": r, "layers": [a, b]}
                        for r, a, b in ((0, 0, 2), (1, 2, 4), (2, 4, 6))
                    ],
                }
            )
            job = {
                "name": name,
                "model": {"source": str(build(name, ckpt_root))},
                "workload": {
                    "tokenizer": "bytes",
                    "prompts": 2,
                    "batch_size": 2,
                    "prompt_tokens": 8,
                    "new_tokens": NEW,
                },
                "partition": part,
                "output": {"path": str(tmp_path / f"{name}-{n}.h5")},
            }
            jobs.append(tmp_path / f"{name}-{n}.toml")
            jobs[-1].write_text(toml_out.dumps(job))
        env = dict(os.environ, MPIEXEC_TIMEOUT="400", PYTHONUNBUFFERED="1")
        cmd = [
            mpiexec(),
            "-n",
            str(n),
            sys.executable,
            "-m",
            "mpi4py",
            str(driver),
            *map(str, jobs),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=460, env=env, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for name in FAMILIES:
            r = read_run(tmp_path / f"{name}-{n}.h5")
            ids = torch.from_numpy(np.asarray(r["workload"]["prompt_ids"]))
            expected = generate(reference(build(name, ckpt_root)), ids).numpy()
            got = r["workload"]["generated_ids"]
            assert np.array_equal(got, expected), f"{name} on {n} rank(s) differs from generate"
    print(f"{len(FAMILIES)} families x 1, 2 and 3 ranks over MPI: {time.perf_counter() - t0:.0f} s")


@pytest.mark.mpi
def test_demo_plans_and_tells_a_story(shared_data, tmp_path):
    """`make demo`'s job: profile, EdgeShard DP under memory budgets below the model's size
    (so the plan cuts it), broadcast, run; rank 0 prints readable text."""
    import re
    from pathlib import Path

    from edgeshard_mpi.metrics import read_run
    from tests.conftest import run_mpi

    text = (Path(__file__).parents[1] / "jobs" / "demo.toml").read_text()
    job = tmp_path / "demo.toml"
    job.write_text(text.replace("results/{name}-{time}.h5", str(tmp_path / "demo.h5")))
    proc = run_mpi(4, job, extra_env={"EDGESHARD_DATA": str(shared_data)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = read_run(tmp_path / "demo.h5")["plan"]["stages"]
    assert len(stages) >= 2  # the budgets force a cut
    story = re.search(r"continuation: '(.*)'", proc.stdout).group(1)
    assert len(re.findall(r"\b[a-z]+\b", story)) >= 10, story  # words, not noise


def test_profile_smooths_only_within_a_kind_of_layer(ckpt_root):
    """Gemma 3 alternates sliding and full attention: the profile keeps one time per kind
    (not one median for all layers), and sampling still times every kind."""
    from edgeshard_mpi.profile import measure_units

    path = build("gemma3", ckpt_root)
    spec = resolve(str(path))
    kinds = [spec.unit_kind(u) for u in range(1, spec.n_units - 1)]
    assert len(set(kinds)) == 2 and kinds[0] != kinds[1]
    src = weight_source(str(path), spec, "float32", 0)
    pre, dec = measure_units(spec, src, "float32", "cpu", 1e9, [1], 8, 16, 0, 2, 1, cold=False)
    for arr in (pre[0], dec[0]):
        assert np.isfinite(arr).all()
        by_kind = {}
        for u, k in enumerate(kinds, start=1):
            by_kind.setdefault(k, set()).add(arr[u])
        assert all(len(v) == 1 for v in by_kind.values())


@pytest.mark.parametrize("name", ["mixtral", "llama-noprefix", "llama-sharded"])
def test_a_unit_reads_only_its_own_tensors(name, ckpt_root, monkeypatch):
    """Per-expert tensors on disk are read for their layer only and fused in memory
    (transformers' conversion mapping); names without `model.` resolve the same way."""
    import safetensors

    path = build(name, ckpt_root)
    spec = resolve(str(path))
    src = weight_source(str(path), spec, "float32", 0)
    read, real_open = [], safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    state = src.unit_state(2)
    assert read and all(".layers.1." in "." + k for k in read), read
    assert all(k.startswith("model.layers.1.") for k in state)
    if name == "mixtral":
        assert any(".experts.3.w1." in k for k in read)  # on disk: one tensor per expert
        fused = state["model.layers.1.mlp.experts.gate_up_proj"]
        assert fused.shape[0] == 4  # in memory: all experts in one tensor


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decode_masks_and_rotary_shortcut_is_bitwise(name, ckpt_root):
    """A decode step's masks and rotary cos/sin (Stage._decode_aux: key index <= position,
    rows of a rotary table) give the same bits as building them as transformers does."""
    path = build(name, ckpt_root)
    ids = prompt()
    runs = {}
    for fast_aux in (True, False):
        stages = load_chain(path, [0, 2, 4, 6], kernels="fast")
        for st in stages:
            st.fast_decode_aux = fast_aux
        runs[fast_aux] = run_chain(stages, ids)
    toks, logits = runs[True]
    assert torch.equal(toks, runs[False][0])
    assert all(torch.equal(a, b) for a, b in zip(logits, runs[False][1], strict=True)), name
    # The shortcut is taken where it can be: full-attention masks under SDPA (a bool mask;
    # eager attention's is additive) and static rope tables.
    st = load_chain(path, [0, 2, 4, 6], kernels="fast")
    run_chain(st, ids, new=3)
    kinds = {k for s in st for (k, *_), t in s._mask_tmpl.items() if t is not False}
    full = "full_attention" in {k for s in st for k in s.layer_types}
    if full and st[0].config._attn_implementation == "sdpa":
        assert kinds == {"full_attention"}, name
    if st[1]._rope_static:
        assert all(t is not False for s in st for t in s._rot_table.values()), name
