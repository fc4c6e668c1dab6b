"""Weight sources: where a stage gets the tensors of the units it owns.

Both sources hand out tensors under their Hugging Face names
(`model.layers.3.self_attn.q_proj.weight`), one planning unit at a time, so a rank reads
only its own layers, and any partition sees exactly the weights of the unsplit model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .presets import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(RuntimeError):
    """A model directory that cannot serve the job: names the file, the tensor and the fix."""


def unit_tensor_shapes(spec: ModelSpec, unit: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of one planning unit."""
    h, v, hd = spec.hidden_size, spec.vocab_size, spec.head_size
    if unit == 0:
        return {"model.embed_tokens.weight": (v, h)}
    if unit == spec.n_units - 1:
        return {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    p = f"model.layers.{unit - 1}."
    q, kv, inter = spec.num_heads * hd, spec.num_kv_heads * hd, spec.intermediate_size
    shapes = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
    }
    if spec.attention_bias:
        shapes.update(
            {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.bias": (h,),
            }
        )
    if spec.mlp_bias:
        shapes.update(
            {
                p + "mlp.gate_proj.bias": (inter,),
                p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (h,),
            }
        )
    return shapes


class SyntheticWeights:
    """Seeded random weights. Each unit draws from its own generator, seeded from
    (seed, unit), so a rank can build unit 17 without generating units 0..16."""

    def __init__(self, spec: ModelSpec, seed: int = 0, dtype: str = "float32"):
        self.spec, self.seed, self.dtype = spec, seed, DTYPES[dtype]

    def _generator(self, unit: int) -> torch.Generator:
        digest = hashlib.sha256(f"edgeshard:{self.seed}:{unit}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def unit_state(self, unit: int) -> dict[str, torch.Tensor]:
        gen = self._generator(unit)
        out = {}
        for name, shape in unit_tensor_shapes(self.spec, unit).items():
            if name.endswith("norm.weight"):
                # Around 1, not exactly 1, so a wrong norm placement cannot go unnoticed.
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith(".bias"):
                t = 0.02 * torch.randn(shape, generator=gen)
            else:
                # Embedding and lm_head a bit larger than 0.02 so that greedy decoding of a
                # random model is not a sea of near-ties.
                std = 0.5 if name in ("model.embed_tokens.weight", "lm_head.weight") else 0.02
                t = std * torch.randn(shape, generator=gen)
            out[name] = t.to(self.dtype)
        if unit == self.spec.n_units - 1 and self.spec.tie_word_embeddings:
            out["lm_head.weight"] = self.unit_state(0)["model.embed_tokens.weight"]
        return out


class SafetensorsWeights:
    """A Hugging Face model directory: `model.safetensors`, or shards listed in
    `model.safetensors.index.json`. Opens only the shards that hold the asked-for tensors and
    hands them out under the model's parameter names (after transformers' conversion)."""

    def __init__(self, path: Path, spec: ModelSpec, dtype: str = "float32"):
        self.path, self.spec, self.dtype = Path(path), spec, DTYPES[dtype]
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif single.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(single), framework="pt") as f:
                    self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{single}: cannot read safetensors header ({e})") from None
        else:
            raise CheckpointError(
                f"{self.path}: no model.safetensors or model.safetensors.index.json; convert "
                "the checkpoint to safetensors (transformers: save_pretrained)"
            )

        # Which checkpoint tensors feed which unit, from transformers' own conversion of
        # the names (a missing `model.` prefix, Mixtral's per-expert w1/w2/w3, ...).
        from .families import unit_of
        from .hf import converter

        try:
            self.conv = converter(spec)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        n = spec.n_units
        self.keys: list[list[str]] = [[] for _ in range(n)]
        for key in self.weight_map:
            target, _ = self.conv.target(key)
            if target in self.conv.meta:
                self.keys[unit_of(target, n)].append(key)
        self.tied_head = "lm_head.weight" in self.conv.meta and not any(
            self.conv.target(k)[0] == "lm_head.weight" for k in self.keys[-1]
        )

    def _read(self, keys: list[str], unit: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        out = {}
        for fname, names in by_file.items():
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: shard listed in the index is missing")
            try:
                with safe_open(str(fpath), framework="pt") as f:
                    for key in names:
                        out[key] = f.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{fpath}: cannot read tensors ({e})") from None
        return out

    def unit_names(self, unit: int) -> list[str]:
        """The model's parameter names of `unit`."""
        from .families import unit_of

        n = self.spec.n_units
        return [k for k in self.conv.meta if unit_of(k, n) == unit]

    def unit_state(self, unit: int) -> dict[str, torch.Tensor]:
        out = self.conv.convert(self._read(self.keys[unit], unit))
        if unit == self.spec.n_units - 1 and self.tied_head:  # tied: the head reads the table
            table = self.conv.convert(self._read(self.keys[0], 0))
            out["lm_head.weight"] = next(v for k, v in table.items() if k.endswith("weight"))
        out = {k: v for k, v in out.items() if k in self.conv.meta}
        for name in self.unit_names(unit):
            if name not in out:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} (unit {unit}) is missing from the "
                    "checkpoint; is config.json from the same model?"
                )
            shape = tuple(self.conv.meta[name])
            if tuple(out[name].shape) != shape:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has shape {tuple(out[name].shape)}, "
                    f"config.json implies {shape}"
                )
            out[name] = out[name].to(self.dtype)
        return out


def weight_source(source: str, spec: ModelSpec, dtype: str, seed: int):
    path = Path(source)
    if path.is_dir():
        return SafetensorsWeights(path, spec, dtype)
    return SyntheticWeights(spec, seed, dtype)
