"""Exact and fast: the latency planner for models whose decoder layers are alike.

In a Llama every decoder layer has the same shape, so on a given device each costs the same
time and memory, and every cut between units carries the same activation. Then a plan is
(1) an ordered set of devices and (2) a layer count per device, and the two separate:
  - given the set S and the last device k, the best layer counts have a closed form (the
    embedding stays on the source, the head on k, every middle device takes >= 1 layer;
    fill the cheapest spare capacity first);
  - the order only changes the hops: the least hop sum over paths from the source through
    exactly S to k is a Held-Karp DP over device subsets, O(2^M M^2) with numpy.
Both are exact, so the best (S, k) is the optimum: 15 devices plan in milliseconds, 20 in
seconds. exact.py uses it for latency when its 2^M tables fit; throughput, and any
per-unit costs, are exact.py's own (the tests check both against brute force).
"""

from __future__ import annotations

import time

import numpy as np

from .plan import Plan, Stage
from .problem import Problem

INF = np.inf
# Candidate bottlenecks are built as fixed + c * layer and divided back; allow rounding.
EPS = 1e-9


def uniform_structure(prob: Problem) -> dict | None:
    """The per-device constants if every decoder layer is alike, else None."""
    n = prob.n_units
    if n < 3:
        return None
    layers = slice(1, n - 1)
    c = prob.compute[:, layers]
    same = np.all((c == c[:, :1]) | (np.isinf(c) & np.isinf(c[:, :1])), axis=1)
    mem = prob.memory[layers]
    acts = prob.w_prefill * prob.act_prefill[: n - 1] + prob.w_decode * prob.act_decode[: n - 1]
    if not (same.all() and np.all(mem == mem[0]) and np.all(acts == acts[0])):
        return None
    return {
        "layer_s": c[:, 0].copy(),
        "embed_s": prob.compute[:, 0].copy(),
        "head_s": prob.compute[:, n - 1].copy(),
        "layer_mem": float(mem[0]),
        "embed_mem": float(prob.memory[0]),
        "head_mem": float(prob.memory[n - 1]),
        "layers": n - 2,
    }


def _caps(u: dict, budget: np.ndarray, src: int) -> tuple[np.ndarray, np.ndarray]:
    """Layers each device can hold in the middle, and as the last device (holding the head);
    the source also holds the embedding. -1 = cannot take that role at all."""
    m = len(budget)
    room_mid = budget.copy()
    room_mid[src] -= u["embed_mem"]
    room_last = room_mid - u["head_mem"]
    lm = u["layer_mem"]
    can_layer = np.isfinite(u["layer_s"])

    def layers(room):
        k = np.floor(room / lm) if lm > 0 else np.full(m, float(u["layers"]))
        k = np.where(can_layer, np.minimum(k, u["layers"]), 0)
        return np.where(room >= 0, k, -1)

    mid, last = layers(room_mid), layers(room_last)
    last = np.where(np.isfinite(u["head_s"]), last, -1)
    if not np.isfinite(u["embed_s"][src]):
        mid[src] = last[src] = -1
    return mid, last


def _subset_sums(values: np.ndarray) -> np.ndarray:
    """sums[S] = sum of values[d] for d in S, for every subset S (2^M)."""
    m = len(values)
    out = np.zeros(1 << m)
    for d in range(m):
        out[1 << d : 2 << d] = out[: 1 << d] + values[d]
    return out


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x.astype(np.uint64)).astype(np.int64)


def _held_karp(hop: np.ndarray, src: int):
    """best[S, k]: least hop sum over paths from src through exactly S
    (src in S) ending at k; prev[S, k] the device before k."""
    m = hop.shape[0]
    full = 1 << m
    best = np.full((full, m), INF)
    prev = np.full((full, m), -1, dtype=np.int16)
    best[1 << src, src] = 0.0
    subsets = np.arange(full)
    pop = _popcount(subsets)
    has_src = (subsets >> src) & 1 == 1
    bits = np.arange(m)
    for c in range(1, m):
        level = subsets[(pop == c) & has_src]
        # (S + j, j) is reached from S alone, so every target is written exactly once.
        for lo in range(0, len(level), 8192):  # bounds the [C, k, j] temporary
            chunk = level[lo : lo + 8192]
            vals = best[chunk][:, :, None]  # [C, k, 1]; inf where k is not in S
            cand = vals + hop[None]
            k = cand.argmin(axis=1)  # [C, j]
            cv = np.take_along_axis(cand, k[:, None, :], 1)[:, 0, :]
            ci, j = np.nonzero((chunk[:, None] >> bits[None, :]) & 1 == 0)
            tgt = chunk[ci] | (1 << j)
            best[tgt, j] = cv[ci, j]
            prev[tgt, j] = k[ci, j]
    return best, prev


def _path(prev: np.ndarray, s: int, k: int) -> list[int]:
    out = []
    while k >= 0:
        out.append(k)
        s, k = s & ~(1 << k), int(prev[s, k])
    return out[::-1]


def _allocate_latency(u, order, caps_mid, caps_last, layers, src="any") -> list[int] | None:
    """Layer counts for a path minimising compute: lower bounds first, then cheapest.
    `src`: the source (order[0], not last) takes "any" number of layers, "none" or "some"."""
    n = len(order)
    lo = [0 if (t == 0 or t == n - 1) else 1 for t in range(n)]
    hi = [caps_last[d] if t == n - 1 else caps_mid[d] for t, d in enumerate(order)]
    if n > 1 and src == "none":
        hi[0] = 0
    elif n > 1 and src == "some":
        lo[0] = 1
    if any(h < lo_ for h, lo_ in zip(hi, lo, strict=True)) or sum(hi) < layers:
        return None
    counts = list(lo)
    left = layers - sum(lo)
    for t in sorted(range(n), key=lambda t: (u["layer_s"][order[t]], t)):
        take = int(min(hi[t] - counts[t], left))
        counts[t] += take
        left -= take
    return counts if left == 0 else None


