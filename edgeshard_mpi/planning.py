"""Steps 3 and 4 of the job: profile (reuse a profile file or measure every unit and link)
and plan (rank 0 solves for the plan, micro-batch size and count in flight, checks memory
whole, predicts; every rank receives the decision)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import watchdog
from .job import Job
from .startup import Log, UserError, agree


def profile_step(job: Job, spec, devices, device, tp, log: Log, out: Path | None):
    """Step 3 (profile): reuse a profile file or measure; every rank gets the Profile."""
    from dataclasses import replace

    from .planner.problem import ProfileError, load_profile
    from .weights import CheckpointError

    cfg, wl = job.profile, job.workload
    if cfg.reuse is None and not needs_profile(job):
        return None
    prof, err = None, None
    if cfg.reuse is not None:
        if tp.rank == 0:
            try:
                prof = load_profile(cfg.reuse)
                check_profile(prof, spec, job, tp.size)
            except ProfileError as e:
                err = f"profile.reuse: {e}"
        agree(tp, err)
        prof = tp.bcast(prof)
        log.info(f"profile: reusing {cfg.reuse}")
    else:
        log.info("profile: timing every unit on every rank, then every link")
        frozen = watchdog.disturbances()
        try:
            prof = _measure(job, spec, devices, device, tp, log, cfg, wl)
        except CheckpointError as e:  # raised alike on every rank
            raise UserError(str(e)) from None
        agree(tp, watchdog.disturbed_since(frozen))  # a stall would skew the plan
        if tp.rank == 0 and cfg.save and out is not None:
            from .outfiles import OutputError

            path = Path(cfg.save.format(output=str(out.with_suffix(""))))
            try:
                log.info(f"profile: saved {prof.save(path)}")
            except OutputError as e:  # the run goes on: the profile is also in its file
                log.info(f"note: profile not saved: {e.strerror}")
    overrides = {d.rank: d.memory for d in job.cluster.devices if d.memory is not None}
    if overrides:
        budget = prof.memory_budget.copy()
        for r, m in overrides.items():
            budget[r] = m
        prof = replace(prof, memory_budget=budget)
    cloud = job.cluster.cloud
    if cloud is None and job.cluster.testbed is not None:
        from .testbed import load_testbed

        cloud = load_testbed(job.cluster.testbed).cloud
    if cloud is not None:
        prof = replace(prof, cloud=cloud)
    return _wire_profile(prof, job, spec)


def _wire_profile(prof, job: Job, spec):
    """The planner prices each hop at the wire's compressed size (wire.py)."""
    from . import wire
    from .planner.problem import compress_activations
    from .presets import DTYPE_BYTES

    w = job.transport.wire
    if w == "auto":  # plan with every hop as light as it can get; _auto_wires then chooses
        w = "int8"
    ratio = wire.ratio(w, spec.hidden_size, DTYPE_BYTES[job.model.dtype])
    return compress_activations(prof, ratio, w)


def _auto_wires(plan, prob, spec, job: Job) -> dict:
    """wire = "auto": choose each hop's codec (plan.info["wires"]) and predict the plan with
    those sizes; the plan itself was made with every hop at int8's size."""
    from dataclasses import replace

    from . import wire
    from .planner.cost import evaluate
    from .planner.problem import make_problem
    from .planner.wire_auto import CANDIDATES, choose_wires, per_hop_profile, uncompressed
    from .presets import DTYPE_BYTES

    size = DTYPE_BYTES[job.model.dtype]
    ratios = {w: wire.ratio(w, spec.hidden_size, size) for w in ("exact", *CANDIDATES)}
    exact = replace(prob, profile=uncompressed(prob.profile))
    exact = make_problem(exact.profile, prob.batch, prob.strategy, prob.slots)
    wires = choose_wires(plan, exact, ratios, job.transport.auto_min_gain)
    plan.info["wires"] = list(wires)
    priced = make_problem(per_hop_profile(exact.profile, plan, wires, ratios), prob.batch,
                          prob.strategy, prob.slots)  # fmt: skip
    return evaluate(plan, priced).to_dict()


