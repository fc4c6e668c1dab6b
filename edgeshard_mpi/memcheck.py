"""What a rank really needs in memory, checked against its budget before anything loads.

Weights and KV caches are not all: a prefill's activations (attention scores grow with
batch x prompt x context), the receive and send buffers of every micro-batch in flight, and
the head's logits also live at once. A check that forgot them passed a 256 x 256-token batch
under a 2 GiB limit that the kernel then OOM-killed. The runtime's own footprint (Python,
torch, transformers) is measured at start-up and taken off a cgroup limit by the device
description (cluster.describe_devices), so the budget here is what is left for the model.
Pure arithmetic on the model shape: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .presets import DTYPE_BYTES, ModelSpec

HEADROOM = 1.15
"""Transient tensors are estimated; the allocator's slack and temporaries come on top."""
FP32 = 4


@dataclass(frozen=True)
class Need:
    weights: int
    kv_cache: int
    buffers: int
    """Receive buffers (one per stage x micro-batch in flight) and outputs not yet sent."""
    activations: int
    """The peak of one prefill through one of the rank's units, with headroom."""
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.activations + self.logits

    def describe(self) -> str:
        unit, div = _unit(self.total)
        return (
            f"weights {self.weights / div:.2f} + KV cache {self.kv_cache / div:.2f} + buffers "
            f"{self.buffers / div:.2f} + activations {self.activations / div:.2f} + logits "
            f"{self.logits / div:.2f} {unit}"
        )


def _unit(n: float) -> tuple[str, float]:
    """GB for real models, MB or kB for the tiny ones (a demo's 450 kB budget is not 0.00 GB)."""
    for unit, div in (("GB", 1e9), ("MB", 1e6)):
        if n >= div:
            return unit, div
    return "kB", 1e3


def fmt_bytes(n: float) -> str:
    unit, div = _unit(n)
    return f"{n / div:.2f} {unit}"


def reserve(
    spec: ModelSpec, dtype: str, batch: int, prompt_tokens: int, context: int, slots: int
) -> tuple[int, int]:
    """What the planner must hold back so that its plans pass `check`: (bytes every device
    needs beside its units' weights and KV cache, bytes the head's device needs on top).
    An upper bound of rank_need's extras for a rank holding one stage (the planner gives a
    device at most one): the receive and output buffers of a hidden-state stage, one decoder
    layer's prefill peak, and the logits."""
    db = DTYPE_BYTES[dtype]
    flat = batch * prompt_tokens * spec.hidden_size * db
    act = max(layer_activation_bytes(spec, batch, prompt_tokens, context, db), 2 * flat)
    return 2 * slots * flat + int(act * HEADROOM), batch * spec.vocab_size * FP32 * 2


def layer_activation_bytes(spec: ModelSpec, b: int, tokens: int, context: int, db: int) -> int:
    """Tensors alive at once in one decoder layer's forward (prefill of `tokens` tokens with
    `context` positions of cache): hidden-sized copies, q/k/v and the cache repeated for
    grouped heads, one float32 attention-score tensor (the math path), the MLP's three
    intermediate tensors. Conservative: a 256 x 256-token prefill of `small` estimated at
    2.7 GB peaked at 1.75 GB (cgroup max_usage, runtime included)."""
    hd = spec.head_size
    hidden = 4 * b * tokens * spec.hidden_size * db
    qkv = b * tokens * (spec.num_heads + 2 * spec.num_kv_heads) * hd * db
    repeated = 2 * b * spec.num_heads * context * hd * db
    scores = b * spec.num_heads * tokens * context * FP32
    mlp = 3 * b * tokens * spec.intermediate_size * db
    return hidden + qkv + repeated + scores + mlp


def rank_need(
    spec: ModelSpec,
    ranges: list[tuple[int, int, int]],
    dtype: str,
    batch: int,
    prompt_tokens: int,
    context: int,
    slots: int,
) -> Need:
    """`ranges`: (stage index, start unit, end unit) of every stage the rank holds."""
    db = DTYPE_BYTES[dtype]
    last = spec.n_units - 1
    weights = kv = buffers = act = logits = 0
    for stage, start, end in ranges:
        units = range(start, end)
        weights += sum(spec.unit_weight_bytes(u, dtype) for u in units)
        kv += slots * sum(spec.unit_kv_bytes(u, batch, context, dtype) for u in units)
        flat = batch * prompt_tokens * spec.hidden_size * db
        buffers += slots * (8 * batch if stage == 0 else flat) + slots * flat  # recv + out
        if any(0 < u < last for u in units):
            act = max(act, layer_activation_bytes(spec, batch, prompt_tokens, context, db))
        else:
            act = max(act, 2 * flat)
        if end == spec.n_units:
            logits += batch * spec.vocab_size * FP32 * 2  # logits and their argmax pass
    return Need(weights, kv, buffers, int(act * HEADROOM), logits)


def check(
    plan,
    spec: ModelSpec,
    dtype: str,
    devices,
    batch: int,
    prompt_tokens: int,
    context: int,
    slots: int,
) -> str | None:
    """None if every rank's share fits its budget, else the message for the first that
    does not (the numbers, where the budget came from, the fixes)."""
    by_rank: dict[int, list] = {}
    for i, st in enumerate(plan.stages):
        by_rank.setdefault(st.rank, []).append((i, st.start, st.end))
    for rank, ranges in sorted(by_rank.items()):
        need = rank_need(spec, ranges, dtype, batch, prompt_tokens, context, slots)
        dev = devices[rank]
        budget = dev.memory_budget
        if need.total > budget:
            runtime = (
                " after the runtime's own memory measured at start-up"
                if dev.memory_source == "cgroup"
                else ""
            )
            return (
                f"rank {rank} ({dev.name}) would need {fmt_bytes(need.total)} "
                f"({need.describe()}) but its memory budget is {fmt_bytes(budget)} "
                f"({dev.memory_source}{runtime}); give it fewer layers, a smaller batch or "
                "prompt, use more ranks, or set cluster.devices memory if the budget is wrong"
            )
    return None
