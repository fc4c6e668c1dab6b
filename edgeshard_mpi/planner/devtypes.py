"""Identical devices counted, not enumerated (as PipeEdge's scheduler does).

Devices of one type have the same unit times, the same memory budget, and the same links
to every other type (and among themselves): any two of them are interchangeable in a plan,
so the solvers work on types with a count each. The source is always a type of its own (it
holds unit 0 and the token returns to it). If the links do not split by type (per-pair
jitter, say), every device is its own type: the solver is the same, only larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import Problem


@dataclass(frozen=True)
class Types:
    members: tuple[tuple[int, ...], ...]
    """Per type, the devices (Problem indices) it stands for; members[src][0] is the source."""
    src: int
    """The source's type."""

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(m) for m in self.members])

    @property
    def reps(self) -> list[int]:
        return [m[0] for m in self.members]

    @property
    def collapsed(self) -> bool:
        return any(len(m) > 1 for m in self.members)


def device_types(prob: Problem, devices: list[int], collapse: bool = True) -> Types:
    """Group `devices` (the source among them) into types."""
    src = prob.source
    others = [d for d in devices if d != src]
    groups: dict[tuple, list[int]] = {}
    if collapse:
        budget = prob.profile.memory_budget
        for d in others:
            key = (float(budget[d]), prob.compute[d].tobytes())
            groups.setdefault(key, []).append(d)
        members = [(src,), *(tuple(g) for g in groups.values())]
        if len(members) < len(devices) and _links_split(prob, members):
            return Types(tuple(members), 0)
    return Types(((src,), *((d,) for d in others)), 0)


def _links_split(prob: Problem, members) -> bool:
    """Every pair of types (a type with itself included) has one latency and one bandwidth."""
    lat, bw = prob.profile.latency_s, prob.profile.bandwidth
    for a in members:
        for b in members:
            ia, ib = np.asarray(a), np.asarray(b)
            la, ba = lat[np.ix_(ia, ib)], bw[np.ix_(ia, ib)]
            off = ~np.equal.outer(ia, ib)
            if off.any() and not (np.all(la[off] == la[off][0]) and np.all(ba[off] == ba[off][0])):
                return False
    return True