def needs_profile(job: Job) -> bool:
    """A planned strategy, or a pipeline whose micro-batches the planner chooses."""
    pc = job.pipeline
    auto = pc.pipelined and (pc.micro_batches is None or pc.micro_batch_size is None)
    from .cecollm import needs_profile as ce_collm_split_auto

    wire_auto = job.transport.wire == "auto"  # link speeds decide each hop's codec
    return job.partition.planned or auto or ce_collm_split_auto(job) or wire_auto


def _measure(job: Job, spec, devices, device, tp, log: Log, cfg, wl):
    from .profile import profile_cluster
    from .weights import weight_source

    return profile_cluster(
        tp,
        spec,
        weight_source(job.model.source, spec, job.model.dtype, job.model.seed),
        job.model.dtype,
        device,
        devices,
        job.profile_batch_sizes(),
        wl.prompt_tokens,
        wl.new_tokens,
        cfg.warmup,
        cfg.repeats,
        cfg.sample_layers,
        cfg.link_repeats,
        job.cluster.cloud,
        log.info,
        cold=cfg.cold_cache,
        kernels=job.runtime.kernels,
        method=cfg.method,
    )


def check_profile(prof, spec, job: Job, world: int) -> None:
    from .planner.problem import ProfileError

    m = prof.model
    if (m.n_units, m.hidden_size, m.num_layers) != (
        spec.n_units,
        spec.hidden_size,
        spec.num_layers,
    ):
        raise ProfileError(
            f"it profiles a model with {m.num_layers} layers of width "
            f"{m.hidden_size}, the job runs {spec.num_layers} x "
            f"{spec.hidden_size}; profile this model"
        )
    if prof.n_devices != world:
        raise ProfileError(f"it describes {prof.n_devices} devices, the job runs {world} ranks")
    if prof.dtype != job.model.dtype:
        raise ProfileError(f"it was measured in {prof.dtype}, the job runs {job.model.dtype}")
    # Times depend on the kernels: a profile measured with others would mispredict. (A
    # profile that does not say, e.g. one from the paper, is taken as it is.)
    measured = prof.meta.get("kernels", job.runtime.kernels)
    if measured != job.runtime.kernels:
        raise ProfileError(
            f"it was measured with {measured} kernels, the job runs runtime.kernels = "
            f"{job.runtime.kernels!r}; profile again or set runtime.kernels = {measured!r}"
        )
    size = job.pipeline.micro_batch_size
    if size is not None:
        prof.times(size)  # raises if the batch size cannot be served
    elif not any(job.workload.prompts % b == 0 for b in prof.batch_sizes):
        raise ProfileError(
            f"none of its batch sizes {list(prof.batch_sizes)} divides workload.prompts "
            f"({job.workload.prompts}); profile other sizes or set pipeline.micro_batch_size"
        )


