"""A stage: the units [start, end) of a decoder-only model, built from the family's own
transformers modules (any family in families.py).

A stage holds the token embedding if it owns unit 0, its decoder layers (each keeps its
global layer index, which the KV cache is keyed by), and the final norm + lm_head if it owns
the last unit. The modules are deep copies of the parts it owns of the family's XForCausalLM
built on meta (hf.py); only they are materialised. `forward` does what the family's
top-level XModel.forward does around the layers (masks per layer type, rotary tables,
embedding and logit scalings from families.py), so the split model equals the unsplit one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import StaticCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from . import hf
from .families import FAMILIES
from .kernels import native_decode
from .presets import ModelSpec
from .weights import DTYPES

MASKS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class Stage(nn.Module):
    """Units [start, end) of the model. forward(x) takes token ids [B, S] when it owns the
    embedding, else hidden states [B, S, H]; returns hidden states [B, S, H], or the next
    token's logits [B, V] when it owns the head ([B, S, V] with `all_logits` set)."""

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
        full = hf.skeleton(spec)  # the family's XForCausalLM on meta, shared, never filled
        self.config = full.config
        self.family = FAMILIES[self.config.model_type]
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        # Decoder layer l is unit l + 1.
        self.layer_ids = list(range(max(start, 1) - 1, min(end, spec.n_units - 1) - 1))
        base, has_head = full.base_model, end == spec.n_units
        own = copy.deepcopy  # meta modules: copying costs no memory
        self.embed_tokens = own(full.get_input_embeddings()) if start == 0 else None
        self.layers = nn.ModuleList(own(base.layers[i]) for i in self.layer_ids)
        self.norm = own(base.norm) if has_head else None
        self.lm_head = own(full.get_output_embeddings()) if has_head else None
        self.fast_kernels = False  # set by kernels.apply_kernels("fast")
        self.rotary = own(base.rotary_emb) if self.layer_ids else None
        self._head_dim = base.layers[0].self_attn.head_dim
        # Each layer's attention kind, as the family's forward picks its mask.
        types = self.family_layer_types()
        self.layer_types = [types[i] for i in self.layer_ids]
        # The model's parameter-name prefixes of the owned parts -> this stage's.
        where = {id(m): n for n, m in full.named_modules()}
        self._names = [
            (where[id(base.layers[i])], f"layers.{k}") for k, i in enumerate(self.layer_ids)
        ]
        if self.embed_tokens is not None:
            self._names.append((where[id(full.get_input_embeddings())], "embed_tokens"))
        if has_head:
            self._names += [
                (where[id(base.norm)], "norm"),
                (where[id(full.get_output_embeddings())], "lm_head"),
            ]
        # Buffers no checkpoint holds (rotary tables, embedding scales): real, computed now.
        hf.materialize_buffers(full, self, self.device)
        self._aux: dict[tuple, tuple] = {}
        self._mask_tmpl: dict[tuple, torch.Tensor | bool] = {}
        self._rot_table: dict[tuple, dict | bool] = {}
        self._rope_static = self.rotary is not None and not any(
            "dynamic" in t or t == "longrope" for t in _rope_types(self.rotary)
        )
        self.fast_decode_aux = True
        """Decode steps build masks and rotary cheaply (`_decode_aux`); False: always as
        transformers does (tests compare the two bitwise)."""
        self.all_logits = False
        """The head returns every position's logits, not only the last (perplexity)."""

    def family_layer_types(self) -> list[str]:
        from .families import layer_types

        return layer_types(self.config.to_dict())

    @property
    def has_embed(self) -> bool:
        return self.embed_tokens is not None

    @property
    def has_head(self) -> bool:
        return self.lm_head is not None

    def _local_name(self, name: str) -> str:
        """The model's parameter name (`model.layers.3.mlp.up_proj.weight`) -> this stage's."""
        for prefix, local in self._names:
            if name.startswith(prefix + "."):
                return local + name[len(prefix) :]
        raise KeyError(f"{name!r} is not a parameter of units [{self.start}, {self.end})")

    def load(self, source) -> None:
        """Read exactly this stage's tensors from a weight source."""
        state = {}
        for unit in range(self.start, self.end):
            for name, tensor in source.unit_state(unit).items():
                state[self._local_name(name)] = tensor.to(self.device, self.dtype)
        self.load_state_dict(state, strict=False, assign=True)
        left = [n for n, p in self.named_parameters() if p.is_meta]
        if left:
            raise RuntimeError(f"units [{self.start}, {self.end}): no weights for {left}")
        self.eval()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def new_cache(self, batch: int, context: int) -> StaticCache | None:
        """KV cache for this stage's layers, allocated now: batch x context tokens."""
        if not self.layer_ids:
            return None
        cache = StaticCache(config=self.config, max_cache_len=context)
        cfg = self.config
        kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        hd = self._head_dim
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
                if hasattr(layer, "cumulative_length_int"):  # sliding-window layers
                    layer.cumulative_length_int = length

    @staticmethod
    def cache_bytes(cache: StaticCache | None) -> int:
        if cache is None:
            return 0
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2
            for layer in cache.layers
            if layer.is_initialized
        )

    def _hf_mask(self, kind: str, h, cache, position_ids):
        # Size the mask against this stage's own first layer of that kind: the cache layers
        # of other stages are empty here, and the default (layer 0) would read as length 0.
        first = self.layer_ids[self.layer_types.index(kind)]
        return MASKS[kind](
            config=self.config,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=first,
        )

    def _hf_rotary(self, h, position_ids) -> dict:
        if self.family.rotary_per_type:
            return {k: self.rotary(h, position_ids, k) for k in dict.fromkeys(self.layer_types)}
        return dict.fromkeys(self.layer_types, self.rotary(h, position_ids=position_ids))

    def _mask_and_rotary(
        self, h: torch.Tensor, cache, position_ids: torch.Tensor, start: int | None
    ):
        """Per attention kind, the mask and the rotary cos/sin for these positions. With a
        static cache and no padding both depend only on (batch, length, first position), so
        they are built once per step and reused: the same tensors, hence the same results.
        A decode step (one position) takes the cheap path of `_decode_aux` where it is exact."""
        if start is not None and h.shape[1] == 1 and self.fast_decode_aux:
            return self._decode_aux(h, cache, position_ids, start)
        key = (h.shape[0], h.shape[1], start)
        if start is not None and key in self._aux:
            return self._aux[key]
        masks = {
            k: self._hf_mask(k, h, cache, position_ids) for k in dict.fromkeys(self.layer_types)
        }
        out = (masks, self._hf_rotary(h, position_ids))
        if start is not None:
            self._aux[key] = out
        return out

    def _decode_aux(self, h, cache, position_ids, start: int):
        """One decode position `start`, every row there, static cache: the masks and the
        rotary cos/sin without transformers' per-step machinery (~0.1 ms per stage and
        token). A full-attention mask is `key index <= start`; the rotary cos/sin are rows
        of a table computed once for every position of the cache. Each is compared once
        with what transformers builds (the first decode step of each shape); a kind whose
        mask or rotary differs, a sliding window's mask, and rope types that change with
        the length (dynamic, longrope) keep transformers' own, so results are the same bits."""
        b = h.shape[0]
        masks = {}
        for kind in dict.fromkeys(self.layer_types):
            tkey = (kind, b, self._cache_len(cache, kind))
            tmpl = self._mask_tmpl.get(tkey)
            if tmpl is None:
                masks[kind] = self._hf_mask(kind, h, cache, position_ids)
                self._mask_tmpl[tkey] = _causal_template(masks[kind], kind, start)
            elif tmpl is False:  # transformers' mask, built once per position (memo)
                mkey = (*tkey, start)
                if mkey not in self._aux:
                    self._aux[mkey] = self._hf_mask(kind, h, cache, position_ids)
                masks[kind] = self._aux[mkey]
            else:
                masks[kind] = tmpl <= start
        n = self._cache_len(cache, None)
        if not self._rope_static or n is None or start >= n:
            return masks, self._hf_rotary(h, position_ids)
        rkey = (h.dtype, n)
        table = self._rot_table.get(rkey)
        if table is None:  # once per cache length: every position, checked against one step
            every = torch.arange(n, device=h.device).unsqueeze(0)
            table = self._hf_rotary(h[:1], every)
            ref = self._hf_rotary(h, position_ids)
            got = _rows(table, start, b)
            same = all(
                torch.equal(got[k][0], ref[k][0]) and torch.equal(got[k][1], ref[k][1]) for k in ref
            )
            table = self._rot_table[rkey] = table if same else False
            if not same:
                return masks, ref
        if table is False:
            return masks, self._hf_rotary(h, position_ids)
        return masks, _rows(table, start, b)

    def _cache_len(self, cache, kind: str | None) -> int | None:
        """Key slots of this stage's first layer (of that kind) in a static cache."""
        if not isinstance(cache, StaticCache):
            return None
        i = self.layer_ids[0 if kind is None else self.layer_types.index(kind)]
        layer = cache.layers[i]
        return layer.keys.shape[-2] if layer.is_initialized else None

    def _scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        fam, cfg = self.family, self.config
        if fam.logit_multiplier:
            logits = logits * getattr(cfg, fam.logit_multiplier)
        if fam.logit_divisor:
            logits = logits / getattr(cfg, fam.logit_divisor)
        cap = getattr(cfg, fam.logit_softcap, None) if fam.logit_softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        if self.fast_kernels:
            with native_decode(x):  # decode at 2+ threads: the products take them
                return self._forward(x, cache, position_ids, start)
        return self._forward(x, cache, position_ids, start)

    def _forward(self, x, cache, position_ids, start):
        if self.has_embed:
            h = self.embed_tokens(x)  # h: [B, S, H]
            if self.family.embed_multiplier:
                h = h * getattr(self.config, self.family.embed_multiplier)
        else:
            h = x
        if self.layer_ids:
            masks, rotary = self._mask_and_rotary(h, cache, position_ids, start)
            for layer, kind in zip(self.layers, self.layer_types, strict=True):
                h = layer(
                    h,
                    attention_mask=masks[kind],
                    position_embeddings=rotary[kind],
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
        if self.has_head:
            if self.all_logits:  # evaluation (evaluate.py): every position's logits [B, S, V]
                return self._scale_logits(self.lm_head(self.norm(h)))
            logits = self.lm_head(self.norm(h[:, -1:]))[:, -1]  # logits: [B, V]
            return self._scale_logits(logits)
        return h


def _rope_types(rotary: nn.Module) -> list[str]:
    t = getattr(rotary, "rope_type", "default")
    return [str(v) for v in t.values()] if isinstance(t, dict) else [str(t)]


def _causal_template(mask, kind: str, start: int):
    """The key indices [B, 1, 1, L] whose `<= start` is `mask` (transformers' decode mask
    of a full-attention layer at position start), or False if the mask is not that."""
    if kind != "full_attention" or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return False
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return False
    idx = torch.arange(mask.shape[-1], device=mask.device).view(1, 1, 1, -1)
    idx = idx.expand(mask.shape).contiguous()
    return idx if torch.equal(idx <= start, mask) else False


def _rows(table: dict, start: int, b: int) -> dict:
    """Rows `start` of rotary tables [1, n, D] as [b, 1, D] (the shape one step gives)."""
    out, seen = {}, {}
    for kind, (cos, sin) in table.items():
        if id(cos) not in seen:
            seen[id(cos)] = (
                cos[:, start : start + 1].expand(b, 1, -1),
                sin[:, start : start + 1].expand(b, 1, -1),
            )
        out[kind] = seen[id(cos)]
    return out


def first_position(prompt_tokens: int, step: int) -> int:
    return 0 if step == 0 else prompt_tokens + step - 1


def position_ids(batch: int, prompt_tokens: int, step: int) -> torch.Tensor:
    """Positions of the tokens fed at `step` (0 = the prompt, k = the k-th generated token)."""
    if step == 0:
        return torch.arange(prompt_tokens).unsqueeze(0).expand(batch, -1)  # [B, P]
    return torch.full((batch, 1), prompt_tokens + step - 1, dtype=torch.long)  # [B, 1]


def reference_model(spec: ModelSpec, source, dtype: str = "float32"):
    """The unsplit transformers XForCausalLM with the same weights (for tests and the
    overhead benchmark)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf.load_config(spec))
    state = {}
    for unit in range(spec.n_units):
        state.update(source.unit_state(unit))
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    # Buffers (rotary inv_freq, embedding scales) were created on meta; rebuild them for real.
    hf.materialize_buffers(model, model, torch.device("cpu"))
    return model.eval()
