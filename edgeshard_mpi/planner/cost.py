"""The cost model: latency and bottleneck of any plan under a Problem.

latency    = sum of stage compute + every hop (latency + bytes / bandwidth) + the token's
             return to the source: the time one token takes to walk the chain;
bottleneck = the slowest stage or link (the return included): with enough micro-batches in
             flight, one batch leaves the pipeline every `bottleneck` seconds.
Both use the Problem's weighted unit costs (its profiling strategy). The per-phase figures
(prefill, decode) predict what a run measures.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .plan import Plan
from .problem import Problem


@dataclass(frozen=True)
class Evaluation:
    latency_s: float
    """Weighted time of one token through the chain (the latency objective)."""
    bottleneck_s: float
    """Slowest stage or link, weighted (the throughput objective)."""
    stage_s: tuple[float, ...]
    hop_s: tuple[float, ...]
    """Hops after each stage; the last one is the token's return to the source."""
    memory: dict
    """device -> bytes the plan puts on it."""
    over_budget: dict
    """device -> bytes over its budget (empty when the plan fits)."""
    prefill_s: float
    """Prompt of `batch` sequences through the chain, return included."""
    decode_s: float
    """One decode step through the chain."""
    per_token_s: float
    """Predicted sequential ms/token / 1000: (prefill + (G - 1) decode) / G."""
    tokens_per_s: float
    """Predicted sequential throughput: batch / per_token_s."""
    pipeline_tokens_per_s: float
    """Predicted pipelined throughput bound: batch / decode bottleneck."""

    @property
    def feasible(self) -> bool:
        return not self.over_budget and np.isfinite(self.latency_s)

    def to_dict(self) -> dict:
        """Plain JSON types (numpy scalars would not serialize)."""
        out = {
            k: ([float(x) for x in v] if isinstance(v, tuple) else float(v))
            for k, v in self.__dict__.items()
            if k not in ("memory", "over_budget")
        }
        return out | {
            "memory": {str(k): int(v) for k, v in self.memory.items()},
            "over_budget": {str(k): int(v) for k, v in self.over_budget.items()},
            "feasible": bool(self.feasible),
        }


def evaluate(plan: Plan, prob: Problem) -> Evaluation:
    n = prob.n_units
    if plan.n_units != n:
        raise ValueError(f"plan covers {plan.n_units} units, the model has {n}")
    stages = plan.stages
    ret = prob.return_s()

    def chain(unit_cost: np.ndarray, phase: str | None) -> tuple[list[float], list[float]]:
        comp = [float(unit_cost[st.rank, st.start : st.end].sum()) for st in stages]
        comp[0] += prob.source_stage_extra_s(stages[0].end)  # its wake-up past the embedding
        hops = [prob.hop_s(a.end, a.rank, b.rank, phase) for a, b in itertools.pairwise(stages)]
        return comp, [*hops, float(ret[stages[-1].rank])]

    comp, hops = chain(prob.compute, None)
    pre_c, pre_h = chain(prob.prefill, "prefill")
    dec_c, dec_h = chain(prob.decode, "decode")
    memory: dict[int, float] = {}
    for st in stages:
        memory[st.rank] = memory.get(st.rank, 0.0) + float(prob.memory[st.start : st.end].sum())
    budget = prob.profile.memory_budget
    over = {d: int(m - budget[d]) for d, m in memory.items() if m > budget[d]}
    g = prob.profile.new_tokens
    prefill, decode = sum(pre_c) + sum(pre_h), sum(dec_c) + sum(dec_h)
    per_token = (prefill + (g - 1) * decode) / g
    return Evaluation(
        latency_s=sum(comp) + sum(hops),
        bottleneck_s=max(comp + hops),
        stage_s=tuple(comp),
        hop_s=tuple(hops),
        memory=memory,
        over_budget=over,
        prefill_s=prefill,
        decode_s=decode,
        per_token_s=per_token,
        tokens_per_s=prob.batch / per_token if per_token > 0 else float("inf"),
        pipeline_tokens_per_s=prob.batch / max(dec_c + dec_h),
    )
