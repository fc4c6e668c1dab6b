"""Profiling the links: every ordered pair's latency and bandwidth, measured by ping-pong.

In round-robin rounds (O(M) rounds, disjoint pairs in parallel), each ordered pair times a
small message and a large one, each answered by a 1-byte ack; latency = small time / 2,
bandwidth = (large - small bytes) / (large - small time). The large size grows until a
transfer takes >= 20 ms (>= 0.25 s on an emulated testbed, whose tc-shaped links start
with a full token bucket), so slow and fast links are both measured in reasonable time.
"""

from __future__ import annotations

import time

import numpy as np

from . import emulation, watchdog

SMALL_BYTES = 8
LARGE_START, LARGE_MAX = 64 * 1024, 32 * 1024 * 1024
LARGE_MIN_S = 0.02


def _rounds(m: int) -> list[list[tuple[int, int]]]:
    """Round-robin tournament (circle method): every pair once, in m - 1 (or m) rounds."""
    ids = list(range(m)) + ([-1] if m % 2 else [])
    k = len(ids)
    out = []
    for _ in range(k - 1):
        pairs = [(ids[i], ids[k - 1 - i]) for i in range(k // 2)]
        out.append([(min(a, b), max(a, b)) for a, b in pairs if a >= 0 and b >= 0])
        ids = [ids[0], ids[-1], *ids[1:-1]]
    return out


def _one_way(tp, peer: int, size: int, repeats: int, sender: bool) -> float:
    """Median seconds for `size` bytes to reach the peer and a 1-byte ack to come back."""
    payload = np.zeros(size, dtype=np.uint8)
    ack = np.zeros(1, dtype=np.uint8)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if sender:
            t0 = time.perf_counter()
            tp.sleep_wait(tp.isend_buf(payload, peer, 7))
            tp.sleep_wait(tp.comm.Irecv(ack, source=peer, tag=8))
            times.append(time.perf_counter() - t0)
        else:
            tp.sleep_wait(tp.comm.Irecv(payload, source=peer, tag=7))
            tp.sleep_wait(tp.isend_buf(ack, peer, 8))
    return float(np.median(times[1:])) if sender else 0.0


def _direction(tp, peer: int, repeats: int, sender: bool) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) from this rank to `peer` when `sender`."""
    small = _one_way(tp, peer, SMALL_BYTES, repeats, sender)
    size = LARGE_START
    while True:
        large = _one_way(tp, peer, size, repeats, sender)
        grow = np.zeros(1, dtype=np.int8)
        if sender:
            # Shaped links (a testbed's tc) start with a full token bucket: time longer
            # transfers there, so the burst is a small part of them.
            least = LARGE_MIN_S if emulation.MODE == "none" else 0.25
            grow[0] = 1 if large < least and size < LARGE_MAX else 0
            tp.sleep_wait(tp.comm.Isend(grow, dest=peer, tag=9))
        else:
            tp.sleep_wait(tp.comm.Irecv(grow, source=peer, tag=9))
        if not grow[0]:
            break
        size *= 4
    if not sender:
        return 0.0, 0.0
    extra = max(large - small, 1e-9)
    return small / 2, (size - SMALL_BYTES) / extra


def measure_links(tp, repeats: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair's latency and bandwidth, gathered on every rank."""
    m, me = tp.size, tp.rank
    lat = np.zeros(m)
    bw = np.full(m, np.inf)
    for pairs in _rounds(m):
        tp.quiet_barrier()
        watchdog.beat()  # a round began: every rank got this far
        for a, b in pairs:
            if me not in (a, b):
                continue
            peer = b if me == a else a
            for src in (a, b):  # a -> b, then b -> a
                got = _direction(tp, peer, repeats, sender=me == src)
                if me == src:
                    lat[peer], bw[peer] = got
    rows = tp.allgather((lat, bw))
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
