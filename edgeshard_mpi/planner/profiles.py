"""A Profile: what was measured on a cluster (or written by hand), and its JSON file.

Profile file, format "edgeshard-profile" version 1 (JSON; seconds, bytes, bytes/s):

    {"format": "edgeshard-profile", "version": 1,
     "model": {...ModelSpec fields...} or "llama2-7b", "dtype": "float32",
     "prompt_tokens": 32, "new_tokens": 96, "batch_sizes": [1, 4],
     "source": 0, "cloud": 14 or null,
     "units": {"weight_bytes": [N], "kv_bytes_per_token": [N],
               "activation_bytes_per_token": [N]},        # optional: derived from the model
     "device_types": {"agx": {"prefill_s": ..., "decode_s": ...}},   # optional
     "devices": [{"name": "agx-0", "type": "agx", "memory_budget": 31138512896}, ...],
     "links": {"default": {"latency_s": 0.002, "bandwidth_mbps": 50, "jitter": 0.2, "seed": 1},
               "pairs": [{"a": 0, "b": 14, "bandwidth_mbps": 1}],
               "latency_s": [[M x M]], "bandwidth_bytes_per_s": [[M x M]]},  # or full matrices
     "notes": "how the numbers were obtained"}

Times ("prefill_s" / "decode_s", on a device or its type) are, per batch size in
`batch_sizes`, either a list of N per-unit seconds, or {"embed": s, "layer": s, "head": s}.
A single entry (not nested per batch) applies to the first batch size. `null` or a missing
unit time means the device cannot run that unit. Memory budgets may be bytes or "29GiB".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..presets import DTYPE_BYTES, PRESETS, ModelSpec

FORMAT, VERSION = "edgeshard-profile", 1
TOKEN_BYTES = 8  # a sampled token id (int64) returning to the source


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the entry and the fix."""


def _bytes(v, where: str) -> int:
    from ..job import JobError, parse_bytes  # the job file's size syntax (pure: no torch)

    try:
        return parse_bytes(v, where)
    except JobError as e:
        raise ProfileError(str(e)) from None


PER_DEVICE_META = (
    "hosts", "threads", "wake_s", "embed_wake_s", "self_wake_s", "contention", "host_cores",
    "contention_cores",
)  # fmt: skip
"""meta entries with one value per device (in device order)."""


