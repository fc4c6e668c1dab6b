"""A plan: which device (rank) runs which contiguous range of planning units, in chain order."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """Units [start, end) on `rank`."""

    rank: int
    start: int
    end: int

    @property
    def units(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Stages in the order a token walks them; stage 0 holds unit 0 on the source rank."""

    stages: tuple[Stage, ...]
    strategy: str = "explicit"
    """How the plan was made (explicit, even, edgeshard, edge-solo, ...)."""
    objective: str = "latency"
    """What it was optimised for: latency (sequential) or throughput (pipelined)."""
    info: dict = field(default_factory=dict, compare=False)
    """Extra facts from the solver (e.g. algorithm name, solve time)."""

    def __post_init__(self):
        if not self.stages:
            raise ValueError("a plan needs at least one stage")
        pos = 0
        for st in self.stages:
            if st.start != pos or st.end <= st.start:
                raise ValueError(f"stages must be contiguous and non-empty: {self.stages}")
            pos = st.end

    @property
    def n_units(self) -> int:
        return self.stages[-1].end

    @property
    def ranks(self) -> tuple[int, ...]:
        """Ranks used, in chain order of first appearance."""
        return tuple(dict.fromkeys(st.rank for st in self.stages))

    @property
    def source(self) -> int:
        return self.stages[0].rank

    def stages_of(self, rank: int) -> list[int]:
        return [i for i, st in enumerate(self.stages) if st.rank == rank]

    def describe(self) -> str:
        return " -> ".join(f"r{st.rank}[{st.start},{st.end})" for st in self.stages)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "objective": self.objective,
            "stages": [[st.rank, st.start, st.end] for st in self.stages],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(
            tuple(Stage(*map(int, s)) for s in d["stages"]),
            d.get("strategy", "explicit"),
            d.get("objective", "latency"),
            d.get("info", {}),
        )

    @classmethod
    def from_assignment(cls, ranks_per_unit, **kw) -> Plan:
        """[rank of unit 0, rank of unit 1, ...] -> Plan (consecutive equal ranks merge)."""
        stages, start = [], 0
        for u in range(1, len(ranks_per_unit) + 1):
            if u == len(ranks_per_unit) or ranks_per_unit[u] != ranks_per_unit[start]:
                stages.append(Stage(int(ranks_per_unit[start]), start, u))
                start = u
        return cls(tuple(stages), **kw)


def even_plan(
    n_units: int,
    ranks: tuple[int, ...] | list[int],
    strategy: str = "even",
    objective: str = "latency",
) -> Plan:
    """Decoder layers split as evenly as possible over `ranks` (earlier ranks take the
    remainder); the embedding joins the first stage, the head the last."""
    layers = n_units - 2
    k = len(ranks)
    if not 1 <= k <= max(layers, 1):
        raise ValueError(f"cannot split {layers} layers over {k} ranks")
    sizes = [layers // k + (1 if i < layers % k else 0) for i in range(k)]
    stages, pos = [], 0
    for i, (rank, size) in enumerate(zip(ranks, sizes, strict=True)):
        start = 0 if i == 0 else pos + 1
        pos += size
        end = n_units if i == k - 1 else pos + 1
        stages.append(Stage(int(rank), start, end))
    return Plan(tuple(stages), strategy, objective)
