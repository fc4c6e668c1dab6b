"""The job file (TOML): parse, validate, and say exactly what is wrong and how to fix it.

Every rank parses the same file; the checks are deterministic so all ranks agree on the
verdict, and rank 0 alone prints it. Checks that need the MPI world or the model shape
live in `Job.check_context`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from . import bounds, cecollm_job
from .fields import JobError, Section, expand_path, parse_bytes
from .jobcfg import (
    ORDERS,
    PROFILE_METHODS,
    PROFILE_STRATEGIES,
    STRATEGIES_FIXED,
    STRATEGIES_PLANNED,
    STRATEGY_CECOLLM,
    ClusterCfg,
    DeviceCfg,
    EvalCfg,
    Job,
    ModelCfg,
    OutputCfg,
    PartitionCfg,
    PipelineCfg,
    ProfileCfg,
    RuntimeCfg,
    StageCfg,
    TransportCfg,
    WorkloadCfg,
)
from .presets import DTYPE_BYTES, PRESETS

# Names other modules import from here: the job's schema (jobcfg.py) and field errors.
__all__ = [
    "Job",
    "JobError",
    "WorkloadCfg",
    "expand_path",
    "load_job",
    "parse_bytes",
    "parse_job",
]


def _model(sec: Section, base: Path) -> ModelCfg:
    source = sec.get("source", str, required=True)
    if source not in PRESETS:  # a model directory: $VARS, ~, relative to the job file
        source = str(expand_path(source, base, "model.source"))
    dtype = sec.choice("dtype", tuple(DTYPE_BYTES), "float32")
    seed = bounds.int_in(sec.get("seed", int, 0), 0, bounds.MAX_SEED, "model.seed")
    sec.finish()
    return ModelCfg(source=source, dtype=dtype, seed=seed)


def _workload(sec: Section, base: Path) -> WorkloadCfg:
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


def _partition(sec: Section, pipelined: bool) -> PartitionCfg:
    strategy = sec.choice(
        "strategy", (*STRATEGIES_FIXED, *STRATEGIES_PLANNED, STRATEGY_CECOLLM), "even"
    )
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


def _profile(sec: Section, base: Path) -> ProfileCfg:
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
        method=sec.choice("method", PROFILE_METHODS, "sequence"),
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


def _cluster(sec: Section, base: Path) -> ClusterCfg:
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


def _auto_int(sec: Section, key: str) -> int | None:
    value = sec.get(key, (int, str), "auto")
    if value == "auto":
        return None
    if isinstance(value, str) or value < 1:
        raise JobError(f'{sec.name}.{key}: an integer >= 1 or "auto", got {value!r}')
    return value


def _pipeline(sec: Section, wl: WorkloadCfg) -> PipelineCfg:
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


def _runtime(sec: Section) -> RuntimeCfg:
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


def _auto_float(sec: Section, key: str) -> float | None:
    value = sec.get(key, (float, str), "auto")
    if value == "auto":
        return None
    if isinstance(value, str):
        raise JobError(f'{sec.name}.{key}: a number of seconds or "auto", got {value!r}')
    return value


def _transport(sec: Section) -> TransportCfg:
    wire = sec.choice("wire", ("exact", "bf16", "fp16", "int8", "auto"), "exact")
    gain = sec.get("auto_min_gain", float, None)
    sec.finish()
    if gain is not None and wire != "auto":
        raise JobError(
            f"transport.auto_min_gain is only read with wire = 'auto', not {wire!r}; remove it"
        )
    cfg = TransportCfg(wire=wire, auto_min_gain=0.05 if gain is None else gain)
    bounds.float_in(cfg.auto_min_gain, 0.0, 1.0, "transport.auto_min_gain", "a fraction")
    return cfg


def _eval(sec: Section, base: Path, wl: WorkloadCfg) -> EvalCfg:
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


def _output(sec: Section) -> OutputCfg:
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
    top = Section(data, "")
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
            "ce_collm",
        )
    }
    top.finish()
    if "model" not in data:
        raise JobError('[model] is missing; add e.g. [model] source = "tiny"')
    base = path.resolve().parent
    workload = _workload(Section(sections["workload"], "workload"), base)
    pipeline = _pipeline(Section(sections["pipeline"], "pipeline"), workload)
    partition = _partition(Section(sections["partition"], "partition"), pipeline.pipelined)
    return Job(
        name=name,
        path=path,
        text=text,
        model=_model(Section(sections["model"], "model"), base),
        workload=workload,
        partition=partition,
        pipeline=pipeline,
        runtime=_runtime(Section(sections["runtime"], "runtime")),
        output=_output(Section(sections["output"], "output")),
        profile=_profile(Section(sections["profile"], "profile"), base),
        cluster=_cluster(Section(sections["cluster"], "cluster"), base),
        transport=_transport(Section(sections["transport"], "transport")),
        eval=_eval(Section(sections["eval"], "eval"), base, workload),
        ce_collm=cecollm_job.parse(
            Section(sections["ce_collm"], "ce_collm"),
            partition.strategy,
            pipeline.pipelined,
            workload.batch_size,
        ),
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
