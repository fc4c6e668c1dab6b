"""The HDF5 file of one run: schema, summary figures, atomic write, and read.

Written by rank 0 only, to a temporary name in the target folder and then linked to its
name (outfiles.py), so an aborted job never leaves a truncated file under the real name and
a run never replaces another's file. Every dataset carries
a `units` attribute. The README documents the schema; bump SCHEMA_VERSION on any change.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import numpy.lib.recfunctions as rfn

SCHEMA_VERSION = 1


def summarize(tokens: np.ndarray, token_time: np.ndarray, group_start: np.ndarray) -> dict:
    """Per-run figures from the source's records.

    latency_ms_per_token: the paper's metric, the average time per generated token of a
      sequence (group wall time / tokens generated), averaged over groups;
    ttft_ms: time from a group's start to its first token, averaged;
    tokens_per_s: all generated tokens / wall time from the first start to the last token.
    """
    steps_done = np.sum(~np.isnan(token_time), axis=1)  # [groups]
    last = np.array(
        [
            t[~np.isnan(t)].max() if n else np.nan
            for t, n in zip(token_time, steps_done, strict=True)
        ]
    )
    per_group = (last - group_start) / np.maximum(steps_done, 1)
    generated = int(np.sum(tokens >= 0))
    span = float(np.nanmax(last) - np.nanmin(group_start)) if generated else float("nan")
    return {
        "latency_ms_per_token": float(np.nanmean(per_group) * 1e3),
        "ttft_ms": float(np.nanmean(token_time[:, 0] - group_start) * 1e3),
        "tokens_per_s": generated / span if span > 0 else float("nan"),
        "generated_tokens": generated,
        "wall_s": span,
    }


def _dataset(group: h5py.Group, name: str, data, units: str, doc: str = "") -> None:
    ds = group.create_dataset(name, data=data)
    ds.attrs["units"] = units
    if doc:
        ds.attrs["description"] = doc


def _table(group: h5py.Group, name: str, rows: list[dict], doc: str = "") -> None:
    """A list of flat dicts -> compound dataset (strings stored as UTF-8)."""
    if not rows:
        return
    fields = []
    for key, value in rows[0].items():
        if isinstance(value, str):
            fields.append((key, h5py.string_dtype()))
        elif isinstance(value, bool | np.bool_):
            fields.append((key, "u1"))
        elif isinstance(value, int | np.integer):
            fields.append((key, "i8"))
        else:
            fields.append((key, "f8"))
    arr = np.zeros(len(rows), dtype=fields)
    for i, row in enumerate(rows):
        arr[i] = tuple(row[k] for k, _ in fields)
    ds = group.create_dataset(name, data=arr)
    if doc:
        ds.attrs["description"] = doc


def write_run(path: str | Path, run: dict) -> Path:
    """Write one run; returns the name used. `run` holds: attrs (root attributes), plan,
    devices, workload, ranks, stages, events, summary (see build_record for the keys).
    The file is complete or absent, never replaces another (outfiles.publish: a name taken
    meanwhile becomes name-2.h5), and gets mode 0666 minus the umask."""
    import io

    from .outfiles import publish

    # Built in memory, then written with plain file I/O: a full disk is then one clean
    # OSError (ENOSPC), where HDF5 would fail inside its own close and crash later.
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        for k, v in run["attrs"].items():
            f.attrs[k] = json.dumps(v) if isinstance(v, dict | list) else v
        _write_groups(f, run)
    data = buf.getbuffer()
    return publish(lambda tmp: tmp.write_bytes(data), Path(path))


def _write_groups(f: h5py.File, run: dict) -> None:
    plan = f.create_group("plan")
    _dataset(
        plan,
        "stages",
        np.asarray(run["plan"]["stages"], dtype=np.int32).reshape(-1, 3),
        "rank, first unit, end unit (half-open)",
        "one row per stage, in chain order",
    )
    for k in ("strategy", "objective", "description"):
        plan.attrs[k] = run["plan"][k]
    plan.attrs["info"] = json.dumps(run["plan"].get("info", {}))
    if run.get("predicted"):
        pred = run["predicted"]
        plan.attrs["predicted_ms_per_token"] = pred["per_token_s"] * 1e3
        plan.attrs["predicted_tokens_per_s"] = pred["tokens_per_s"]
        plan.attrs["predicted_pipeline_tokens_per_s"] = pred["pipeline_tokens_per_s"]
        plan.attrs["predicted"] = json.dumps(pred)
    if run.get("alternatives"):
        plan.attrs["alternatives"] = json.dumps(run["alternatives"])
    if run.get("profile") is not None:
        _write_profile(f, run["profile"])

    _table(f, "devices", run["devices"], "one row per rank: host, budget (bytes), threads")
    if run.get("ce_collm"):  # partition.strategy = "ce-collm" (cecollm.py)
        from .cecollm import write_group

        write_group(f, run["ce_collm"])

    wl = f.create_group("workload")
    for k, v in run["workload"]["attrs"].items():
        wl.attrs[k] = v
    _dataset(
        wl, "prompt_ids", run["workload"]["prompt_ids"], "token ids", "[prompts, prompt_tokens]"
    )
    wl.create_dataset(
        "prompt_text", data=np.array(run["workload"]["prompt_text"], dtype=h5py.string_dtype())
    )
    _dataset(
        wl,
        "generated_ids",
        run["workload"]["generated_ids"],
        "token ids",
        "[prompts, new_tokens]; -1 after the sequence's EOS",
    )
    _dataset(
        wl,
        "group_start_s",
        run["workload"]["group_start_s"],
        "s",
        "[groups] start of each micro-batch's prefill, from the run's t0",
    )
    _dataset(
        wl,
        "token_time_s",
        run["workload"]["token_time_s"],
        "s",
        "[groups, new_tokens] arrival of each token at the source, from t0",
    )

    ranks = f.create_group("ranks")
    units = {
        "bytes": (
            "bytes_sent",
            "weights_bytes",
            "kv_cache_bytes",
            "buffers_bytes",
            "peak_rss_bytes",
        )
    }
    for key, values in run["ranks"].items():
        unit = (
            "bytes"
            if key in units["bytes"]
            else "count"
            if key in ("messages_sent", "actions", "skipped")
            else "s"
        )
        _dataset(ranks, key, np.asarray(values), unit)

    stages = f.create_group("stages")
    for key, values in run["stages"].items():
        _dataset(stages, key, np.asarray(values), "s", "per stage, in chain order")

    if run.get("events") is not None:
        ds = f.create_dataset("events", data=run["events"], compression="gzip")
        ds.attrs["units"] = "s"
        ds.attrs["description"] = (
            "one row per executed action: rank, op (0 recv, 1 compute, "
            "2 send), stage, slot, iteration, start t0, end t1"
        )

    summary = f.create_group("summary")
    for k, v in run["summary"].items():
        summary.attrs[k] = v

    pipe, p = run["pipeline"], f.create_group("pipeline")
    for k in ("order", "micro_batches", "micro_batch_size", "tokens_per_s"):
        p.attrs[k] = pipe[k]
    _dataset(p, "busy_fraction", pipe["busy_fraction"], "1", "per stage: compute / wall time")
    _dataset(p, "idle_s", pipe["idle_s"], "s", "per stage: wall time - compute (bubbles, waits)")
    if "predicted" in pipe:
        pred = pipe["predicted"]
        p.attrs["predicted_tokens_per_s"] = pred["tokens_per_s"]
        p.attrs["measured_over_predicted"] = pipe["measured_over_predicted"]
        _dataset(p, "predicted_busy_fraction", pred["busy_fraction"], "1", "simulated")
        _dataset(p, "predicted_idle_s", pred["idle_s"], "s", "simulated")
    if pipe["candidates"]:
        p.attrs["candidates"] = json.dumps(pipe["candidates"])


def _write_profile(f: h5py.File, prof) -> None:
    """The profile the plan was made from: arrays as datasets, the whole file as JSON."""
    g = f.create_group("profile")
    g.attrs["json"] = json.dumps(prof.to_dict())
    g.attrs["names"] = json.dumps(list(prof.names))
    g.attrs["batch_sizes"] = list(prof.batch_sizes)
    for name, data, unit in (
        ("prefill_s", prof.prefill_s, "s"),
        ("decode_s", prof.decode_s, "s"),
        ("memory_budget", prof.memory_budget, "bytes"),
        ("weight_bytes", prof.weight_bytes, "bytes"),
        ("kv_bytes_per_token", prof.kv_bytes_per_token, "bytes"),
        ("latency_s", prof.latency_s, "s"),
        ("bandwidth", prof.bandwidth, "bytes/s"),
    ):
        _dataset(g, name, data, unit)


def _versions() -> dict:
    import platform

    import mpi4py
    import torch
    import transformers
    from mpi4py import MPI

    from . import __version__

    return {
        "edgeshard_mpi": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mpi4py": mpi4py.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
    }


def build_record(
    job,
    spec,
    plan,
    devices,
    prompts,
    results,
    summary,
    hosts,
    shape,
    profile,
    predicted,
    alternatives,
    decision,
) -> dict:
    """Everything rank 0 knows after a run, in the shape write_run expects."""
    from datetime import datetime

    from .planner.pipeline import Prediction, pipeline_summary
    from .runtime import EVENT_DTYPE

    src = results[0]
    wl = job.workload
    stage_compute = np.zeros(len(plan.stages))
    for r in results:
        for s, v in r.stage_compute_s.items():
            stage_compute[s] = v
    events = None
    if job.output.events:
        rows = [
            rfn.append_fields(
                r.events, "rank", np.full(len(r.events), r.rank, np.int16), usemask=False
            )
            for r in results
            if r.events is not None
        ]
        events = np.concatenate(rows) if rows else np.zeros(0, dtype=EVENT_DTYPE)
    return {
        "attrs": {
            "created": datetime.now().isoformat(timespec="seconds"),
            "versions": _versions(),
            "hosts": hosts,
            "world_size": len(results),
            "job_name": job.name,
            "job_path": str(job.path),
            "job_text": job.text,
            "model": spec.to_dict(),
            "dtype": job.model.dtype,
            "mode": job.pipeline.mode,
            "order": decision.order,
            "micro_batches": shape.slots,
            "micro_batch_size": decision.micro_batch_size,
            "profile_strategy": job.profile.strategy,
        },
        "plan": {**plan.to_dict(), "description": plan.describe()},
        "predicted": predicted,
        "alternatives": alternatives,
        "profile": profile,
        "devices": [d.to_dict() for d in devices],
        "workload": {
            "attrs": {
                "prompt_source": prompts.source,
                "tokenizer": prompts.tokenizer,
                "prompt_note": prompts.note,
                "prompt_tokens": wl.prompt_tokens,
                "new_tokens": wl.new_tokens,
                "batch_size": decision.micro_batch_size,
                "stop_at_eos": wl.stop_at_eos,
            },
            "prompt_ids": prompts.ids,
            "prompt_text": list(prompts.texts),
            "generated_ids": src.tokens.reshape(-1, wl.new_tokens),
            "group_start_s": src.group_start,
            "token_time_s": src.token_time,
        },
        "ranks": {
            key: [getattr(r, attr) for r in results]
            for key, attr in (
                ("compute_s", "compute_s"),
                ("recv_wait_s", "recv_wait_s"),
                ("send_s", "send_s"),
                ("flush_s", "flush_s"),
                ("wall_s", "wall_s"),
                ("load_s", "load_s"),
                ("bytes_sent", "bytes_sent"),
                ("messages_sent", "messages_sent"),
                ("actions", "actions"),
                ("peak_rss_bytes", "peak_rss"),
            )
        }
        | {
            f"{k}_bytes": [r.memory[k] for r in results] for k in ("weights", "kv_cache", "buffers")
        },
        "stages": {"compute_s": stage_compute},
        "events": events,
        "summary": summary,
        "pipeline": pipeline_summary(
            stage_compute,
            summary["wall_s"],
            summary["generated_tokens"],
            Prediction(**pred) if (pred := (decision.pipeline or {}).get("prediction")) else None,
        )
        | {
            "order": decision.order,
            "micro_batches": shape.slots,
            "micro_batch_size": decision.micro_batch_size,
            "candidates": (decision.pipeline or {}).get("candidates", []),
        },
    }


def read_run(path: str | Path) -> dict:
    """Everything in a run file as plain Python/numpy objects."""

    def load(obj):
        if isinstance(obj, h5py.Dataset):
            data = obj[()]
            if obj.dtype.kind == "O":
                data = np.array([x.decode() if isinstance(x, bytes) else x for x in data])
            return data
        out = {k: load(v) for k, v in obj.items()}
        out.update({f"@{k}": _attr(v) for k, v in obj.attrs.items()})
        return out

    with h5py.File(path, "r") as f:
        return load(f)


def _attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v.item() if isinstance(v, np.generic) else v
