"""Tiny random checkpoints of every supported family, written by transformers itself
(save_pretrained): 4 layers, hidden 64, weights scaled up (initializer_range) so that greedy
decoding depends on every layer (a wrong layer changes the tokens; test_families proves it)."""

from __future__ import annotations

import json
from pathlib import Path

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=384,
    max_position_embeddings=128,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# name -> (model_type, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama-gelu": ("llama", dict(hidden_act="gelu_pytorch_tanh")),
    "llama3-rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-bias-tied": (
        "llama",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "llama-noprefix": ("llama", {}),  # tensors saved without the `model.` prefix
    "llama-sharded": ("llama", {}),  # several safetensors files and an index
    "llama-rope-yarn": (
        "llama",
        dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
    ),
    "llama-rope-linear": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ),
    "mistral": ("mistral", dict(sliding_window=5)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "phi3": ("phi3", {}),
    "gemma": ("gemma", dict(head_dim=16)),
    "gemma2": (
        "gemma2",
        dict(head_dim=16, sliding_window=5, final_logit_softcapping=5.0, initializer_range=0.05),
    ),
    "gemma3": (
        "gemma3_text",
        dict(
            head_dim=16,
            sliding_window=5,
            sliding_window_pattern=2,
            final_logit_softcapping=5.0,
            initializer_range=0.05,
        ),
    ),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "granite": (
        "granite",
        dict(
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.3,
            logits_scaling=2.0,
        ),
    ),
    "cohere": ("cohere", dict(logit_scale=0.5)),
    "stablelm": ("stablelm", {}),
    "smollm3": ("smollm3", {}),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
    ),
}

REFUSED = {
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=384)),
    "gpt_neox": (
        "gpt_neox",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=384,
        ),
    ),
    "falcon": (
        "falcon",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=384),
    ),
}


def build(name: str, root: Path) -> Path:
    """Write the checkpoint `name` under root/name (once) and return its folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = root / name
    if (out / "config.json").is_file():
        return out
    if name in REFUSED:
        mt, kw = REFUSED[name]
        AutoConfig.for_model(mt, **kw).save_pretrained(out)
        return out
    mt, kw = FAMILIES[name]
    cfg = AutoConfig.for_model(mt, **{**BASE, **kw})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, max_shard_size="100KB" if name == "llama-sharded" else "50GB")
    if name == "llama-noprefix":
        from safetensors.torch import load_file, save_file

        f = out / "model.safetensors"
        state = load_file(f)
        save_file({k.removeprefix("model."): v for k, v in state.items()}, f, {"format": "pt"})
        assert not any(k.startswith("model.") for k in json.loads(_header(f)))
    return out


def _header(f: Path) -> str:
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return fh.read(n).decode()
