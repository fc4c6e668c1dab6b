"""Profiling: measure every unit on every device and every link, gather a Profile on rank 0.

Units: each rank times each planning unit alone (its own Stage), for prefill (batch b,
prompt_tokens tokens) and for one decode step with the KV cache at mid-generation, after
warm-up, taking the median of repeats. A rank loads a group of units that fits its memory
budget, times them, frees them, and loads the next (the paper's dynamic loading), so a
device can profile a model it could never hold. Ranks on one host take turns so they do
not slow each other down. Decoder layers share one shape, so their true cost is one number
per device: the per-layer medians are replaced by their median (the spread is noise), which
also lets the planner use its exact fast path.

Links: every ordered pair by ping-pong, in round-robin rounds (linkprofile.py).

On an emulated testbed device (emulation.py): under a CFS quota a unit's time is the mean
over whole quota periods (a median of short calls would miss the throttling), transfers on
tc-shaped links grow to >= 0.25 s (htb starts with a full bucket), and links are measured
with the CPU quota lifted (a throttled rank answers late and would read as a slow link).
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import torch

from . import emulation, watchdog
from .contention import Loop, host_cores, host_factor
from .kernels import load_stage
from .linkprofile import measure_links
from .model import Stage, first_position, position_ids
from .planner.profiles import TOKEN_BYTES, Profile
from .presets import DTYPE_BYTES, ModelSpec
from .weights import CheckpointError

EMULATED_ROUNDS = 3
SEQUENCE_MIN_LAYERS = 3


def _groups(spec: ModelSpec, units: list[int], dtype: str, budget: float) -> list[list[int]]:
    """Consecutive units whose weights fit in half the budget (the rest for activations,
    the KV cache and the runtime); a unit that alone is too big gets a group of its own
    (and will be marked as not runnable on this device)."""
    groups, cur, size = [], [], 0.0
    for u in units:
        w = spec.unit_weight_bytes(u, dtype)
        if cur and size + w > budget / 2:
            groups.append(cur)
            cur, size = [], 0.0
        cur.append(u)
        size += w
    if cur:
        groups.append(cur)
    return groups


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), or 64 MiB when it cannot be read."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            best = max(best, int(text[:-1]) * {"K": 2**10, "M": 2**20}.get(text[-1], 1))
        except (OSError, ValueError):
            continue
    return best or 64 * 2**20


class CacheFlusher:
    """Evicts the CPU caches by reading a buffer twice the last-level cache. A unit timed
    over and over keeps its weights hot in cache, but in a real run other stages evict
    them between visits; timing after a flush measures the run's (cold) cost. Reading,
    not writing: dirty lines would be written back during the timed call. Measured (one
    decode step, mini-7b, this host): units summed after a read flush 1.04-1.12x the whole
    model's step, after a write flush 1.15-1.2x, warm 0.4-0.46x."""

    def __init__(self, enabled: bool):
        self.buf = torch.ones(2 * llc_bytes() // 4, dtype=torch.float32) if enabled else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.sum()


def _median_time(fn, warmup: int, repeats: int, flush) -> float:
    for _ in range(warmup):
        fn()
    if emulation.QUOTA:
        # Under a CFS quota a short call runs at full speed or waits out the period: a
        # median would miss the throttling. Average over whole periods instead.
        n, t0 = 0, time.perf_counter()
        while n < repeats or time.perf_counter() - t0 < emulation.WINDOW_S:
            fn()
            n += 1
        return (time.perf_counter() - t0) / n
    times = []
    for _ in range(repeats):
        flush()
        t0, c0 = time.perf_counter(), emulation.cpu_now()
        fn()
        times.append(emulation.charged(t0, c0))
    return float(np.median(times))


def _time_unit(
    stage: Stage, batch: int, prompt: int, context: int, warmup: int, repeats: int, device, flush
) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one unit."""
    spec, u = stage.spec, stage.start
    if u == 0:
        pre_in = torch.randint(3, spec.vocab_size, (batch, prompt), device=device)
        dec_in = pre_in[:, :1]
    else:
        pre_in = torch.randn(batch, prompt, spec.hidden_size, dtype=stage.dtype, device=device)
        dec_in = pre_in[:, :1].contiguous()
    cache = stage.new_cache(batch, context)
    pos_pre = position_ids(batch, prompt, 0).to(device)

    def prefill():
        if cache is not None:
            cache.reset()
        stage(pre_in, cache, pos_pre, 0)
        _sync(device)

    t_pre = _median_time(prefill, warmup, repeats, flush)
    # Decode at mid-generation: rewind the cache to the same length before every step,
    # so each repeat sees the same context (and a warm mask) and only the layer is timed.
    step = (context - prompt) // 2 + 1
    mid = prompt + step - 1
    pos_dec = position_ids(batch, prompt, step).to(device)
    if cache is not None:
        Stage.rewind(cache, mid)

    def decode():
        if cache is not None:
            Stage.rewind(cache, mid)
        stage(dec_in, cache, pos_dec, first_position(prompt, step))
        _sync(device)

    t_dec = _median_time(decode, warmup, repeats, flush)
    return t_pre, t_dec


def _sync(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def measure_units(
    spec: ModelSpec,
    source,
    dtype: str,
    device,
    budget: float,
    batch_sizes: list[int],
    prompt: int,
    context: int,
    warmup: int,
    repeats: int,
    sample_layers: int = 0,
    log=None,
    cold: bool = True,
    kernels: str = "fast",
    method: str = "sequence",
) -> tuple[np.ndarray, ...]:
    """[len(batch_sizes), N] prefill and decode seconds on this rank; inf where a unit
    does not fit. `sample_layers` > 0 times only that many decoder layers (evenly spread;
    method "sequence": the first ones, consecutive) and gives every layer their median.
    `cold`: flush CPU caches before each timing (each token, method "sequence").
    `method`: "sequence" times units inside whole generations of one Stage, as the run
    calls them (seqprofile.py); "units" times each unit alone."""
    flush = CacheFlusher(cold and getattr(device, "type", "cpu") == "cpu")
    n = spec.n_units
    pre = np.full((len(batch_sizes), n), np.inf)
    dec = np.full((len(batch_sizes), n), np.inf)
    layer_units = list(range(1, n - 1))
    sequence = method == "sequence" and not emulation.QUOTA
    firsts = {spec.unit_kind(u): u for u in reversed(range(1, n - 1))}
    if sequence and sample_layers and sample_layers < len(layer_units):
        # The first layers, consecutive (one Stage), far enough to hold every kind, and at
        # least SEQUENCE_MIN_LAYERS: the first layer after a cache flush also reloads the
        # code path the others then find warm (measured, `small`: one sampled layer read
        # 0.43 ms, the layers of a series 0.29, the model 1.3x its run).
        layer_units = layer_units[: max(sample_layers, SEQUENCE_MIN_LAYERS, max(firsts.values()))]
    elif sample_layers and sample_layers < len(layer_units):
        pick = np.linspace(0, len(layer_units) - 1, sample_layers).round().astype(int)
        layer_units = sorted({layer_units[i] for i in pick})
    # Every kind of layer is timed at least once when sampling.
    layer_units = sorted(set(layer_units) | set(firsts.values()))
    units = [0, *layer_units, n - 1]
    if sequence:
        from .seqprofile import measure_groups

        groups = _groups(spec, units, dtype, budget)
        measure_groups(spec, source, dtype, device, groups, budget, batch_sizes, prompt,
                       context - prompt, warmup, repeats, flush, kernels, pre, dec,
                       log)  # fmt: skip
        groups = []
    else:
        groups = _groups(spec, units, dtype, budget)
    for group in groups:
        stages = {}
        for u in group:
            if spec.unit_weight_bytes(u, dtype) > budget / 2:
                continue  # cannot hold it: stays inf
            stages[u] = load_stage(spec, u, u + 1, dtype, device, source, kernels)
        for u, st in stages.items():
            for bi, b in enumerate(batch_sizes):
                pre[bi, u], dec[bi, u] = _time_unit(
                    st, b, prompt, context, warmup, repeats, device, flush
                )
        if log is not None:
            log(f"units {group[0]}..{group[-1]} timed")
        del stages
    # Alike layers get one cost (their spread is noise): the median within each kind
    # (sliding vs full attention, MoE vs dense, another width); layers of different kinds
    # keep their own times, and the planner plans over the non-uniform units. Sequence
    # passes: the mean, so the first layer's cold start in each call (code and caches
    # reloaded after the other stages ran) is counted, spread over the layers.
    average = np.mean if sequence else np.median
    kinds: dict[str, list[int]] = {}
    for u in range(1, n - 1):
        kinds.setdefault(spec.unit_kind(u), []).append(u)
    for arr in (pre, dec):
        for members in kinds.values():
            timed = arr[:, members]
            med = np.array(
                [
                    average(row[np.isfinite(row)]) if np.isfinite(row).any() else np.inf
                    for row in timed
                ]
            )
            arr[:, members] = med[:, None]
    return pre, dec


# -- the whole cluster ---------------------------------------------------------------------


def _wake(spec, source, dtype, device, me, cold: bool, kernels: str) -> tuple[float, float]:
    """An emulated device's wake-up cost per stage call (seqprofile.wake_cost), and the
    same for a stage holding the embedding alone (what EdgeShard gives a weak source;
    Problem.source_layers_wake_s; the layer's figure where the embedding does not fit in
    half the budget); (0, 0) on real hardware, where they are not measured yet."""
    if emulation.MODE == "none":
        return 0.0, 0.0
    from .seqprofile import wake_cost

    flush = CacheFlusher(cold and getattr(device, "type", "cpu") == "cpu")
    layer = wake_cost(spec, source, dtype, device, me.memory_budget, flush, kernels)
    if spec.n_units <= 2 or spec.unit_weight_bytes(0, dtype) > me.memory_budget / 2:
        return layer, layer
    embed = wake_cost(spec, source, dtype, device, me.memory_budget, flush, kernels, unit=0)
    return layer, embed


def profile_cluster(
    tp,
    spec: ModelSpec,
    source,
    dtype: str,
    device,
    devices,
    batch_sizes,
    prompt: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    sample_layers: int,
    link_repeats: int,
    cloud: int | None,
    log,
    cold: bool = True,
    kernels: str = "fast",
    method: str = "sequence",
) -> Profile:
    """Every rank measures; the Profile is returned on every rank."""
    me = devices[tp.rank]
    # A stable hash: Python's hash() of a string differs from process to process.
    host_comm = tp.comm.Split(color=zlib.crc32(me.host.encode()) & 0x7FFFFFFF, key=tp.rank)
    t0 = time.perf_counter()
    # Emulated devices charge host CPU time, whose speed drifts with the host's other work
    # (seen: 1.6x): time every device in several rounds, turns interleaved, and keep the
    # median, so each device's numbers span the same stretch of time.
    rounds = EMULATED_ROUNDS if emulation.MODE != "none" else 1
    runs = []
    # Ranks that share a host also share its cores in a pipelined run: time a stage loop
    # alone (in the first turn) and with every rank of the host at once (contention.py).
    shared = host_comm.Get_size() > 1
    loop, solo = None, float("nan")
    wake = embed_wake = 0.0
    for r in range(rounds):
        result = None
        for turn in range(host_comm.Get_size()):  # ranks of one host take turns
            if host_comm.Get_rank() == turn:
                try:
                    result = measure_units(
                        spec,
                        source,
                        dtype,
                        device,
                        me.memory_budget,
                        list(batch_sizes),
                        prompt,
                        prompt + new_tokens,
                        warmup,
                        repeats,
                        sample_layers,
                        cold=cold,
                        kernels=kernels,
                        method=method,
                    )
                    if r == 0:  # its 2 x 5 waits of 250 ms once per profile, not per round
                        wake, embed_wake = _wake(spec, source, dtype, device, me, cold, kernels)
                    # [wake, self-wake, embedding's]: a dilated device sleeps its stretch
                    # after every call, so even a one-stage plan's calls start cold
                    # (Problem.return_s).
                    selfwake = wake if emulation.SLOWDOWN > 1.0 else 0.0
                    result = (*result, np.array([wake, selfwake, embed_wake]))
                    if shared and r == 0:
                        loop = Loop(spec, source, dtype, device, me.memory_budget, kernels)
                        solo = loop.run()
                except CheckpointError as e:  # every rank must still reach the barriers
                    result = f"[rank {tp.rank}] {e}"
            tp.quiet_wait(host_comm.Ibarrier())  # not sleep_wait: see quiet_wait
            # A turn ended: progress. (15 ranks on 2 busy cores profiled for 315 s; the
            # watchdog then took the link measurement's first waits for a stall.)
            watchdog.beat()
        runs.append(result)
    at_cores, together = host_factor(loop, solo, shared, host_comm, tp)  # ranks at once
    host_comm.Free()
    contention = tp.allgather((together, host_cores(), at_cores))
    bad = [r for r in runs if isinstance(r, str)]
    if bad:
        result = bad[0]
    else:
        result = tuple(np.median(np.stack(x), axis=0) for x in zip(*runs, strict=True))
    times = tp.allgather(result)
    failed = [t for t in times if isinstance(t, str)]
    if failed:
        raise CheckpointError("; ".join(failed))
    log(f"profiled {spec.n_units} units on {tp.size} ranks in {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    link_lat, bw = measure_links(tp, link_repeats)
    log(f"measured {tp.size * (tp.size - 1)} links in {time.perf_counter() - t1:.1f} s")
    # A hop also wakes its receiver: its next stage call costs more than a profiled one
    # (seqprofile.wake_cost); charged with the hop, once per stage call as the run pays it.
    wake = np.array([float(t[2][0]) for t in times])
    self_wake = np.array([float(t[2][1]) for t in times])
    embed_wake = np.array([float(t[2][2]) for t in times])
    lat = link_lat + wake[None, :] * (1.0 - np.eye(tp.size))
    if wake.any():
        log("wake-up cost per stage call (ms): " + " ".join(f"{w * 1e3:.2f}" for w in wake))
        log("  an embedding-only stage's (ms): " + " ".join(f"{w * 1e3:.2f}" for w in embed_wake))
    if shared:
        log("contention (as many ranks of a host as cores at once / alone): "
            + " ".join(f"{c[2]:.2f}" for c in contention))  # fmt: skip
        log("contention (all ranks of a host at once / alone): "
            + " ".join(f"{c[0]:.2f}" for c in contention))  # fmt: skip
    n = spec.n_units
    act = np.array([spec.hidden_size * DTYPE_BYTES[dtype]] * (n - 1) + [TOKEN_BYTES], float)
    return Profile(
        model=spec,
        dtype=dtype,
        prompt_tokens=prompt,
        new_tokens=new_tokens,
        batch_sizes=tuple(batch_sizes),
        names=tuple(d.name for d in devices),
        memory_budget=np.array([d.memory_budget for d in devices], dtype=float),
        prefill_s=np.stack([t[0] for t in times], axis=1),
        decode_s=np.stack([t[1] for t in times], axis=1),
        weight_bytes=np.array([spec.unit_weight_bytes(u, dtype) for u in range(n)], float),
        # Per context token on average over this profile's context: a sliding-window layer
        # holds at most its window, so its share shrinks as the context grows past it.
        kv_bytes_per_token=np.array(
            [spec.unit_kv_bytes(u, 1, prompt + new_tokens, dtype) for u in range(n)], float
        )
        / (prompt + new_tokens),
        activation_bytes_per_token=act,
        latency_s=lat,
        bandwidth=bw,
        source=0,
        cloud=cloud,
        notes="measured by edgeshard-mpi",
        meta={
            "hosts": [d.host for d in devices],
            "threads": [d.threads for d in devices],
            "kernels": kernels,
            "method": method,
            "wake_s": wake.tolist(),
            "self_wake_s": self_wake.tolist(),
            "embed_wake_s": embed_wake.tolist(),
            "contention": [c[0] for c in contention],
            "host_cores": [c[1] for c in contention],
            "contention_cores": [c[2] for c in contention],
            "link_latency_s": link_lat.tolist(),
        },
    )
