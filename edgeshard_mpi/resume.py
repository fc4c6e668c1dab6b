"""The run journal: every finished prompt group is on disk as soon as it completes, so a
killed run can be resumed (`edgeshard-mpi run JOB --resume JOURNAL`) and a full disk loses
at most the group in progress.

The journal sits beside the run's HDF5 file (`<out>.journal`) from the first group until
the file is written, then it is removed. Format: one JSON header line (what the run is:
prompts, micro-batch size, token count, a digest of the prompt ids), then one record per
finished group: 4-byte length, 4-byte CRC-32, pickled {group, tokens, token_time,
group_start}. Each record is flushed and fsync'ed before the next group's tokens are
trusted to it; a torn last record (a kill during the write) fails its CRC and is dropped,
so that group is simply run again. Only rank 0 (the source, which owns the tokens) reads
and writes it.

A resumed run runs only the groups the journal lacks and merges: the final file's tokens
equal an uninterrupted run's. Times of journaled groups are shifted to end at the resumed
run's start (the downtime is not counted as generation time); `resumed_groups` in the file
says which groups came from the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = "edgeshard-journal"
VERSION = 1
SUFFIX = ".journal"
_FRAME = struct.Struct(">II")


class ResumeError(ValueError):
    """The journal cannot be used for this job; the message says why and what to do."""


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + SUFFIX)


def output_of(journal: Path) -> Path:
    if not journal.name.endswith(SUFFIX):
        raise ResumeError(f"--resume: {journal} is not a journal (*{SUFFIX})")
    return journal.with_name(journal.name[: -len(SUFFIX)])


def _digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


@dataclass
class Journal:
    path: Path
    header: dict
    done: dict[int, dict] = field(default_factory=dict)
    """group -> its record, for groups finished before this run."""
    _f: object = None

    # -- creating and reading -----------------------------------------------------------

    @classmethod
    def create(cls, out: Path, header: dict) -> tuple[Journal, Path]:
        """A new journal beside `out`, or beside `out-2`, ... when a concurrent run holds
        that name (O_EXCL: never two runs in one journal). Returns it and the output name."""
        from .outfiles import candidates

        out.parent.mkdir(parents=True, exist_ok=True)
        for cand in candidates(out):
            if cand.exists():
                continue
            path = journal_path(cand)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
            except FileExistsError:
                continue
            f = os.fdopen(fd, "ab")
            head = {**header, "magic": MAGIC, "version": VERSION, "output": cand.name}
            f.write(json.dumps(head).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
            return cls(path, head, {}, f), cand
        raise ResumeError(f"{out}: no free name for the run's journal; clean the folder")

    @classmethod
    def read(cls, path: Path) -> Journal:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ResumeError(f"--resume: cannot read {path} ({e.strerror})") from None
        line, _, rest = data.partition(b"\n")
        try:
            header = json.loads(line)
            ok = header.get("magic") == MAGIC
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise ResumeError(f"--resume: {path} is not an edgeshard-mpi journal")
        if header.get("version") != VERSION:
            raise ResumeError(f"--resume: {path} has journal version {header.get('version')}")
        done, pos = {}, 0
        while pos + _FRAME.size <= len(rest):
            n, crc = _FRAME.unpack_from(rest, pos)
            body = rest[pos + _FRAME.size : pos + _FRAME.size + n]
            if len(body) < n or zlib.crc32(body) != crc:
                break  # torn by a kill mid-write: that group runs again
            rec = pickle.loads(body)
            done[int(rec["group"])] = rec
            pos += _FRAME.size + n
        return cls(path, header, done)

    def reopen(self) -> None:
        """Append to an existing journal (a resumed run keeps journaling into it)."""
        self._f = open(self.path, "ab")  # noqa: SIM115 (held open for the whole run)

    # -- writing ------------------------------------------------------------------------

    def append(self, group: int, tokens: np.ndarray, token_time: np.ndarray, start: float):
        rec = {
            "group": int(group),
            "tokens": np.asarray(tokens),
            "token_time": np.asarray(token_time),
            "group_start": float(start),
        }
        body = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
        self._f.write(_FRAME.pack(len(body), zlib.crc32(body)) + body)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    # -- checking and merging -----------------------------------------------------------

    def check_matches(self, header: dict) -> None:
        """The resumed job must be the same work: same prompts, cut the same way."""
        for key, what in (
            ("prompts_digest", "the prompts (dataset, seed, tokenizer, prompt_tokens)"),
            ("new_tokens", "workload.new_tokens"),
            (
                "micro_batch_size",
                "the micro-batch size (set pipeline.micro_batch_size or "
                "workload.batch_size to the killed run's)",
            ),
            ("model", "the model (model.source, dtype, seed)"),
            ("stop_at_eos", "workload.stop_at_eos / eos_token_id"),
        ):
            if self.header.get(key) != header.get(key):
                raise ResumeError(
                    f"--resume: {what} differ from the killed run's ({self.header.get(key)!r} "
                    f"there, {header.get(key)!r} now); resume with the same job"
                )

    def todo(self, groups: int) -> list[int]:
        return [g for g in range(groups) if g not in self.done]

    def merge(self, res, todo: list[int], groups: int, b: int, steps: int) -> None:
        """Fold the journaled groups into this run's source result (in place): arrays
        indexed by the job's group numbers; journaled times end at this run's t0."""
        tokens = np.full((groups, b, steps), -1, dtype=np.int64)
        token_time = np.full((groups, steps), np.nan)
        start = np.full(groups, np.nan)
        if todo:
            tokens[todo], token_time[todo], start[todo] = (
                res.tokens,
                res.token_time,
                res.group_start,
            )
        if self.done:
            last = max(np.nanmax(r["token_time"]) for r in self.done.values())
            for g, r in self.done.items():
                tokens[g], token_time[g] = r["tokens"], r["token_time"] - last
                start[g] = r["group_start"] - last
        res.tokens, res.token_time, res.group_start = tokens, token_time, start


def header_for(job, spec, prompt_ids: np.ndarray, b: int, eos: int) -> dict:
    return {
        "prompts_digest": _digest(prompt_ids),
        "prompts": len(prompt_ids),
        "new_tokens": job.workload.new_tokens,
        "micro_batch_size": int(b),
        "model": [job.model.source, job.model.dtype, job.model.seed],
        "stop_at_eos": [job.workload.stop_at_eos, int(eos) if job.workload.stop_at_eos else None],
        "job_name": job.name,
    }


# -- re-planning without a device --------------------------------------------------------


def excluded_ranks(devices, names: tuple[str, ...]) -> tuple[int, ...]:
    """Ranks of the devices named in --exclude; rank 0 (the source) cannot be excluded."""
    by_name = {d.name: d.rank for d in devices}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ResumeError(
            f"--exclude {unknown[0]}: no such device; the devices are {', '.join(by_name)}"
        )
    ranks = tuple(sorted(by_name[n] for n in names))
    if 0 in ranks:
        raise ResumeError("--exclude: rank 0 is the source (it holds the prompts); keep it")
    return ranks


def exclude_from_job(job, ranks: tuple[int, ...], world: int):
    """The job with the excluded ranks taken out of its partition."""
    from dataclasses import replace

    if not ranks:
        return job
    part = job.partition
    if part.strategy == "even":
        keep = tuple(r for r in (part.ranks or range(world)) if r not in ranks)
        return replace(job, partition=replace(part, ranks=keep))
    if part.strategy == "explicit" and any(s.rank in ranks for s in part.stages):
        raise ResumeError(
            "--exclude: partition.stages places layers on an excluded rank; edit the stages "
            "or use a planned strategy"
        )
    return job


def exclude_from_profile(prof, ranks: tuple[int, ...]):
    """A profile where the excluded devices hold nothing (zero memory budget)."""
    from dataclasses import replace

    if prof is None or not ranks:
        return prof
    budget = prof.memory_budget.copy()
    budget[list(ranks)] = 0.0
    return replace(prof, memory_budget=budget)
