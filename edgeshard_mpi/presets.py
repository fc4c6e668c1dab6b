"""Model shapes: built-in Llama presets and Hugging Face `config.json` files of any family.

Pure (no torch): the planner sizes memory and activations from a ModelSpec without ever
building the model, so offline planning works for 70B on a laptop.

Planning units: unit 0 is the token embedding, units 1..L are the decoder layers, unit L+1
is the final RMSNorm + lm_head. N = L + 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only model (what the planner needs; the stage itself is built
    from the checkpoint's own config, see model.py)."""

    name: str
    """Preset name or the model directory."""
    hidden_size: int
    num_layers: int
    """Decoder layers (L); the model has L + 2 planning units."""
    num_heads: int
    num_kv_heads: int
    """Key/value heads (grouped-query attention when < num_heads, e.g. Llama 2 70B)."""
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    head_dim: int = 0
    """0 means hidden_size // num_heads."""
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "llama"
    """The transformers family (families.py); presets are Llama."""
    unit_param_counts: tuple[int, ...] = ()
    """Per planning unit, the parameters read from a checkpoint's tensors (every expert of a
    mixture-of-experts layer; a tied head counts the table again). Empty: from the shapes."""
    layer_kv_windows: tuple[int, ...] = ()
    """Per decoder layer: 0 = KV cache over the whole context, w > 0 = at most w tokens
    (sliding-window attention). Empty: all full."""

    @property
    def n_units(self) -> int:
        return self.num_layers + 2

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def unit_params(self, unit: int) -> int:
        """Parameters a rank must hold to compute `unit` (tied embeddings are held twice
        when the embedding and the head live on different ranks, so count them at both)."""
        if self.unit_param_counts:
            return self.unit_param_counts[unit]
        h, v = self.hidden_size, self.vocab_size
        if unit == 0:
            return v * h
        if unit == self.n_units - 1:
            return h + v * h
        q = self.num_heads * self.head_size
        kv = self.num_kv_heads * self.head_size
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv + h
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        return attn + mlp + 2 * h

    def unit_weight_bytes(self, unit: int, dtype: str = "float32") -> int:
        return self.unit_params(unit) * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str = "float32") -> int:
        """KV cache bytes one decoder layer keeps for one token of one sequence."""
        return 2 * self.num_kv_heads * self.head_size * DTYPE_BYTES[dtype]

    def unit_kv_bytes(self, unit: int, batch: int, context: int, dtype: str = "float32") -> int:
        """The paper's N_a * B_b * (I_m + G_m) for one unit (zero for embedding and head)."""
        if unit == 0 or unit == self.n_units - 1:
            return 0
        window = self.layer_kv_windows[unit - 1] if self.layer_kv_windows else 0
        held = min(context, window) if window > 0 else context
        return self.kv_bytes_per_token(dtype) * batch * held

    def unit_kind(self, unit: int) -> str:
        """Units of the same kind cost the same to run (profile.py smooths within a kind)."""
        if unit == 0:
            return "embed"
        if unit == self.n_units - 1:
            return "head"
        window = self.layer_kv_windows[unit - 1] if self.layer_kv_windows else 0
        return f"layer:{self.unit_params(unit)}:{'sliding' if window else 'full'}"

    def activation_bytes(self, batch: int, tokens: int, dtype: str = "float32") -> int:
        """Bytes of the hidden state that crosses a cut between two units."""
        return batch * tokens * self.hidden_size * DTYPE_BYTES[dtype]

    def total_params(self) -> int:
        total = sum(self.unit_params(u) for u in range(self.n_units))
        if self.tie_word_embeddings and self.unit_param_counts:
            total -= self.unit_params(0)
        elif self.tie_word_embeddings:
            total -= self.vocab_size * self.hidden_size
        return total

    def hf_config_dict(self) -> dict:
        """A `config.json`-style dict for transformers' LlamaConfig."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        for key in ("unit_param_counts", "layer_kv_windows"):
            d[key] = tuple(d.get(key) or ())
        return cls(**d)


def _llama2(name: str, hidden: int, layers: int, heads: int, kv: int, inter: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=inter,
        vocab_size=32000,
        max_position_embeddings=4096,
    )


PRESETS: dict[str, ModelSpec] = {
    # The real Llama 2 shapes (Touvron et al. 2023): used for offline planning and profiling.
    "llama2-7b": _llama2("llama2-7b", 4096, 32, 32, 32, 11008),
    "llama2-13b": _llama2("llama2-13b", 5120, 40, 40, 40, 13824),
    "llama2-70b": _llama2("llama2-70b", 8192, 80, 64, 8, 28672),
    # Small Llama-shaped models with synthetic weights, for tests and the demo.
    "tiny": ModelSpec("tiny", 64, 4, 4, 2, 176, 512, max_position_embeddings=512),
    "small": ModelSpec("small", 256, 8, 8, 4, 688, 32000, max_position_embeddings=1024),
    "medium": ModelSpec("medium", 1024, 8, 16, 16, 2752, 32000, max_position_embeddings=1024),
    # Llama 2 shapes scaled to one 2-core host for the emulated testbed (issue 5 benchmarks):
    # layer counts and GQA kept, widths divided so that 7b/13b/70b keep their relative sizes.
    "mini-7b": _llama2("mini-7b", 512, 32, 8, 8, 1376),
    "mini-13b": _llama2("mini-13b", 640, 40, 10, 10, 1728),
    "mini-70b": _llama2("mini-70b", 1024, 80, 16, 2, 3584),
}


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers only (8-byte length + JSON), so a
    planner sizes a 70B checkpoint without reading its weights or importing torch."""
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    shapes = {}
    for fname in files:
        f = path / fname
        if not f.is_file():
            return {}
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


