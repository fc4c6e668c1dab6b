"""Split stages reproduce the unsplit transformers model bitwise (float32)."""

import itertools
import json

import pytest
import torch
from transformers import StaticCache

from edgeshard_mpi.model import Stage, first_position, position_ids, reference_model
from edgeshard_mpi.presets import PRESETS, resolve
from edgeshard_mpi.weights import (
    CheckpointError,
    SafetensorsWeights,
    SyntheticWeights,
    unit_tensor_shapes,
    weight_source,
)

B, P, G = 3, 32, 5


def reference_logits(model, ids):
    """Unsplit model, same StaticCache, greedy: logits of every step."""
    cache = StaticCache(config=model.config, max_cache_len=P + G)
    out, x = [], ids
    with torch.inference_mode():
        for step in range(G):
            logits = model(
                input_ids=x,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                position_ids=position_ids(B, P, step),
            ).logits[:, -1]
            out.append(logits)
            x = logits.argmax(-1, keepdim=True)
    return out


def split_logits(spec, source, cuts, ids, memo: bool):
    stages = [Stage(spec, a, b) for a, b in itertools.pairwise(cuts)]
    for st in stages:
        st.load(source)
    caches = [st.new_cache(B, P + G) for st in stages]
    out, x = [], ids
    for step in range(G):
        h = x
        for st, cache in zip(stages, caches, strict=True):
            h = st(h, cache, position_ids(B, P, step), first_position(P, step) if memo else None)
        out.append(h)
        x = h.argmax(-1, keepdim=True)
    return out


def partitions(n):
    return [[0, n], [0, 1, n], [0, n - 1, n], [0, 2, n - 2, n], list(range(n + 1))]


@pytest.fixture(scope="module")
def tiny():
    spec = PRESETS["tiny"]
    source = SyntheticWeights(spec, seed=3)
    return spec, source, reference_model(spec, source)


@pytest.mark.parametrize("cuts_i", range(5))
@pytest.mark.parametrize("memo", [False, True])
def test_split_equals_unsplit_synthetic(tiny, cuts_i, memo):
    spec, source, ref = tiny
    ids = torch.randint(3, spec.vocab_size, (B, P), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(ref, ids)
    got = split_logits(spec, source, partitions(spec.n_units)[cuts_i], ids, memo)
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(e, g), f"step {step} differs for cuts {partitions(spec.n_units)[cuts_i]}"


def test_split_equals_unsplit_trained(shared_data):
    path = str(shared_data / "stories260K-hf")
    spec = resolve(path)
    source = weight_source(path, spec, "float32", 0)
    ref = reference_model(spec, source)
    ids = torch.randint(3, spec.vocab_size, (B, P), generator=torch.Generator().manual_seed(2))
    expected = reference_logits(ref, ids)
    for cuts in partitions(spec.n_units):
        got = split_logits(spec, source, cuts, ids, memo=True)
        assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True)), cuts


def test_synthetic_units_are_independent_of_partition():
    spec = PRESETS["tiny"]
    a, b = SyntheticWeights(spec, 7), SyntheticWeights(spec, 7)
    for unit in (3, 0, spec.n_units - 1):  # any order gives the same tensors
        sa, sb = a.unit_state(unit), b.unit_state(unit)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        SyntheticWeights(spec, 8).unit_state(1)["model.layers.0.mlp.up_proj.weight"],
        a.unit_state(1)["model.layers.0.mlp.up_proj.weight"],
    )


def test_stage_holds_only_its_units():
    spec = PRESETS["tiny"]
    st = Stage(spec, 2, 4)
    st.load(SyntheticWeights(spec))
    assert not st.has_embed and not st.has_head and st.layer_ids == [1, 2]
    assert [layer.self_attn.layer_idx for layer in st.layers] == [1, 2]
    expected = sum(spec.unit_weight_bytes(u) for u in (2, 3))
    assert st.weight_bytes() == expected
    cache = st.new_cache(2, 40)
    assert Stage.cache_bytes(cache) == 2 * spec.unit_kv_bytes(2, 2, 40)
    assert not cache.layers[0].is_initialized  # other stages' layers take no memory


def test_kv_cache_size_matches_formula():
    spec = PRESETS["small"]
    st = Stage(spec, 0, spec.n_units)
    st.load(SyntheticWeights(spec))
    cache = st.new_cache(4, 128)
    per_layer = 2 * spec.num_kv_heads * spec.head_size * 4 * 128 * 4  # K and V, fp32
    assert Stage.cache_bytes(cache) == spec.num_layers * per_layer


def test_safetensors_reads_only_requested_units(shared_data, monkeypatch):
    import safetensors

    path = shared_data / "stories260K-hf"
    spec = resolve(str(path))
    src = SafetensorsWeights(path, spec)
    read = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    state = src.unit_state(2)
    assert set(state) == set(unit_tensor_shapes(spec, 2))
    assert sorted(read) == sorted(unit_tensor_shapes(spec, 2))  # nothing else was read
    read.clear()
    head = src.unit_state(spec.n_units - 1)  # tied: lm_head comes from the embedding table
    assert read == ["model.norm.weight", "model.embed_tokens.weight"]
    assert torch.equal(head["lm_head.weight"], src.unit_state(0)["model.embed_tokens.weight"])


def test_checkpoint_errors_are_clear(tmp_path, shared_data):
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        SafetensorsWeights(tmp_path, PRESETS["tiny"])
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors header"):
        SafetensorsWeights(tmp_path, PRESETS["tiny"])
    # A config that does not match the weights: the shape check names the tensor.
    src = shared_data / "stories260K-hf"
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    spec = resolve(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight.*shape"):
        SafetensorsWeights(tmp_path, spec).unit_state(1)


def test_presets_have_real_llama2_sizes():
    # Published parameter counts: 6.74B, 13.02B, 68.98B.
    assert abs(PRESETS["llama2-7b"].total_params() / 1e9 - 6.74) < 0.01
    assert abs(PRESETS["llama2-13b"].total_params() / 1e9 - 13.02) < 0.01
    assert abs(PRESETS["llama2-70b"].total_params() / 1e9 - 68.98) < 0.01
    assert PRESETS["llama2-70b"].num_kv_heads == 8


def test_hf_config_roundtrip(shared_data):
    spec = resolve(str(shared_data / "stories260K-hf"))
    assert (spec.num_layers, spec.hidden_size, spec.num_kv_heads, spec.vocab_size) == (
        5,
        64,
        4,
        512,
    )
    assert spec.tie_word_embeddings and spec.head_size == 8
    assert spec.total_params() == 260_032