def _stages(order: list[int], counts: list[int], n_units: int) -> tuple[Stage, ...]:
    out, pos = [], 0
    for t, (d, k) in enumerate(zip(order, counts, strict=True)):
        start = 0 if t == 0 else pos + 1
        pos += k
        end = n_units if t == len(order) - 1 else pos + 1
        out.append(Stage(int(d), start, end))
    return tuple(out)


def solve_uniform(prob: Problem, devices: list[int] | None, strategy: str, u: dict) -> Plan | None:
    """The least-latency plan, or None if nothing fits."""
    t0 = time.perf_counter()
    src = prob.source
    devices = sorted(set(range(prob.n_devices) if devices is None else devices) | {src})
    idx = np.asarray(devices)
    m, layers, n = len(devices), u["layers"], prob.n_units
    sub = {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in u.items()}
    s0 = devices.index(src)
    caps_mid, caps_last = _caps(sub, prob.profile.memory_budget[idx], s0)
    hop = prob.hop_matrix()[1][idx][:, idx]  # every interior cut carries the same bytes
    ret = prob.return_s()[idx]
    lat_s, emb_s, head_s = sub["layer_s"], sub["embed_s"][s0], sub["head_s"]
    full = 1 << m
    subsets = np.arange(full)
    inside = ((subsets[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)  # [S, d]
    has_src = inside[:, s0]
    # Middle devices must take >= 1 layer: a subset whose middle has a device that cannot
    # is out (the last device is exempt; checked per k below).
    cannot_mid = (caps_mid < 1).astype(float)
    cannot_mid[s0] = 0
    bad_mid = _subset_sums(cannot_mid)  # [S] how many members cannot be middle
    best, prev = _held_karp(hop, s0)
    args = (sub, caps_mid, caps_last, s0, inside, has_src, bad_mid, cannot_mid, layers)
    value = _latency_values(*args, emb_s, head_s, lat_s)
    # A source stage past the embedding pays a wake-up the embedding alone does not
    # (Problem.source_layers_wake_s): the source holding none and some layers, apart.
    extra, src_layers = prob.source_layers_wake_s(), "any"
    if extra > 0:
        none = _latency_values(*args, emb_s, head_s, lat_s, src="none")
        some = _latency_values(*args, emb_s, head_s, lat_s, src="some")
        some[:, np.arange(m) != s0] += extra  # the source alone (k == s0) pays none
        value = np.minimum(none, some)
    total = value + best + ret[None, :]
    if not np.isfinite(total).any():
        return None
    # Ties (common for bottlenecks): fewest devices, then the smaller index.
    pop = _popcount(subsets)
    tied = np.where(total == total.min(), pop[:, None], np.iinfo(np.int64).max)
    s, k = np.unravel_index(int(np.argmin(tied)), tied.shape)
    s, k = int(s), int(k)
    order = _path(prev, s, k)
    if extra > 0 and k != s0:
        src_layers = "none" if none[s, k] <= some[s, k] else "some"
    counts = _allocate_latency(sub, order, caps_mid, caps_last, layers, src_layers)
    stages = _stages([devices[d] for d in order], counts, n)
    return Plan(
        stages,
        strategy,
        "latency",
        {"algorithm": "uniform-held-karp", "solve_s": time.perf_counter() - t0},
    )


def _latency_values(
    sub, caps_mid, caps_last, s0, inside, has_src, bad_mid, cannot_mid, layers, emb_s, head_s,
    lat_s, src="any",
) -> np.ndarray:  # fmt: skip
    """[S, k]: least compute of placing every unit on exactly S with the head on k: one
    layer per middle device, then the cheapest spare capacity first. `src`: when it is not
    the last device, the source takes "any" number of layers, "none" or "some" (>= 1)."""
    full, m = inside.shape
    out = np.full((full, m), INF)
    order = np.argsort(lat_s, kind="stable")
    fl = np.where(np.isfinite(lat_s), lat_s, 0.0)
    pop = _popcount(np.arange(full))
    sum_lat = _subset_sums(fl)
    for k in range(m):
        if caps_last[k] < 0 or (k != s0 and caps_mid[s0] < 0):
            continue
        ok = has_src & inside[:, k] & (bad_mid - cannot_mid[k] * (k != s0) == 0)
        some = int(src == "some" and k != s0)  # layers the source must take first
        if some and caps_mid[s0] < 1:
            continue
        if k == s0:  # the source alone
            ok &= pop == 1
            cost = np.full(full, emb_s + head_s[k])
            left = np.full(full, float(layers))
        else:
            cost = emb_s + head_s[k] + sum_lat - fl[k] - (0 if some else fl[s0])
            left = layers - (pop - 2 + some).astype(float)
        ok &= left >= 0
        left = np.maximum(left, 0)
        for d in order:
            if d == k:
                spare = caps_last[k]
            elif d == s0:
                spare = {"any": caps_mid[d], "none": 0, "some": caps_mid[d] - 1}[src]
            else:
                spare = caps_mid[d] - 1
            if spare <= 0:
                continue
            take = np.minimum(inside[:, d] * spare, left)
            cost += take * fl[d]
            left -= take
        out[:, k] = np.where(ok & (left == 0), cost, INF)
    return out
