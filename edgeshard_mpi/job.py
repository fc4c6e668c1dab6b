"""The job file (TOML): parse, validate, and say exactly what is wrong and how to fix it.

Every rank parses the same file; the checks are deterministic so all ranks agree on the
verdict, and rank 0 alone prints it. Checks that need the MPI world or the model shape
live in `Job.check_context`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bounds
from .presets import DTYPE_BYTES, PRESETS, ModelSpec

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


class JobError(ValueError):
    """A problem with the job file, phrased for the user: the field, what is wrong, the fix."""


def parse_bytes(value: Any, where: str) -> int:
    """24GiB, 512MB, 1.5e9 or a plain integer -> bytes."""
    if isinstance(value, bool):
        raise JobError(f"{where}: expected a size such as 8GiB or 512MB, got {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise JobError(f"{where}: a size must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(value))
    if not m:
        raise JobError(f"{where}: cannot read {value!r} as a size; write e.g. 8GiB or 512MB")
    number = float(m.group(1))
    unit = (m.group(2) or "").lower()
    scale = {
        "": 1,
        "k": 1e3,
        "m": 1e6,
        "g": 1e9,
        "t": 1e12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }[unit]
    if number <= 0:
        raise JobError(f"{where}: a size must be positive, got {value!r}")
    return int(number * scale)


class _Section:
    """Typed access to one TOML table that remembers which keys were read, so unknown keys
    (usually typos) are reported instead of silently ignored."""

    def __init__(self, data: Any, name: str):
        if not isinstance(data, dict):
            raise JobError(f"[{name}] must be a table, got {type(data).__name__}")
        self.data, self.name, self.seen = data, name, set()

    def _where(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, kind: type | tuple, default: Any = None, *, required: bool = False):
        self.seen.add(key)
        if key not in self.data:
            if required:
                raise JobError(f"{self._where(key)} is missing; add it to the job file")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML has no int/float distinction worth punishing: accept 2 where 2.0 is expected.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise JobError(
                f"{self._where(key)}: expected {names}, got {type(value).__name__} {value!r}"
            )
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise JobError(
                f"{self._where(key)}: {value!r} is not one of {', '.join(map(repr, options))}"
            )
        return value

    def positive(self, key: str, default: int, *, zero_ok: bool = False) -> int:
        value = self.get(key, int, default)
        if value < 0 or (value == 0 and not zero_ok):
            bound = ">= 0" if zero_ok else ">= 1"
            raise JobError(f"{self._where(key)}: must be an integer {bound}, got {value}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise JobError(
                f"unknown field(s) in [{self.name or 'top level'}]: {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(self.seen))}"
            )


def expand_path(value: str, base: Path, where: str) -> Path:
    """Expand ~ and $VARS; a relative path is relative to the job file's folder (so a job
    means the same thing whatever directory mpiexec starts in)."""
    missing = [v for v in re.findall(r"\$\{?(\w+)\}?", value) if v not in os.environ]
    if missing:
        raise JobError(
            f"{where}: {value!r} uses ${missing[0]}, which is not set; export it (e.g. "
            f"export {missing[0]}=/path/to/data) or write the path out"
        )
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return path if path.is_absolute() else (base / path).resolve()


@dataclass(frozen=True)
class ModelCfg:
    source: str
    """Preset name (see `edgeshard-mpi presets`) or a Hugging Face Llama model directory."""
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


def _model(sec: _Section, base: Path) -> ModelCfg:
    source = sec.get("source", str, required=True)
    if source not in PRESETS:  # a model directory: $VARS, ~, relative to the job file
        source = str(expand_path(source, base, "model.source"))
    dtype = sec.choice("dtype", tuple(DTYPE_BYTES), "float32")
    seed = bounds.int_in(sec.get("seed", int, 0), 0, bounds.MAX_SEED, "model.seed")
    sec.finish()
    return ModelCfg(source=source, dtype=dtype, seed=seed)


def _workload(sec: _Section, base: Path) -> WorkloadCfg:
    raw = sec.get("dataset", str, None)
    dataset = None
    if raw == "":
        raise JobError(
            "workload.dataset is empty; give a path or remove the field to use the built-in prompts"
        )
    if raw is not None:
        try:
            dataset = expand_path(raw, base, "workload.dataset")
        except JobError:
            if sec.data.get("fallback") != "builtin":
                raise
            dataset = None  # an unset variable with fallback = builtin: use built-in prompts
    fallback = sec.choice("fallback", ("error", "builtin"), "error")
    tokenizer = sec.get("tokenizer", str, "auto")
    if tokenizer not in ("auto", "bytes"):
        tokenizer = str(expand_path(tokenizer, base, "workload.tokenizer"))
    wl = WorkloadCfg(
        dataset=dataset,
        dataset_field=raw,
        fallback=fallback,
        tokenizer=tokenizer,
        prompt_tokens=sec.positive("prompt_tokens", 32),
        new_tokens=sec.positive("new_tokens", 96),
        prompts=sec.positive("prompts", 4),
        batch_size=sec.positive("batch_size", 1),
        seed=bounds.int_in(sec.get("seed", int, 0), 0, bounds.MAX_SEED, "workload.seed"),
        stop_at_eos=sec.get("stop_at_eos", bool, False),
        eos_token_id=sec.get("eos_token_id", int, None),
    )
    sec.finish()
    if wl.prompts % wl.batch_size:
        raise JobError(
            f"workload.prompts ({wl.prompts}) must be a multiple of workload.batch_size "
            f"({wl.batch_size}); every batch has the same shape"
        )
    return wl


def _partition(sec: _Section, pipelined: bool) -> PartitionCfg:
    strategy = sec.choice("strategy", STRATEGIES_FIXED + STRATEGIES_PLANNED, "even")
    stages_raw = sec.get("stages", list, [])
    ranks = sec.get("ranks", list, None)
    # Pipelined inference is judged by throughput, sequential by latency (the paper's pair).
    objective = sec.choice(
        "objective", ("latency", "throughput"), "throughput" if pipelined else "latency"
    )
    algorithm = sec.choice("algorithm", ("exact", "paper"), "exact")
    sec.finish()
    stages = []
    for i, item in enumerate(stages_raw):
        where = f"partition.stages[{i}]"
        if not isinstance(item, dict) or set(item) != {"rank", "layers"}:
            raise JobError(
                f"{where}: write each stage as {{rank = R, layers = [start, end]}} "
                f"(half-open), got {item!r}"
            )
        layers = item["layers"]
        ok = (
            isinstance(item["rank"], int)
            and item["rank"] >= 0
            and isinstance(layers, list)
            and len(layers) == 2
            and all(isinstance(x, int) and x >= 0 for x in layers)
        )
        if not ok:
            raise JobError(
                f"{where}: rank must be an integer >= 0 and layers [start, end], got {item!r}"
            )
        stages.append(StageCfg(item["rank"], layers[0], layers[1]))
    if strategy == "explicit" and not stages:
        raise JobError("partition.strategy = 'explicit' needs partition.stages")
    if strategy != "explicit" and stages:
        raise JobError(
            f"partition.stages is only read with strategy = 'explicit', not "
            f"{strategy!r}; remove it or set strategy = 'explicit'"
        )
    if ranks is not None:
        if not ranks or not all(isinstance(r, int) and r >= 0 for r in ranks):
            raise JobError("partition.ranks: a non-empty list of rank numbers, e.g. [0, 1, 2]")
        if ranks[0] != 0 or len(set(ranks)) != len(ranks):
            raise JobError(
                "partition.ranks: must start with 0 (the source node holds the "
                "embedding) and name each rank once"
            )
        ranks = tuple(ranks)
    if ranks is not None and strategy != "even":
        raise JobError(f"partition.ranks is only read with strategy = 'even', not {strategy!r}")
    return PartitionCfg(
        strategy=strategy,
        stages=tuple(stages),
        ranks=ranks,
        objective=objective,
        algorithm=algorithm,
    )


def _profile(sec: _Section, base: Path) -> ProfileCfg:
    reuse = sec.get("reuse", str, None)
    if sec.data.get("save"):
        bounds.check_template(str(sec.data["save"]), "profile.save", {"output"})
    cfg = ProfileCfg(
        reuse=None if reuse is None else expand_path(reuse, base, "profile.reuse"),
        save=sec.get("save", str, ProfileCfg.save) or None,
        strategy=sec.choice("strategy", PROFILE_STRATEGIES, "average"),
        warmup=sec.positive("warmup", 1, zero_ok=True),
        repeats=sec.positive("repeats", 3),
        sample_layers=sec.positive("sample_layers", 0, zero_ok=True),
        link_repeats=sec.positive("link_repeats", 3),
        cold_cache=sec.get("cold_cache", bool, True),
        batch_sizes=tuple(sec.get("batch_sizes", list, [])),
    )
    sec.finish()
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in cfg.batch_sizes):
        raise JobError(f"profile.batch_sizes: a list of integers >= 1, got {list(cfg.batch_sizes)}")
    if list(cfg.batch_sizes) != sorted(set(cfg.batch_sizes)):
        raise JobError("profile.batch_sizes: list each size once, in increasing order")
    if cfg.reuse is not None and not cfg.reuse.is_file():
        raise JobError(
            f"profile.reuse: no file at {cfg.reuse}; run `edgeshard-mpi profile` or "
            "remove the field to measure"
        )
    return cfg


def _cluster(sec: _Section, base: Path) -> ClusterCfg:
    cloud = sec.get("cloud", int, None)
    raw = sec.get("devices", list, [])
    testbed = sec.get("testbed", str, None)
    emulation = sec.choice("emulation", ("auto", "os", "transport"), "auto")
    sec.finish()
    if testbed is not None and ("/" in testbed or testbed.endswith(".toml")):
        testbed = str(expand_path(testbed, base, "cluster.testbed"))
    devices, seen = [], set()
    for i, d in enumerate(raw):
        where = f"cluster.devices[{i}]"
        if not isinstance(d, dict) or "rank" not in d or set(d) - {"rank", "name", "memory"}:
            raise JobError(f'{where}: write {{rank = R, name = "...", memory = "8GiB"}}, got {d!r}')
        if not isinstance(d["rank"], int) or d["rank"] < 0 or d["rank"] in seen:
            raise JobError(f"{where}: rank must be a new integer >= 0")
        seen.add(d["rank"])
        mem = parse_bytes(d["memory"], f"{where}.memory") if "memory" in d else None
        devices.append(DeviceCfg(d["rank"], d.get("name"), mem))
    return ClusterCfg(cloud=cloud, devices=tuple(devices), testbed=testbed, emulation=emulation)


def _auto_int(sec: _Section, key: str) -> int | None:
    value = sec.get(key, (int, str), "auto")
    if value == "auto":
        return None
    if isinstance(value, str) or value < 1:
        raise JobError(f'{sec.name}.{key}: an integer >= 1 or "auto", got {value!r}')
    return value


def _pipeline(sec: _Section, wl: WorkloadCfg) -> PipelineCfg:
    mode = sec.choice("mode", ("sequential", "pipeline"), "sequential")
    order = sec.choice("order", ORDERS, "no-bubbles")
    given_size = "micro_batch_size" in sec.data
    cfg = PipelineCfg(
        mode=mode,
        order=order,
        micro_batches=_auto_int(sec, "micro_batches"),
        micro_batch_size=_auto_int(sec, "micro_batch_size") if given_size else wl.batch_size,
    )
    sec.finish()
    if mode == "sequential" and (cfg.micro_batches or 1) > 1:
        raise JobError(
            "pipeline.micro_batches > 1 needs pipeline.mode = 'pipeline' (sequential "
            "inference has one micro-batch in flight)"
        )
    if mode == "sequential" and given_size:
        raise JobError(
            "pipeline.micro_batch_size is read in pipeline mode; in sequential mode set "
            "workload.batch_size"
        )
    size = cfg.micro_batch_size
    if size is not None and wl.prompts % size:
        raise JobError(
            f"pipeline.micro_batch_size ({size}) must divide workload.prompts "
            f"({wl.prompts}); every micro-batch has the same shape"
        )
    if mode == "sequential":
        cfg = PipelineCfg(mode, order, 1, wl.batch_size)
    return cfg


def _runtime(sec: _Section) -> RuntimeCfg:
    rt = RuntimeCfg(
        threads=sec.positive("threads", 0, zero_ok=True),
        device=sec.choice("device", ("cpu", "cuda", "auto"), "cpu"),
        poll_min_us=sec.get("poll_min_us", float, 20.0),
        poll_max_us=sec.get("poll_max_us", float, 100.0),
        check_memory=sec.get("check_memory", bool, True),
        stall_timeout_s=_auto_float(sec, "stall_timeout_s"),
        kernels=sec.choice("kernels", ("fast", "exact"), "fast"),
    )
    sec.finish()
    bounds.int_in(rt.threads, 0, bounds.MAX_THREADS, "runtime.threads", "0 = one per core")
    for key in ("poll_min_us", "poll_max_us"):
        bounds.float_in(getattr(rt, key), bounds.MIN_POLL_US, bounds.MAX_POLL_US, f"runtime.{key}")
    if not 0 < rt.poll_min_us <= rt.poll_max_us:
        raise JobError("runtime: need 0 < poll_min_us <= poll_max_us")
    if rt.stall_timeout_s is not None:
        bounds.float_in(rt.stall_timeout_s, 1.0, bounds.MAX_STALL_S, "runtime.stall_timeout_s")
    return rt


def _auto_float(sec: _Section, key: str) -> float | None:
    value = sec.get(key, (float, str), "auto")
    if value == "auto":
        return None
    if isinstance(value, str):
        raise JobError(f'{sec.name}.{key}: a number of seconds or "auto", got {value!r}')
    return value


def _transport(sec: _Section) -> TransportCfg:
    cfg = TransportCfg(wire=sec.choice("wire", ("exact", "bf16", "fp16", "int8"), "exact"))
    sec.finish()
    return cfg


def _eval(sec: _Section, base: Path, wl: WorkloadCfg) -> EvalCfg:
    raw = sec.get("dataset", str)
    window, stride = _auto_int(sec, "window"), _auto_int(sec, "stride")
    cfg = EvalCfg(
        dataset=expand_path(raw, base, "eval.dataset") if raw else wl.dataset,
        window=window,
        stride=stride,
        max_windows=sec.positive("max_windows", 0, zero_ok=True),
        agreement=sec.get("agreement", bool, True),
    )
    sec.finish()
    if window is not None:
        bounds.int_in(window, 2, 1 << 20, "eval.window", '"auto": the model\'s context')
    if stride is not None:
        top = window if window is not None else 1 << 20
        bounds.int_in(stride, 1, top, "eval.stride", "at most the window")
    bounds.int_in(cfg.max_windows, 0, 1 << 30, "eval.max_windows", "0 = the whole text")
    return cfg


def _output(sec: _Section) -> OutputCfg:
    out = OutputCfg(
        path=sec.get("path", str, OutputCfg.path),
        events=sec.get("events", bool, True),
        show_text=sec.get("show_text", bool, False),
    )
    sec.finish()
    bounds.check_template(out.path, "output.path")
    if not out.path.endswith((".h5", ".hdf5")):
        raise JobError(f"output.path: {out.path!r} should end in .h5 (an HDF5 file)")
    return out


def parse_job(text: str, path: Path) -> Job:
    """TOML text -> Job, or JobError naming the field and the fix."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: not valid TOML: {e}") from None
    try:
        return _parse(data, path, text)
    except bounds.BoundsError as e:
        raise JobError(str(e)) from None


