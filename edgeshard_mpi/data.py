"""Workload: WikiText-2 prompts of exactly `prompt_tokens` tokens, and the tokenizers.

Only rank 0 (the source node) reads text and tokenizes; the other ranks only ever see
hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .job import JobError, WorkloadCfg


class ByteTokenizer:
    """Built-in byte-level tokenizer for synthetic models: id = byte + 3 (0 unk, 1 bos, 2 eos)."""

    name = "bytes"
    bos_id, eos_id, vocab_size = 1, 2, 259

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A bare SentencePiece model file (e.g. Llama 2's tokenizer.model)."""

    def __init__(self, path: Path):
        import sentencepiece

        self.name = f"sentencepiece:{path}"
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, add_bos=True)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """The tokenizer shipped in a Hugging Face model directory."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.name = f"hf:{path}"
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(setting: str, model_source: str, vocab_size: int):
    """`auto`: the model directory's tokenizer when it has one, else bytes."""
    if setting == "bytes":
        tok = ByteTokenizer()
    elif setting == "auto":
        model_dir = Path(model_source)
        has_files = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        tok = HFTokenizer(model_dir) if model_dir.is_dir() and has_files else ByteTokenizer()
    else:
        path = Path(setting)
        if not path.is_file():
            raise JobError(
                f"workload.tokenizer: {setting!r} not found; give a SentencePiece "
                ".model file, 'auto' or 'bytes'"
            )
        try:
            tok = SentencePieceTokenizer(path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad file
            raise JobError(
                f"workload.tokenizer: {setting} is not a SentencePiece model "
                f"({str(e).splitlines()[0][:120]}); give a tokenizer.model, 'auto' or 'bytes'"
            ) from None
    if tok.vocab_size > vocab_size:
        raise JobError(
            f"workload.tokenizer: {tok.name} has {tok.vocab_size} tokens but the model's "
            f"vocabulary has {vocab_size}; use the model's own tokenizer (or 'bytes')"
        )
    return tok


@dataclass(frozen=True)
class PromptSet:
    source: str
    """'wikitext-2:<path>' or 'builtin'."""
    tokenizer: str
    ids: np.ndarray
    """Prompt token ids: [n_prompts, prompt_tokens] int64."""
    texts: tuple[str, ...]
    """The paragraph each prompt was cut from."""
    note: str = ""
    """Why the built-in set was used, if it was."""


def wikitext_paragraphs(path: Path) -> list[str]:
    """Paragraphs of a WikiText raw file: non-empty lines that are not ' = Heading = '."""
    out = []
    try:
        raw = path.read_bytes()
        if b"\0" in raw[:65536]:
            raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "NUL byte: a binary file")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(
            f"workload.dataset: {path} is not a UTF-8 text file ({e.__class__.__name__}: "
            f"{getattr(e, 'reason', None) or e}); point it at WikiText-2's wiki.test.raw"
        ) from None
    for line in text.splitlines():
        s = line.strip()
        if s and not (s.startswith("=") and s.endswith("=")):
            out.append(s)
    return out


def builtin_paragraphs() -> list[str]:
    text = resources.files("edgeshard_mpi").joinpath("resources/builtin_prompts.txt")
    lines = text.read_text(encoding="utf-8").splitlines()
    return [s for s in (x.strip() for x in lines) if s and not s.startswith("#")]


def _cut(paragraphs: list[str], tok, n: int, length: int, seed: int, what: str):
    """Draw n paragraphs (seeded order) with at least `length` tokens; keep the first
    `length` tokens of each, BOS included."""
    order = np.random.default_rng(seed).permutation(len(paragraphs))
    ids, texts = [], []
    for i in order:
        toks = tok.encode(paragraphs[i])
        if len(toks) >= length:
            ids.append(toks[:length])
            texts.append(paragraphs[i])
            if len(ids) == n:
                break
    if len(ids) < n:
        raise JobError(
            f"workload: {what} has only {len(ids)} paragraphs of >= {length} tokens with "
            f"{tok.name}, but {n} prompts were asked for; lower workload.prompts or prompt_tokens"
        )
    return np.asarray(ids, dtype=np.int64), tuple(texts)


def load_prompts(wl: WorkloadCfg, tok) -> PromptSet:
    note = ""
    if wl.dataset is not None and wl.dataset.is_file():
        paragraphs = wikitext_paragraphs(wl.dataset)
        ids, texts = _cut(paragraphs, tok, wl.prompts, wl.prompt_tokens, wl.seed, str(wl.dataset))
        return PromptSet(f"wikitext-2:{wl.dataset}", tok.name, ids, texts)
    if wl.dataset_field is not None:
        looked = str(wl.dataset) if wl.dataset is not None else wl.dataset_field
        msg = (
            f"workload.dataset: no file at {looked} (written as {wl.dataset_field!r}); "
            "point it at wiki.test.raw of WikiText-2 (raw), e.g. set EDGESHARD_DATA to the "
            "folder that holds wikitext-2-raw-v1/"
        )
        if wl.fallback == "error":
            raise JobError(msg)
        note = msg + "; using the built-in prompts (workload.fallback = 'builtin')"
    ids, texts = _cut(
        builtin_paragraphs(), tok, wl.prompts, wl.prompt_tokens, wl.seed, "the built-in prompt set"
    )
    return PromptSet("builtin", tok.name, ids, texts, note)


def continuation(job, spec, prompt_ids: np.ndarray, generated: np.ndarray) -> str:
    """The first prompt and what the model wrote after it, decoded (output.show_text)."""
    tok = load_tokenizer(job.workload.tokenizer, job.model.source, spec.vocab_size)
    gen = [int(t) for t in generated if t >= 0]
    return (
        f"first prompt: {tok.decode([int(t) for t in prompt_ids])!r}\n"
        f"[rank 0] continuation: {tok.decode(gen)!r}"
    )
