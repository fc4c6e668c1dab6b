"""What a job is: the dataclasses of every job-file section, a docstring per field, and the
checks that need the MPI world and the model shape (Job.check_context). Reading the TOML
file into them is job.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .fields import JobError
from .presets import ModelSpec

STRATEGIES_FIXED = ("explicit", "even")
STRATEGIES_PLANNED = (
    "edgeshard",
    "edgeshard-even",
    "edge-solo",
    "cloud-edge-even",
    "cloud-edge-opt",
)


PROFILE_STRATEGIES = ("prefill", "decode", "average", "workload")
ORDERS = ("no-bubbles", "bubbles")


AUTO_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class ModelCfg:
    source: str
    """Preset name (see `edgeshard-mpi presets`) or a Hugging Face model directory (any
    family in families.py)."""
    dtype: str = "float32"
    """float32 (the paper's full precision), bfloat16 or float16."""
    seed: int = 0
    """Seed of synthetic weights (presets); each unit is seeded on its own."""


@dataclass(frozen=True)
class WorkloadCfg:
    dataset: Path | None
    """WikiText-2 raw file (wiki.test.raw format); None uses the built-in prompts."""
    dataset_field: str | None
    """The dataset path as written in the job (before expansion), for messages."""
    fallback: str = "error"
    """When the dataset is missing: 'error' stops the job, 'builtin' uses built-in prompts."""
    tokenizer: str = "auto"
    """auto (model directory's tokenizer, else bytes), bytes, or a SentencePiece .model path."""
    prompt_tokens: int = 32
    new_tokens: int = 96
    prompts: int = 4
    batch_size: int = 1
    seed: int = 0
    """Which prompts are drawn from the dataset."""
    stop_at_eos: bool = False
    """Stop a sequence at EOS; off by default, as benchmarks need a fixed token count."""
    eos_token_id: int | None = None
    """The token that ends a sequence; default: the model's eos_token_id."""

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.new_tokens


@dataclass(frozen=True)
class StageCfg:
    rank: int
    start: int
    end: int


@dataclass(frozen=True)
class PartitionCfg:
    strategy: str = "even"
    """explicit (the `stages` list), even (equal layer counts over `ranks`), or a planned
    strategy: edgeshard, edgeshard-even, edge-solo, cloud-edge-even, cloud-edge-opt."""
    stages: tuple[StageCfg, ...] = ()
    ranks: tuple[int, ...] | None = None
    """Ranks used by 'even' (default: every rank), in chain order, starting with 0."""
    objective: str = "latency"
    """What planned strategies optimise: latency (sequential) or throughput (pipelined)."""
    algorithm: str = "exact"
    """exact (this project's solvers) or paper (the paper's Algorithms 1 and 2)."""

    @property
    def planned(self) -> bool:
        return self.strategy in STRATEGIES_PLANNED


@dataclass(frozen=True)
class ProfileCfg:
    reuse: Path | None = None
    """A profile file to use instead of measuring (edgeshard-mpi profile writes one)."""
    save: str | None = "{output}.profile.json"
    """Where a measured profile is written; {output} is the HDF5 path without .h5."""
    strategy: str = "average"
    """How prefill and decode costs are weighed: prefill, decode, average (the paper's
    choice) or workload (1/G prefill + (G-1)/G decode, what ms/token averages)."""
    warmup: int = 1
    repeats: int = 3
    sample_layers: int = 0
    """Time only this many decoder layers (0 = all of them)."""
    link_repeats: int = 3
    cold_cache: bool = True
    """Flush CPU caches before each timing (a stage's weights are cold in a real run)."""
    batch_sizes: tuple[int, ...] = ()
    """Batch sizes to time units at; default: the micro-batch size, or, when the planner
    chooses it (pipeline.micro_batch_size = "auto"), 1, 2, 4, 8, 16 up to the prompts."""


@dataclass(frozen=True)
class PipelineCfg:
    mode: str = "sequential"
    """sequential (one micro-batch walks the chain at a time) or pipeline (several in
    flight, the paper's pipeline-parallel inference)."""
    order: str = "no-bubbles"
    """no-bubbles (a micro-batch starts its next step as soon as its token is back) or
    bubbles (every step waits for all micro-batches), the paper's Fig. 5."""
    micro_batches: int | None = None
    """Micro-batches in flight; None ("auto"): the planner's choice (pipeline mode)."""
    micro_batch_size: int | None = None
    """Sequences per micro-batch; None ("auto"): the planner's choice. Default: the
    workload's batch_size."""

    @property
    def pipelined(self) -> bool:
        return self.mode == "pipeline"


@dataclass(frozen=True)
class DeviceCfg:
    rank: int
    name: str | None = None
    memory: int | None = None


@dataclass(frozen=True)
class ClusterCfg:
    cloud: int | None = None
    """The rank of the cloud server (for cloud-edge-even / cloud-edge-opt)."""
    devices: tuple[DeviceCfg, ...] = ()
    """Per-rank names and memory budgets that override what ranks detect."""
    testbed: str | None = None
    """An emulated testbed (a shipped name or a file): rank i is its device i."""
    emulation: str = "auto"
    """How the testbed is emulated: os (namespaces, tc, cgroups; ranks started by the
    testbed's launch line), transport (inside the job: delays and sleeps), or auto (os
    when the ranks were started inside the testbed, else transport)."""


@dataclass(frozen=True)
class RuntimeCfg:
    threads: int = 0
    """torch threads per rank; 0 = usable cores of the host / ranks on the host."""
    device: str = "cpu"
    """cpu, cuda (one GPU per rank, by local rank) or auto."""
    poll_min_us: float = 20.0
    poll_max_us: float = 100.0
    """A waiting rank sleeps between MPI_Test calls, backing off from min to max."""
    kernels: str = "fast"
    """Decode kernels (kernels.py): fast (weights stored transposed, ~1.5x faster batch-1
    products; logits differ from transformers by rounding) or exact (the unchanged
    transformers modules, bitwise equal to transformers)."""
    check_memory: bool = True
    """Refuse a plan that exceeds a device's memory budget before loading (off: load it
    anyway, e.g. to watch a testbed's memory limit stop it)."""
    stall_timeout_s: float | None = None
    """A rank that sees no progress on any rank for this long ends the job, naming the
    stalled rank (watchdog.py); None ("auto"): 20x the plan's predicted step time, at least
    120 s (300 s before the plan is known: profiling and loading)."""


@dataclass(frozen=True)
class OutputCfg:
    path: str = "results/{name}-{time}.h5"
    """HDF5 file; {name} and {time} are filled in; relative to the current directory."""
    events: bool = True
    """Keep the per-action event log (for timelines and bubble analysis)."""
    show_text: bool = False
    """Print the first prompt and its decoded continuation (the demo)."""


@dataclass(frozen=True)
class TransportCfg:
    wire: str = "exact"
    """How activations cross a link between stages (wire.py): exact, bf16, fp16 or int8."""


@dataclass(frozen=True)
class EvalCfg:
    """`edgeshard-mpi eval JOB` (evaluate.py): perplexity over strided windows of a text."""

    dataset: Path | None = None
    """A WikiText raw file; None: workload.dataset."""
    window: int | None = None
    """Tokens per window; None ("auto"): the model's context length."""
    stride: int | None = None
    """Tokens the window moves by; None ("auto"): half the window."""
    max_windows: int = 0
    """Evaluate only the first windows (0: the whole text)."""
    agreement: bool = True
    """With a lossy wire: also generate the workload's prompts with wire = exact and with
    the job's wire, and report how many tokens agree."""


@dataclass(frozen=True)
class Job:
    name: str
    path: Path
    text: str
    model: ModelCfg
    workload: WorkloadCfg
    partition: PartitionCfg
    runtime: RuntimeCfg = field(default_factory=RuntimeCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    profile: ProfileCfg = field(default_factory=ProfileCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    pipeline: PipelineCfg = field(default_factory=PipelineCfg)
    transport: TransportCfg = field(default_factory=TransportCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def profile_batch_sizes(self) -> tuple[int, ...]:
        if self.profile.batch_sizes:
            return self.profile.batch_sizes
        if self.pipeline.pipelined and self.pipeline.micro_batch_size is None:
            return tuple(b for b in AUTO_BATCH_SIZES if self.workload.prompts % b == 0)
        return (self.workload.batch_size,)

    def check_context(self, world_size: int, spec: ModelSpec) -> None:
        """Checks that need the MPI world and the model shape."""
        wl = self.workload
        eos = spec.eos_token_id if wl.eos_token_id is None else wl.eos_token_id
        if wl.stop_at_eos and not 0 <= eos < spec.vocab_size:
            field = "workload.eos_token_id" if wl.eos_token_id is not None else "the model's eos"
            raise JobError(
                f"{field} = {eos} is not a token of the model (0..{spec.vocab_size - 1}), so "
                "stop_at_eos would never stop; give the model's EOS id or drop stop_at_eos"
            )
        if wl.context > spec.max_position_embeddings:
            raise JobError(
                f"workload: prompt_tokens + new_tokens = {wl.context} exceeds the model's "
                f"max_position_embeddings ({spec.max_position_embeddings}); shorten them"
            )
        ev = self.eval
        if ev.window is not None and ev.window > spec.max_position_embeddings:
            raise JobError(
                f"eval.window = {ev.window} exceeds the model's max_position_embeddings "
                f"({spec.max_position_embeddings}); use at most that, or \"auto\""
            )
        for d in self.cluster.devices:
            if d.rank >= world_size:
                raise JobError(
                    f"cluster.devices names rank {d.rank}, but the job runs "
                    f"{world_size} rank(s); start more ranks or drop the entry"
                )
        cloud = self.cluster.cloud
        if cloud is not None and not 0 < cloud < world_size:
            raise JobError(
                f"cluster.cloud = {cloud}: must be a rank other than the source, below {world_size}"
            )
        part = self.partition
        if part.strategy.startswith("cloud-edge") and cloud is None and not self.cluster.testbed:
            raise JobError(
                f"partition.strategy = {part.strategy!r} needs cluster.cloud (the "
                "rank of the cloud server)"
            )
        if part.strategy == "explicit":
            check_stages(part.stages, spec.n_units, world_size)
        elif part.strategy == "even":
            ranks = part.ranks if part.ranks is not None else tuple(range(world_size))
            bad = [r for r in ranks if r >= world_size]
            if bad:
                raise JobError(
                    f"partition.ranks names rank {bad[0]}, but the job runs {world_size} "
                    f"rank(s) (0..{world_size - 1}); start more ranks (mpiexec -n) or drop it"
                )
            if len(ranks) > spec.n_units:
                raise JobError(
                    f"partition: {len(ranks)} ranks for only {spec.n_units} planning units; "
                    "use fewer ranks in partition.ranks"
                )


def check_stages(stages: tuple[StageCfg, ...], n_units: int, world_size: int) -> None:
    """An explicit partition must cover [0, N) with contiguous stages, start on rank 0."""
    if not stages:
        raise JobError("partition.stages is empty; list stages as {rank = R, layers = [a, b]}")
    pos = 0
    for i, st in enumerate(stages):
        where = f"partition.stages[{i}]"
        if st.rank >= world_size:
            raise JobError(
                f"{where}: rank {st.rank} does not exist; the job runs {world_size} rank(s) "
                f"(0..{world_size - 1}); start more ranks (mpiexec -n) or change the stage"
            )
        if st.start != pos:
            what = "overlaps" if st.start < pos else "leaves a gap before"
            raise JobError(
                f"{where}: layers [{st.start}, {st.end}) {what} unit {pos}; stages must be "
                f"contiguous half-open ranges covering [0, {n_units})"
            )
        if st.end <= st.start:
            raise JobError(f"{where}: empty range [{st.start}, {st.end}); need start < end")
        pos = st.end
    if pos != n_units:
        raise JobError(
            f"partition.stages cover [0, {pos}) but the model has {n_units} units "
            f"(embedding, {n_units - 2} decoder layers, head); the last stage must end at "
            f"{n_units}"
        )
    if stages[0].rank != 0:
        raise JobError(
            "partition.stages[0]: the first stage (the embedding, unit 0) must be on rank 0, "
            "the source node (privacy constraint)"
        )
