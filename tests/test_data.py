"""Prompts: WikiText-2 cut to exactly prompt_tokens tokens, deterministic; tokenizers."""

from pathlib import Path

import numpy as np
import pytest

from edgeshard_mpi.data import (
    ByteTokenizer,
    builtin_paragraphs,
    load_prompts,
    load_tokenizer,
    wikitext_paragraphs,
)
from edgeshard_mpi.job import JobError, WorkloadCfg


def workload(dataset, **kw) -> WorkloadCfg:
    return WorkloadCfg(
        dataset=dataset, dataset_field=None if dataset is None else str(dataset), **kw
    )


def test_wikitext_prompts_are_exact_and_deterministic(shared_data):
    raw = shared_data / "wikitext-2-raw-v1" / "wiki.test.raw"
    tok = load_tokenizer(str(shared_data / "llama2-tokenizer" / "tokenizer.model"), "x", 32000)
    a = load_prompts(workload(raw, prompts=8, seed=5), tok)
    b = load_prompts(workload(raw, prompts=8, seed=5), tok)
    c = load_prompts(workload(raw, prompts=8, seed=6), tok)
    assert a.ids.shape == (8, 32) and a.ids.dtype == np.int64
    assert np.array_equal(a.ids, b.ids) and not np.array_equal(a.ids, c.ids)
    assert (a.ids[:, 0] == 1).all()  # BOS first, as the tokenizer adds it
    assert a.source.startswith("wikitext-2:") and not a.note
    for ids, text in zip(a.ids, a.texts, strict=True):
        assert tok.decode(ids[1:]).strip() and text.startswith(tok.decode(ids[1:4]).strip()[:3])


def test_wikitext_paragraphs_skip_headings(shared_data):
    paras = wikitext_paragraphs(shared_data / "wikitext-2-raw-v1" / "wiki.test.raw")
    assert not any(p.startswith("=") and p.endswith("=") for p in paras)
    assert len(paras) == 2185
    assert paras[0].startswith("Robert Boulter is an English film")


def test_hf_tokenizer_of_model_dir(shared_data):
    tok = load_tokenizer("auto", str(shared_data / "stories260K-hf"), 512)
    assert tok.name.startswith("hf:") and tok.vocab_size == 512
    assert tok.encode("Once upon a time")[:1] == [1]


def test_tokenizer_larger_than_vocab_is_refused(shared_data):
    with pytest.raises(JobError, match="32000 tokens but the model's vocabulary has 512"):
        load_tokenizer(str(shared_data / "llama2-tokenizer" / "tokenizer.model"), "x", 512)


def test_missing_dataset_says_where_it_looked(tmp_path):
    missing = tmp_path / "nope" / "wiki.test.raw"
    with pytest.raises(JobError) as err:
        load_prompts(workload(missing), ByteTokenizer())
    assert str(missing) in str(err.value) and "EDGESHARD_DATA" in str(err.value)


def test_missing_dataset_falls_back_when_allowed(tmp_path):
    missing = tmp_path / "wiki.test.raw"
    ps = load_prompts(workload(missing, fallback="builtin", prompts=4), ByteTokenizer())
    assert ps.source == "builtin" and str(missing) in ps.note
    assert ps.ids.shape == (4, 32)


def test_too_many_prompts_is_a_clear_error():
    n = len(builtin_paragraphs())
    with pytest.raises(JobError, match=f"only {n} paragraphs"):
        load_prompts(workload(None, prompts=n + 1), ByteTokenizer())


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == 1 and max(ids) < 259 and tok.decode(ids) == "héllo"


def test_builtin_prompts_are_ours():
    paras = builtin_paragraphs()
    assert len(paras) >= 16 and all(len(p.split()) >= 30 for p in paras)
    assert (
        Path(__file__)
        .parent.parent.joinpath("edgeshard_mpi", "resources", "builtin_prompts.txt")
        .is_file()
    )