def _unit_params_from_checkpoint(path: Path, cfg: dict, n_units: int) -> tuple[int, ...]:
    from .families import unit_of

    shapes = _safetensors_shapes(path)
    if not shapes:
        return ()
    counts = [0] * n_units
    for name, shape in shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        counts[unit_of(name, n_units)] += numel
    if not any(n.endswith("lm_head.weight") for n in shapes):  # tied: the head reads the table
        counts[-1] += counts[0]
    return tuple(counts)


def from_hf_config(path: Path) -> ModelSpec:
    """Read a Hugging Face decoder-only `config.json` (or the directory holding it) of any
    family in families.py; per-unit sizes come from the checkpoint's safetensors headers."""
    from .families import family

    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object of model settings")
    family(cfg, str(cfg_file))  # refuses unknown families and unsupported fields
    try:
        return _spec_from_config(cfg, path, cfg_file)
    except KeyError as e:
        raise ValueError(
            f"{cfg_file}: missing {e.args[0]!r}; this config.json is incomplete (copy the "
            "model's own config.json)"
        ) from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{cfg_file}: a value has the wrong type or is zero ({e})") from None


def _spec_from_config(cfg: dict, path: Path, cfg_file: Path) -> ModelSpec:
    from .families import layer_kv_windows

    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    eos = cfg.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0]
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31:
            raise ValueError(f"{key} = {v!r} must be a positive integer")
    n_units = cfg["num_hidden_layers"] + 2
    return ModelSpec(
        name=str(path),
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        intermediate_size=cfg.get("intermediate_size") or 0,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim") or hidden // heads,
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        bos_token_id=cfg.get("bos_token_id", 1) if cfg.get("bos_token_id") is not None else 1,
        eos_token_id=eos if eos is not None else 2,
        model_type=cfg.get("model_type", "llama"),
        unit_param_counts=_unit_params_from_checkpoint(cfg_file.parent, cfg, n_units),
        layer_kv_windows=layer_kv_windows(cfg),
    )


def resolve(source: str) -> ModelSpec:
    """A preset name or a model directory -> ModelSpec."""
    if source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return replace(from_hf_config(path), name=str(path))
    raise ValueError(
        f"model {source!r} is neither a preset ({', '.join(PRESETS)}) nor a directory "
        "holding a Hugging Face config.json"
    )