def _parse(data: dict, path: Path, text: str) -> Job:
    top = _Section(data, "")
    name = bounds.safe_name(top.get("name", str, path.stem), "name")
    sections = {
        k: top.get(k, dict, {})
        for k in (
            "model",
            "workload",
            "partition",
            "runtime",
            "output",
            "profile",
            "cluster",
            "pipeline",
            "transport",
            "eval",
        )
    }
    top.finish()
    if "model" not in data:
        raise JobError('[model] is missing; add e.g. [model] source = "tiny"')
    base = path.resolve().parent
    workload = _workload(_Section(sections["workload"], "workload"), base)
    pipeline = _pipeline(_Section(sections["pipeline"], "pipeline"), workload)
    partition = _partition(_Section(sections["partition"], "partition"), pipeline.pipelined)
    return Job(
        name=name,
        path=path,
        text=text,
        model=_model(_Section(sections["model"], "model"), base),
        workload=workload,
        partition=partition,
        pipeline=pipeline,
        runtime=_runtime(_Section(sections["runtime"], "runtime")),
        output=_output(_Section(sections["output"], "output")),
        profile=_profile(_Section(sections["profile"], "profile"), base),
        cluster=_cluster(_Section(sections["cluster"], "cluster"), base),
        transport=_transport(_Section(sections["transport"], "transport")),
        eval=_eval(_Section(sections["eval"], "eval"), base, workload),
    )


def load_job(path: str | Path) -> Job:
    path = Path(path)
    if not path.is_file():
        raise JobError(f"job file {str(path)!r} not found (looked in {Path.cwd()})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read job file {str(path)!r}: {e}") from None
    return parse_job(text, path)
