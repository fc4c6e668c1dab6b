"""Why no plan fits, with the numbers; and whether a given plan fits. Below the solvers
(they import it) and the strategies (baselines.py), so neither imports the other."""

from __future__ import annotations

import numpy as np

from .cost import evaluate
from .plan import Plan
from .problem import Infeasible, Problem


def _b(n: float) -> str:
    """GB for real models; MB or kB for the tiny ones (450 kB is not "0.0 GB")."""
    for unit, div in (("GB", 1e9), ("MB", 1e6)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def explain_infeasible(prob: Problem, devices: list[int], strategy: str) -> str:
    """Why no plan over `devices` fits, with the numbers."""
    p = prob.profile
    names = [p.names[d] for d in devices]
    need = float(prob.memory.sum())
    kv = float((prob.memory - p.weight_bytes).sum())
    have = float(p.memory_budget[devices].sum())
    who = (
        names[0]
        if len(names) == 1
        else f"{len(names)} devices ({', '.join(names[:4])}" + (", ...)" if len(names) > 4 else ")")
    )
    if need > have:
        return (
            f"{strategy}: infeasible: the model needs {_b(need)} (weights "
            f"{_b(need - kv)} + KV cache {_b(kv)} for batch {prob.batch}"
            f"{f' x {prob.slots} micro-batches' if prob.slots > 1 else ''}) but {who} "
            f"hold {_b(have)}"
        )
    biggest = int(np.argmax(prob.memory))
    if prob.memory[biggest] > p.memory_budget[devices].max():
        return (
            f"{strategy}: infeasible: unit {biggest} alone needs "
            f"{_b(prob.memory[biggest])}, more than any of {who} holds (at most "
            f"{_b(p.memory_budget[devices].max())})"
        )
    for u in range(prob.n_units):
        if not np.isfinite(prob.compute[devices, u]).any():
            return f"{strategy}: infeasible: no device of {who} can run unit {u}"
    if prob.memory[0] > p.memory_budget[prob.source]:
        return (
            f"{strategy}: infeasible: the source {p.names[prob.source]} cannot hold unit 0 "
            f"(the embedding, {_b(prob.memory[0])}; it has "
            f"{_b(p.memory_budget[prob.source])})"
        )
    return (
        f"{strategy}: infeasible: {who} hold {_b(have)} for the model's "
        f"{_b(need)}, but no split into whole layers fits their budgets"
    )


def check_fits(plan: Plan, prob: Problem) -> Plan:
    """The plan, or Infeasible if a device cannot run its units or hold them."""
    ev = evaluate(plan, prob)
    if not np.isfinite(ev.latency_s):
        bad = [
            st
            for st in plan.stages
            if not np.isfinite(prob.compute[st.rank, st.start : st.end]).all()
        ]
        raise Infeasible(
            f"{plan.strategy}: infeasible: {prob.profile.names[bad[0].rank]} "
            f"cannot run units [{bad[0].start}, {bad[0].end})"
        )
    if ev.over_budget:
        d, over = next(iter(ev.over_budget.items()))
        budget = prob.profile.memory_budget[d]
        raise Infeasible(
            f"{plan.strategy}: infeasible (out of memory): {prob.profile.names[d]} would hold "
            f"{_b(budget + over)} but has {_b(budget)} "
            f"({plan.describe()})"
        )
    return plan
