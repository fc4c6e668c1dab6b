"""The few per-family facts a generic stage cannot read from the config: one table.

A stage runs the family's own transformers decoder layers, norm and rotary embedding (see
model.py); what the family's *top-level* `XModel.forward` / `XForCausalLM.forward` does around
them is listed here: which attention mask each layer gets, whether the rotary table depends on
the layer type, and the scalings applied to the embeddings and the logits. Nothing else in the
package branches on `model_type`.

Pure (no torch): presets.py reads it to size a checkpoint for the planner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    mask: str = "full"
    """How the family picks a layer's attention mask: "full" (causal everywhere),
    "sliding_window" (every layer sliding when `config.sliding_window` is set: Mistral),
    "layer_types" (`config.layer_types[i]`: sliding or full per layer)."""
    rotary_per_type: bool = False
    """The rotary embedding takes the layer type (Gemma 3: local and global RoPE)."""
    embed_multiplier: str | None = None
    """Config field the embeddings are multiplied by (Granite's embedding_multiplier)."""
    logit_multiplier: str | None = None
    """Config field the logits are multiplied by (Cohere's logit_scale)."""
    logit_divisor: str | None = None
    """Config field the logits are divided by (Granite's logits_scaling)."""
    logit_softcap: str | None = None
    """Config field of tanh soft-capping of the logits (Gemma 2/3 final_logit_softcapping)."""
    must_be: dict = field(default_factory=dict)
    """Config fields the stage does not implement, with the only value it can honour."""
    reads: tuple[str, ...] = ()
    """Further config fields the family's top-level forward reads that are harmless to a
    stage (the source check in hf.py refuses any field read there and not listed)."""


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(mask="sliding_window"),
    "mixtral": Family(mask="sliding_window"),
    # generate() resets the cache past original_max_position_embeddings under LongRoPE;
    # the rotary class itself picks the long/short factors, so a stage is exact.
    "phi3": Family(mask="sliding_window", reads=("original_max_position_embeddings",)),
    "qwen2": Family(mask="layer_types"),
    "qwen3": Family(mask="layer_types"),
    "qwen2_moe": Family(mask="layer_types"),
    "smollm3": Family(mask="layer_types"),
    "gemma": Family(),
    "gemma2": Family(mask="layer_types", logit_softcap="final_logit_softcapping"),
    "gemma3_text": Family(
        mask="layer_types",
        rotary_per_type=True,
        logit_softcap="final_logit_softcapping",
        must_be={"use_bidirectional_attention": False},
    ),
    "olmo": Family(),
    "olmo2": Family(),
    "granite": Family(embed_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
    "cohere": Family(logit_multiplier="logit_scale"),
    "stablelm": Family(),
}

# Other layouts (fused qkv under other names, learned positions, parallel blocks): refused
# before anything loads rather than run wrong.
REFUSED = {
    "gpt2": "GPT-2 (learned absolute positions, Conv1D layers under other names)",
    "gpt_neox": "GPT-NeoX (fused query_key_value, parallel residual)",
    "falcon": "Falcon (fused query_key_value, parallel attention)",
}

SUPPORTED = ", ".join(sorted(FAMILIES))


class UnsupportedModel(ValueError):
    """A config this package cannot serve exactly; the message names the field and the fix."""


def family(cfg: dict, where: str = "config.json") -> Family:
    """The table entry of a config.json dict; refuses unknown families and fields the stage
    cannot honour."""
    mt = cfg.get("model_type", "llama")
    if mt not in FAMILIES:
        why = f" ({REFUSED[mt]})" if mt in REFUSED else ""
        raise UnsupportedModel(
            f"{where}: model_type {mt!r}{why} is not supported; supported model_type values: "
            f"{SUPPORTED}"
        )
    fam = FAMILIES[mt]
    for key, ok in fam.must_be.items():
        if cfg.get(key, ok) != ok:
            raise UnsupportedModel(
                f"{where}: {key} = {cfg[key]!r} is not supported for {mt} (only {ok!r}); "
                "edgeshard serves causal decoding"
            )
    return fam


def layer_types(cfg: dict) -> list[str]:
    """Each decoder layer's attention kind: "full_attention" or "sliding_attention"."""
    n = cfg["num_hidden_layers"]
    fam = family(cfg)
    if fam.mask == "layer_types" and cfg.get("layer_types"):
        return list(cfg["layer_types"])
    if fam.mask == "sliding_window" and cfg.get("sliding_window") is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def layer_kv_windows(cfg: dict) -> tuple[int, ...]:
    """Per decoder layer: 0 = its KV cache grows with the context, w > 0 = it holds at most
    w tokens (sliding window)."""
    w = cfg.get("sliding_window") or 0
    return tuple(w if t == "sliding_attention" else 0 for t in layer_types(cfg))


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def unit_of(name: str, n_units: int) -> int:
    """The planning unit a checkpoint tensor belongs to: 0 the embedding, l + 1 decoder layer
    l, n_units - 1 the final norm and the head."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)) + 1
    if "embed_tokens" in name:
        return 0
    return n_units - 1
