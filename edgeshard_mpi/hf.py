"""transformers' own machinery for a stage: the config, the model skeleton on meta, the
checkpoint-name conversion of from_pretrained, and the non-persistent buffers rebuilt for real.

A stage never writes a family's modules itself: it builds the family's XForCausalLM on the
meta device (no memory, no init), keeps the submodules it owns, and lets transformers'
`_init_weights` compute their buffers (rotary tables, embedding scales) on the real device.
"""

from __future__ import annotations

import inspect
import re
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .families import FAMILIES, UnsupportedModel, family
from .presets import ModelSpec

# Config fields a stage handles generically (shapes, masks, cache, outputs, training-only
# losses) wherever the family's top-level classes read them.
_GENERIC_FIELDS = {
    "vocab_size", "hidden_size", "pad_token_id", "num_hidden_layers", "rms_norm_eps",
    "layer_norm_eps", "layer_types", "_attn_implementation", "use_cache", "output_attentions",
    "output_hidden_states", "use_return_dict", "tie_word_embeddings", "initializer_range",
    "get_text_config", "output_router_logits", "router_aux_loss_coef", "num_experts",
    "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
}  # fmt: skip


def load_config(spec: ModelSpec):
    """The transformers config of a model directory, or LlamaConfig for a preset."""
    from transformers import AutoConfig, LlamaConfig

    path = Path(spec.name)
    if (path / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(path)
    else:
        cfg = LlamaConfig(**spec.hf_config_dict())
    return cfg


@lru_cache(maxsize=8)
def _read_fields(cls: type) -> frozenset[str]:
    """The config fields a class's source reads (`config.x`, `self.config.x`)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(r"config\.(\w+)", src))


def check_top_level(model: nn.Module) -> None:
    """Refuse a family whose top-level classes read a config field the table does not cover:
    the stage replaces their forward, so such a field would be silently ignored."""
    cfg = model.config
    fam = FAMILIES[cfg.model_type]
    handled = set(_GENERIC_FIELDS) | set(fam.reads) | set(fam.must_be)
    handled |= {
        f
        for f in (fam.embed_multiplier, fam.logit_multiplier, fam.logit_divisor, fam.logit_softcap)
        if f
    }
    if fam.mask != "full":  # the window of sliding layers is applied by their masks
        handled.add("sliding_window")
    read = _read_fields(type(model)) | _read_fields(type(model.base_model))
    missing = sorted(read - handled)
    if missing:
        raise UnsupportedModel(
            f"model_type {cfg.model_type!r}: transformers' {type(model).__name__} reads "
            f"config field(s) {', '.join(missing)} that edgeshard's stage does not apply; "
            "add them to edgeshard_mpi/families.py (or use a model without them)"
        )


@lru_cache(maxsize=4)
def skeleton(spec: ModelSpec) -> nn.Module:
    """The family's XForCausalLM on the meta device: module tree and names, no memory.
    Shared and never materialised: a stage deep-copies the submodules it owns."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    family(config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_top_level(model)
    if not hasattr(model.base_model, "layers"):
        raise UnsupportedModel(f"model_type {config.model_type!r}: no decoder `layers` list")
    return model.eval()


def materialize_buffers(model: nn.Module, module: nn.Module, device: torch.device) -> None:
    """Buffers that checkpoints do not hold (rotary inv_freq, Gemma's embed_scale) are
    created on the real device and filled by transformers' own `_init_weights`, as
    from_pretrained does; meta parameters are left to `Stage.load`."""
    for sub in module.modules():
        meta = [n for n, b in sub.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        for name in meta:
            buf = getattr(sub, name)
            persistent = name not in sub._non_persistent_buffers_set
            sub.register_buffer(name, torch.empty_like(buf, device=device), persistent)
        model._init_weights(sub)


@lru_cache(maxsize=4)
def converter(spec: ModelSpec) -> Converter:
    return Converter(skeleton(spec))


class Converter:
    """Checkpoint names -> the model's parameter names, through transformers' conversion
    mapping (renames, prefix changes, per-expert tensors fused into one)."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = get_model_conversion_mapping(model)
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.prefix = model.base_model_prefix
        self.meta = {k: v.shape for k, v in model.state_dict().items()}

    def target(self, key: str) -> tuple[str, str | None]:
        """(parameter name, converter source pattern or None) of a checkpoint key."""
        from transformers.core_model_loading import rename_source_key

        name, pattern = rename_source_key(
            key, self.renamings, self.converters, self.prefix, self.meta
        )
        if name not in self.meta and key in self.meta:
            name, pattern = key, None
        return name, pattern

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (all those of the targets they feed) -> parameters."""
        out, pending = {}, {}
        for key in sorted(tensors, key=_natural):
            name, pattern = self.target(key)
            if pattern is None:
                out[name] = tensors[key]
                continue
            conv = pending.setdefault(name, deepcopy(self.by_pattern[pattern]))
            conv.add_tensor(name, key, pattern, tensors[key])
        for name, conv in pending.items():
            out.update(conv.convert(name))
        return out


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