def plan_step(job: Job, spec, devices, prof, tp, log: Log):
    """Step 4 (plan): rank 0 decides the plan (and, pipelined, the micro-batch size and how
    many are in flight) and predicts; every rank receives the decision."""
    from . import emulation
    from .concurrency import share_cores
    from .planner import baselines
    from .planner.cost import evaluate
    from .planner.pipeline import candidate_plans, choose, predict
    from .planner.plan import Plan, Stage, even_plan
    from .planner.problem import Infeasible, PlannerLimit, make_problem

    part, pc, wl = job.partition, job.pipeline, job.workload
    if part.strategy == "ce-collm":  # early exit at the edge: its own plan (cecollm.py)
        from .cecollm import plan_step as ce_collm_plan_step

        return ce_collm_plan_step(job, spec, devices, prof, tp)
    result, err = None, None
    if tp.rank == 0:
        try:
            fixed = None
            if part.strategy == "explicit":
                fixed = Plan(tuple(Stage(s.rank, s.start, s.end) for s in part.stages))
            elif part.strategy == "even":
                fixed = even_plan(spec.n_units, part.ranks or tuple(range(tp.size)))

            def make(prob):
                if job.runtime.check_memory and pc.pipelined:  # (sequential: held back below)
                    prob = _hold_back(prob, spec, job)
                if fixed is None and pc.pipelined:  # joint over plans too (planner/pipeline.py)
                    return candidate_plans(prob, part.strategy, part.objective, part.algorithm)
                if fixed is None:
                    return baselines.make_plan(prob, part.strategy, part.objective, part.algorithm)
                return baselines.check_fits(fixed, prob) if job.runtime.check_memory else fixed

            pipe = None
            b, slots = pc.micro_batch_size, pc.micro_batches
            if prof is None:  # a fixed plan and fixed sizes: nothing to predict from
                plan, prob = fixed, None
            elif pc.pipelined:
                sizes = (b,) if b else tuple(x for x in prof.batch_sizes if wl.prompts % x == 0)
                tries = (slots,) if slots else SLOT_CANDIDATES
                choice = choose(
                    prof, wl.prompts, make, sizes, tries, pc.order, job.profile.strategy
                )
                plan, prob = choice.plan, choice.problem
                b, slots = choice.micro_batch_size, choice.micro_batches
                full = predict(plan, prob, wl.prompts // b, slots, pc.order)
                full = share_cores(full, plan, prob, devices, emulation.MODE != "none")
                pipe = {"prediction": full.to_dict(), "candidates": choice.candidates}
            else:
                prob = make_problem(prof, b, job.profile.strategy)
                if job.runtime.check_memory:
                    prob = _hold_back(prob, spec, job)
                plan = make(prob)
            if job.runtime.check_memory:
                _check_memory(plan, spec, job, devices, b, slots or 1)
            predicted = evaluate(plan, prob).to_dict() if prob is not None else None
            if job.transport.wire == "auto":  # a codec per link (planner/wire_auto.py)
                predicted = _auto_wires(plan, prob, spec, job)
            others = {}
            if prob is not None and part.planned:
                for name, alt in baselines.plan_all(prob, part.objective, part.algorithm).items():
                    others[name] = (
                        {"error": str(alt)}
                        if isinstance(alt, Infeasible)
                        else {
                            **alt.to_dict(),
                            "description": alt.describe(),
                            "predicted": evaluate(alt, prob).to_dict(),
                        }
                    )
            if pc.pipelined and slots is None:
                slots = len(plan.stages)  # enough to keep every stage busy
            result = (plan, predicted, others, Decision(b, slots or 1, pc.order, pipe))
        except Infeasible as e:
            err = str(e)
            if job.runtime.check_memory:
                err += (
                    " (each budget net of what a rank needs beside weights and KV cache: "
                    "receive and send buffers, a prefill's activations; the head's device "
                    "also the logits)"
                )
        except (PlannerLimit, UserError) as e:
            err = str(e)
    agree(tp, err)
    return tp.bcast(result)


def _hold_back(prob, spec, job: Job):
    """The problem with every budget less what the run needs beside weights and KV cache
    (buffers, a prefill's activations, the head's logits: memcheck.reserve), so a plan the
    planner finds also passes the whole-memory check before loading."""
    from dataclasses import replace

    from .memcheck import reserve

    wl = job.workload
    every, head = reserve(
        spec, job.model.dtype, prob.batch, wl.prompt_tokens, wl.context, prob.slots
    )
    budget = np.maximum(prob.profile.memory_budget - every, 0)
    memory = prob.memory.copy()
    memory[-1] += head
    return replace(prob, profile=replace(prob.profile, memory_budget=budget), memory=memory)


@dataclass(frozen=True)
class Decision:
    """How the workload is cut: sequences per micro-batch, micro-batches in flight."""

    micro_batch_size: int
    micro_batches: int
    order: str
    pipeline: dict | None = None
    """Pipelined runs: the simulator's prediction and every candidate the planner tried."""


# Micro-batches in flight the planner tries when the job leaves it to it.
SLOT_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)


def _check_memory(plan, spec, job: Job, devices, batch: int, slots: int) -> None:
    """A plan whose shard exceeds a rank's budget fails now, with the numbers, instead of
    being killed by the OS half-way through (memcheck.py: weights, KV caches, buffers,
    activations, logits; a cgroup budget is net of the runtime measured at start-up)."""
    from .memcheck import check

    wl = job.workload
    err = check(plan, spec, job.model.dtype, devices, batch, wl.prompt_tokens, wl.context, slots)
    if err:
        raise UserError(err)
