"""The job's [ce_collm] section: CE-CoLLM early exit at the edge (cecollm.py runs it).

    [partition]
    strategy = "ce-collm"
    [ce_collm]
    threshold = 0.8      # exit at the edge when the exit head's max softmax prob >= this
    split = "auto"       # edge units [0, split), cloud [split, N); "auto": the planner's
    standalone = false   # true: edge-standalone mode, the exit head answers every token
    exit_rate = 0.5      # the exit rate the planner assumes (split = "auto", prediction)

Parsing is here (job.py calls `parse`), the checks that need the world and the model are
in `check_context` (jobcfg.Job.check_context calls it).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import bounds
from .fields import JobError, Section

STRATEGY = "ce-collm"
MAX_THRESHOLD = 2.0


@dataclass(frozen=True)
class CeCollmCfg:
    threshold: float = 0.8
    """A token is emitted at the edge when the exit head's max softmax probability is >=
    this. 0: always (never the cloud); any value above 1: never (the max probability is
    at most 1.0, and can round to exactly 1.0 in float32, so 1.0 itself may exit)."""
    split: int | None = None
    """Edge units [0, split) (unit 0 = embedding), cloud [split, N); None ("auto"): the
    split the planner predicts fastest at `exit_rate` (planner/cecollm.py)."""
    standalone: bool = False
    """Edge-standalone mode: every token from the exit head, the cloud never called."""
    exit_rate: float = 0.5
    """The fraction of tokens the planner assumes exit at the edge (split choice and the
    predicted latency); the run measures the real one."""
    given: bool = False
    """The job file had a [ce_collm] section."""


def parse(sec: Section, strategy: str, pipelined: bool, batch_size: int) -> CeCollmCfg:
    given = bool(sec.data)
    threshold = sec.get("threshold", float, CeCollmCfg.threshold)
    raw_split = sec.get("split", (int, str), "auto")
    standalone = sec.get("standalone", bool, False)
    exit_rate = sec.get("exit_rate", float, CeCollmCfg.exit_rate)
    sec.finish()
    bounds.float_in(
        threshold, 0.0, MAX_THRESHOLD, "ce_collm.threshold", "0 always exits, above 1 never"
    )
    bounds.float_in(exit_rate, 0.0, 1.0, "ce_collm.exit_rate", "a fraction of tokens")
    if isinstance(raw_split, str):
        if raw_split != "auto":
            raise JobError(
                f'ce_collm.split: an integer unit (edge units [0, split)) or "auto", got '
                f"{raw_split!r}"
            )
        split = None
    else:
        split = raw_split
        if split < 1:
            raise JobError(
                f"ce_collm.split = {split}: the edge holds units [0, split), so split must be "
                '>= 1 (unit 0 is the embedding); or use "auto"'
            )
    if given and strategy != STRATEGY:
        raise JobError(
            f"[ce_collm] is only read with partition.strategy = '{STRATEGY}', not "
            f"{strategy!r}; remove the section or set the strategy"
        )
    if strategy == STRATEGY:
        if pipelined:
            raise JobError(
                "partition.strategy = 'ce-collm' is sequential (one token decides at a time); "
                "set pipeline.mode = 'sequential'"
            )
        if batch_size != 1:
            raise JobError(
                f"workload.batch_size = {batch_size}: ce-collm decides per token whether to "
                "call the cloud, so it runs one sequence at a time; set batch_size = 1"
            )
    return CeCollmCfg(threshold, split, standalone, exit_rate, given)


def check_context(job, world_size: int, spec) -> None:
    """Checks that need the world size and the model (units N = layers + 2)."""
    if job.partition.strategy != STRATEGY:
        return
    cfg, n = job.ce_collm, spec.n_units
    if world_size < 2:
        raise JobError(
            "partition.strategy = 'ce-collm' needs 2 ranks or more (the edge, rank 0, and the "
            "cloud); start more ranks (mpiexec -n 2)"
        )
    if job.cluster.cloud is None and not job.cluster.testbed:
        raise JobError(
            "partition.strategy = 'ce-collm' needs cluster.cloud (the rank of the cloud "
            "server) or a cluster.testbed that names one"
        )
    if job.transport.wire == "auto":
        raise JobError(
            "transport.wire = 'auto' chooses a codec per link of an EdgeShard plan; ce-collm "
            "uploads over one link: name its codec (exact, bf16, fp16 or int8)"
        )
    if cfg.split is not None and cfg.split > n - 1:
        raise JobError(
            f"ce_collm.split = {cfg.split}: the cloud must hold at least the head (unit "
            f"{n - 1}); use a split from 1 to {n - 1} for this model ({n} units)"
        )
