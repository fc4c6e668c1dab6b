"""A stage: the units [start, end) of a Llama model, built from real transformers modules.

A stage holds the token embedding if it owns unit 0, its decoder layers (each keeps its
global layer index, which the KV cache is keyed by), and the final norm + lm_head if it owns
the last unit. It reproduces the unsplit model bitwise: the same modules run on the same
inputs with the same StaticCache masking.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, StaticCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .presets import ModelSpec
from .weights import DTYPES


def hf_config(spec: ModelSpec) -> LlamaConfig:
    cfg = LlamaConfig(**spec.hf_config_dict())
    # SDPA is the fastest exact attention on CPU and the default of from_pretrained.
    cfg._attn_implementation = "sdpa"
    return cfg


class Stage(nn.Module):
    """Units [start, end) of the model. forward(x) takes token ids [B, S] when it owns the
    embedding, else hidden states [B, S, H]; returns hidden states [B, S, H], or the next
    token's logits [B, V] when it owns the head."""

    def __init__(
        self,
        spec: ModelSpec,
        start: int,
        end: int,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        if not 0 <= start < end <= spec.n_units:
            raise ValueError(f"bad unit range [{start}, {end}) for {spec.n_units} units")
        self.spec, self.start, self.end = spec, start, end
        self.config = hf_config(spec)
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        # Decoder layer l is unit l + 1.
        self.layer_ids = list(range(max(start, 1) - 1, min(end, spec.n_units - 1) - 1))
        with torch.device("meta"):
            self.embed_tokens = (
                nn.Embedding(spec.vocab_size, spec.hidden_size) if start == 0 else None
            )
            self.layers = nn.ModuleList(
                LlamaDecoderLayer(self.config, layer_idx=i) for i in self.layer_ids
            )
            has_head = end == spec.n_units
            self.norm = LlamaRMSNorm(spec.hidden_size, spec.rms_norm_eps) if has_head else None
            self.lm_head = (
                nn.Linear(spec.hidden_size, spec.vocab_size, bias=False) if has_head else None
            )
        # The rotary table is computed, not loaded: it must not be built on meta.
        self.rotary = LlamaRotaryEmbedding(self.config).to(self.device) if self.layer_ids else None
        self._aux: dict[tuple, tuple] = {}

    @property
    def has_embed(self) -> bool:
        return self.embed_tokens is not None

    @property
    def has_head(self) -> bool:
        return self.lm_head is not None

    def _local_name(self, hf_name: str) -> str:
        if hf_name.startswith("model.layers."):
            rest = hf_name[len("model.layers.") :]
            idx, tail = rest.split(".", 1)
            return f"layers.{int(idx) - self.layer_ids[0]}.{tail}"
        return hf_name.removeprefix("model.")

    def load(self, source) -> None:
        """Read exactly this stage's tensors from a weight source."""
        state = {}
        for unit in range(self.start, self.end):
            for name, tensor in source.unit_state(unit).items():
                state[self._local_name(name)] = tensor.to(self.device, self.dtype)
        self.load_state_dict(state, strict=True, assign=True)
        self.eval()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def new_cache(self, batch: int, context: int) -> StaticCache | None:
        """KV cache for this stage's layers, allocated now: batch x context tokens."""
        if not self.layer_ids:
            return None
        cache = StaticCache(config=self.config, max_cache_len=context)
        kvh, hd = self.spec.num_kv_heads, self.spec.head_size
        shape_probe = torch.empty(batch, kvh, 0, hd, dtype=self.dtype, device=self.device)
        for i in self.layer_ids:
            # Only owned layers get storage; the others stay unallocated placeholders.
            cache.layers[i].lazy_initialization(shape_probe, shape_probe)
        return cache

    @staticmethod
    def rewind(cache: StaticCache, length: int) -> None:
        """Set the cache's length back (the stored keys beyond it are then ignored): lets a
        profiler time the same decode step again."""
        for layer in cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)

    @staticmethod
    def cache_bytes(cache: StaticCache | None) -> int:
        if cache is None:
            return 0
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2
            for layer in cache.layers
            if layer.is_initialized
        )

    def _mask_and_rotary(
        self, h: torch.Tensor, cache, position_ids: torch.Tensor, start: int | None
    ):
        """The attention mask and rotary cos/sin for these positions. With a static cache
        and no padding both depend only on (batch, length, first position), so they are
        built once per step and reused: the same tensors, hence the same results."""
        key = (h.shape[0], h.shape[1], start)
        if start is not None and key in self._aux:
            return self._aux[key]
        # Size the mask against this stage's own first layer: the cache layers of other
        # stages are empty here, and the default (layer 0) would read as length 0.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=self.layer_ids[0],
        )
        out = (mask, self.rotary(h, position_ids=position_ids))
        if start is not None:
            self._aux[key] = out
        return out

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        cache: StaticCache | None,
        position_ids: torch.Tensor,
        start: int | None = None,
    ) -> torch.Tensor:
        """`start`: the first position, when every row of the batch starts there and the
        cache is static (as in the runtime); it enables reuse of masks and rotary tables."""
        h = self.embed_tokens(x) if self.has_embed else x  # h: [B, S, H]
        if self.layer_ids:
            mask, pos_emb = self._mask_and_rotary(h, cache, position_ids, start)
            for layer in self.layers:
                h = layer(
                    h,
                    attention_mask=mask,
                    position_embeddings=pos_emb,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
        if self.has_head:
            return self.lm_head(self.norm(h[:, -1:]))[:, -1]  # logits: [B, V]
        return h


def first_position(prompt_tokens: int, step: int) -> int:
    return 0 if step == 0 else prompt_tokens + step - 1


def position_ids(batch: int, prompt_tokens: int, step: int) -> torch.Tensor:
    """Positions of the tokens fed at `step` (0 = the prompt, k = the k-th generated token)."""
    if step == 0:
        return torch.arange(prompt_tokens).unsqueeze(0).expand(batch, -1)  # [B, P]
    return torch.full((batch, 1), prompt_tokens + step - 1, dtype=torch.long)  # [B, 1]


def reference_model(spec: ModelSpec, source, dtype: str = "float32"):
    """The unsplit transformers LlamaForCausalLM with the same weights (for tests and the
    overhead benchmark)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(spec))
    state = {}
    for unit in range(spec.n_units):
        state.update(source.unit_state(unit))
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers (rotary inv_freq) were created on meta; rebuild them for real.
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)
    return model.eval()