@dataclass(frozen=True)
class Profile:
    """Everything the planner knows about a model on a cluster. Devices are indexed 0..M-1
    and are MPI ranks when the profile comes from (or is used by) a job."""

    model: ModelSpec
    dtype: str
    prompt_tokens: int
    new_tokens: int
    batch_sizes: tuple[int, ...]
    names: tuple[str, ...]
    memory_budget: np.ndarray  # [M] bytes
    prefill_s: np.ndarray  # [B, M, N] seconds per unit; inf = cannot run
    decode_s: np.ndarray  # [B, M, N]
    weight_bytes: np.ndarray  # [N]
    kv_bytes_per_token: np.ndarray  # [N] per sequence and context token
    activation_bytes_per_token: np.ndarray  # [N] output of the unit, per sequence and token
    latency_s: np.ndarray  # [M, M]
    bandwidth: np.ndarray  # [M, M] bytes/s
    source: int = 0
    cloud: int | None = None
    notes: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_devices(self) -> int:
        return len(self.names)

    def meta_for(self, order: list[int]) -> dict:
        """meta with its per-device lists (PER_DEVICE_META) taken in `order` (a subset or a
        reordering of the devices), so that each entry stays with its device."""
        meta = dict(self.meta)
        for k in PER_DEVICE_META:
            v = meta.get(k)
            if isinstance(v, list) and len(v) == self.n_devices:
                meta[k] = [v[i] for i in order]
        return meta

    @property
    def n_units(self) -> int:
        return len(self.weight_bytes)

    def times(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-unit (prefill, decode) seconds [M, N] at `batch`: measured batch sizes are
        interpolated linearly, and extrapolated from the nearest two."""
        bs = np.asarray(self.batch_sizes, dtype=float)
        if batch in self.batch_sizes:
            i = self.batch_sizes.index(batch)
            return self.prefill_s[i], self.decode_s[i]
        if len(bs) == 1:
            raise ProfileError(
                f"the profile was measured at batch size {self.batch_sizes[0]} only; profile "
                f"at batch {batch} too (profile.batch_sizes in the job) to plan for it"
            )
        hi = int(np.clip(np.searchsorted(bs, batch), 1, len(bs) - 1))
        lo = hi - 1
        w = (batch - bs[lo]) / (bs[hi] - bs[lo])
        pre = self.prefill_s[lo] + w * (self.prefill_s[hi] - self.prefill_s[lo])
        dec = self.decode_s[lo] + w * (self.decode_s[hi] - self.decode_s[lo])
        return np.maximum(pre, 0), np.maximum(dec, 0)

    def unit_memory(self, batch: int, slots: int = 1) -> np.ndarray:
        """Bytes per unit: weights + KV cache of `slots` micro-batches of `batch` sequences
        over the whole context (the paper's N_a * B_b * (I_m + G_m))."""
        context = self.prompt_tokens + self.new_tokens
        return self.weight_bytes + self.kv_bytes_per_token * batch * context * slots

    # -- files ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        def arr(a):
            return [[None if math.isinf(x) else float(x) for x in row] for row in a]

        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.to_dict(),
            "dtype": self.dtype,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "batch_sizes": list(self.batch_sizes),
            "source": self.source,
            "cloud": self.cloud,
            "units": {
                "weight_bytes": self.weight_bytes.tolist(),
                "kv_bytes_per_token": self.kv_bytes_per_token.tolist(),
                "activation_bytes_per_token": self.activation_bytes_per_token.tolist(),
            },
            "devices": [
                {
                    "name": n,
                    "memory_budget": int(self.memory_budget[d]),
                    "prefill_s": arr(self.prefill_s[:, d]),
                    "decode_s": arr(self.decode_s[:, d]),
                }
                for d, n in enumerate(self.names)
            ],
            "links": {
                "latency_s": self.latency_s.tolist(),
                "bandwidth_bytes_per_s": self.bandwidth.tolist(),
            },
            "notes": self.notes,
            "meta": self.meta,
        }

    def save(self, path: str | Path, *, rename_ok: bool = True) -> Path:
        """Write the profile without ever replacing a file: a taken name becomes name-2.json
        (or, rename_ok=False, an error). Returns the name used."""
        from ..outfiles import publish

        text = json.dumps(self.to_dict(), indent=1)
        return publish(lambda tmp: Path(tmp).write_text(text), Path(path), rename_ok=rename_ok)


def _unit_times(value, spec: ModelSpec, where: str) -> np.ndarray:
    n = spec.n_units
    if isinstance(value, dict):
        unknown = set(value) - {"embed", "layer", "head"}
        if unknown or not {"embed", "layer", "head"} <= set(value):
            raise ProfileError(f"{where}: give embed, layer and head seconds, got {sorted(value)}")
        out = np.full(n, float(value["layer"]))
        out[0], out[-1] = float(value["embed"]), float(value["head"])
        return out
    if isinstance(value, list) and len(value) == n:
        return np.array([math.inf if x is None else float(x) for x in value])
    raise ProfileError(
        f"{where}: expected {n} per-unit seconds (embedding, {n - 2} layers, "
        "head) or {embed, layer, head}"
    )


def _per_batch(value, spec, n_batches: int, where: str) -> np.ndarray:
    nested = isinstance(value, list) and value and isinstance(value[0], list | dict)
    rows = value if nested else [value]
    if len(rows) != n_batches:
        raise ProfileError(f"{where}: {len(rows)} entries for {n_batches} batch sizes")
    return np.stack([_unit_times(r, spec, f"{where}[{i}]") for i, r in enumerate(rows)])


def _links(spec: dict, m: int) -> tuple[np.ndarray, np.ndarray]:
    if "latency_s" in spec and "bandwidth_bytes_per_s" in spec:
        lat = np.asarray(spec["latency_s"], dtype=float)
        bw = np.asarray(spec["bandwidth_bytes_per_s"], dtype=float)
        if lat.shape != (m, m) or bw.shape != (m, m):
            raise ProfileError(f"links: matrices must be {m} x {m}")
        return lat, bw
    default = spec.get("default")
    if default is None:
        raise ProfileError("links: give 'default' (latency_s, bandwidth_mbps) or full matrices")
    lat = np.full((m, m), float(default.get("latency_s", 0.0)))
    mbps = float(default["bandwidth_mbps"])
    jitter = float(default.get("jitter", 0.0))
    rng = np.random.default_rng(int(default.get("seed", 0)))
    draw = rng.uniform(1 - jitter, 1 + jitter, size=(m, m))
    draw = np.triu(draw, 1) + np.triu(draw, 1).T  # the same both ways
    bw = mbps * 1e6 / 8 * draw
    for p in spec.get("pairs", []):
        a, b = int(p["a"]), int(p["b"])
        for x, y in ((a, b), (b, a)) if p.get("both_ways", True) else ((a, b),):
            if "bandwidth_mbps" in p:
                bw[x, y] = float(p["bandwidth_mbps"]) * 1e6 / 8
            if "latency_s" in p:
                lat[x, y] = float(p["latency_s"])
    np.fill_diagonal(lat, 0.0)
    np.fill_diagonal(bw, np.inf)
    return lat, bw


def _check_values(where, names, budget, pre, dec, weights, kv, act, lat, bw, batches) -> None:
    """Every number a solver divides by or adds up must be one it can honour: times >= 0
    (inf = cannot run), no NaN, budgets and bandwidths > 0. A negative time once made the
    planner divide by zero; a NaN one promised a plan that could not exist."""
    for i, dev in enumerate(names):
        if not (np.isfinite(budget[i]) and budget[i] >= 0):
            raise ProfileError(
                f"{where}: devices[{i}] ({dev}).memory_budget = {budget[i]} must be >= 0"
            )
        for what, arr in (("prefill_s", pre[:, i]), ("decode_s", dec[:, i])):
            bad = np.isnan(arr) | (arr < 0)
            if bad.any():
                b, u = (int(x[0]) for x in np.nonzero(bad))
                raise ProfileError(
                    f"{where}: devices[{i}] ({dev}).{what} for unit {u} (batch {batches[b]}) is "
                    f"{arr[b, u]}; times must be >= 0 seconds (null = cannot run); measure again"
                )
    for what, arr in (
        ("weight_bytes", weights),
        ("kv_bytes_per_token", kv),
        ("activation_bytes_per_token", act),
    ):
        if not (np.all(np.isfinite(arr)) and np.all(arr >= 0)):
            raise ProfileError(f"{where}: units.{what} must be finite numbers >= 0")
    off = ~np.eye(len(names), dtype=bool)
    if np.isnan(lat).any() or (lat < 0).any():
        raise ProfileError(f"{where}: links: latencies must be >= 0 seconds")
    if np.isnan(bw).any() or (bw[off] <= 0).any():
        raise ProfileError(f"{where}: links: bandwidths must be > 0")
    if not batches or any(b < 1 for b in batches):
        raise ProfileError(f"{where}: batch_sizes must be integers >= 1")


def profile_from_dict(d: dict, where: str = "profile") -> Profile:
    if d.get("format") != FORMAT:
        raise ProfileError(f"{where}: not an {FORMAT} file (format = {d.get('format')!r})")
    if d.get("version") != VERSION:
        raise ProfileError(
            f"{where}: version {d.get('version')} is not supported (this "
            f"edgeshard_mpi reads version {VERSION})"
        )
    try:
        model = d["model"]
        spec = PRESETS[model] if isinstance(model, str) else ModelSpec.from_dict(model)
        dtype = d.get("dtype", "float32")
        batches = tuple(int(b) for b in d.get("batch_sizes", [1]))
        types = d.get("device_types", {})
        devices = d["devices"]
        m, n = len(devices), spec.n_units
        pre = np.zeros((len(batches), m, n))
        dec = np.zeros((len(batches), m, n))
        names, budget = [], np.zeros(m)
        for i, dev in enumerate(devices):
            base = types.get(dev.get("type"), {}) if dev.get("type") else {}
            if dev.get("type") and dev["type"] not in types:
                raise ProfileError(f"{where}: devices[{i}] has unknown type {dev['type']!r}")
            src = {**base, **dev}
            names.append(str(src.get("name", f"dev{i}")))
            budget[i] = _bytes(src["memory_budget"], f"devices[{i}].memory_budget")
            pre[:, i] = _per_batch(src["prefill_s"], spec, len(batches), f"devices[{i}].prefill_s")
            dec[:, i] = _per_batch(src["decode_s"], spec, len(batches), f"devices[{i}].decode_s")
        units = d.get("units", {})
        db = DTYPE_BYTES[dtype]
        weights = np.array(
            units.get("weight_bytes") or [spec.unit_weight_bytes(u, dtype) for u in range(n)],
            dtype=float,
        )
        kv = np.array(
            units.get("kv_bytes_per_token")
            or [spec.unit_kv_bytes(u, 1, 1, dtype) for u in range(n)],
            dtype=float,
        )
        act = np.array(
            units.get("activation_bytes_per_token")
            or [spec.hidden_size * db] * (n - 1) + [TOKEN_BYTES],
            dtype=float,
        )
        for name, a in (
            ("weight_bytes", weights),
            ("kv_bytes_per_token", kv),
            ("activation_bytes_per_token", act),
        ):
            if a.shape != (n,):
                raise ProfileError(f"{where}: units.{name} needs {n} entries")
        lat, bw = _links(d.get("links", {}), m)
        _check_values(where, names, budget, pre, dec, weights, kv, act, lat, bw, batches)
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ProfileError(f"{where}: meta must be a table (object)")
        for key in PLANNED_META:
            _check_wake(where, key, meta.get(key), m)
        source, cloud = int(d.get("source", 0)), d.get("cloud")
        if not 0 <= source < m or (cloud is not None and not 0 <= int(cloud) < m):
            raise ProfileError(f"{where}: source/cloud must be device indices 0..{m - 1}")
        return Profile(
            spec,
            dtype,
            int(d.get("prompt_tokens", 32)),
            int(d.get("new_tokens", 96)),
            batches,
            tuple(names),
            budget,
            pre,
            dec,
            weights,
            kv,
            act,
            lat,
            bw,
            source,
            None if cloud is None else int(cloud),
            d.get("notes", ""),
            meta,
        )
    except KeyError as e:
        raise ProfileError(f"{where}: missing entry {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ProfileError):
            raise
        raise ProfileError(f"{where}: {e}") from None


PLANNED_META = ("wake_s", "embed_wake_s", "self_wake_s")
"""meta entries the planner reads (Problem.return_s, source_layers_wake_s)."""


def _check_wake(where: str, key: str, v, m: int) -> None:
    """A planned meta entry: M seconds, finite, >= 0."""
    if v is None:
        return
    ok = isinstance(v, list) and len(v) == m
    ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    if not ok or not all(np.isfinite(x) and x >= 0 for x in v):
        raise ProfileError(
            f"{where}: meta.{key} must list {m} seconds (finite, >= 0), one per device; "
            "remove it to plan without that measured wake-up"
        )


def load_profile(path: str | Path) -> Profile:
    """A profile file, or the name of a shipped one (edgeshard-mpi plan --list)."""
    p = Path(path)
    if not p.is_file():
        from importlib import resources

        shipped = resources.files("edgeshard_mpi").joinpath(f"resources/profiles/{path}.json")
        if shipped.is_file():
            return profile_from_dict(json.loads(shipped.read_text()), str(path))
        raise ProfileError(
            f"profile {str(path)!r} not found (neither a file nor one of: "
            f"{', '.join(shipped_profiles())})"
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError (a binary file) is a ValueError
        raise ProfileError(f"{p}: not a JSON profile ({e})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{p}: not a JSON profile (expected an object)")
    return profile_from_dict(data, str(p))


def shipped_profiles() -> list[str]:
    from importlib import resources

    d = resources.files("edgeshard_mpi").joinpath("resources/profiles")
    return sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".json"))
