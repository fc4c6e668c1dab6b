"""Sequence-pass profiling (seqprofile.py): units timed inside whole generations of one
Stage, the way a run calls them. Tiny model, one process: fast."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from edgeshard_mpi import emulation
from edgeshard_mpi.kernels import load_stage
from edgeshard_mpi.presets import PRESETS
from edgeshard_mpi.profile import CacheFlusher, measure_units
from edgeshard_mpi.seqprofile import WAKE_GAP_S, _idle, _segments, time_segment
from edgeshard_mpi.weights import weight_source

CPU = torch.device("cpu")


def test_segments_split_where_units_are_not_consecutive():
    assert _segments([0, 1, 2, 3, 9]) == [[0, 1, 2, 3], [9]]
    assert _segments([5]) == [[5]]


def test_units_of_a_call_sum_to_the_call_under_emulation():
    spec = PRESETS["tiny"]
    src = weight_source("tiny", spec, "float32", 0)
    stage = load_stage(spec, 0, spec.n_units, "float32", CPU, src, "fast")
    emulation.configure("os", 4.0)
    try:
        pre, dec = time_segment(stage, list(range(spec.n_units)), 1, 8, 6, 1, 2, CPU,
                                CacheFlusher(False))  # fmt: skip
    finally:
        emulation.configure("none")
    assert set(pre) == set(dec) == set(range(spec.n_units))
    assert all(v > 0 for v in [*pre.values(), *dec.values()])
    # No timing comparison here: on the tiny model a prefill of 8 tokens and a decode step
    # cost the same ~0.15 ms a layer, and a dilated sleep's overshoot decides which is larger.


@pytest.mark.parametrize("method", ["sequence", "units"])
def test_measure_units_fills_every_unit(method):
    spec = PRESETS["tiny"]
    src = weight_source("tiny", spec, "float32", 0)
    pre, dec = measure_units(spec, src, "float32", CPU, 1e9, [1], 8, 14, 1, 2,
                             sample_layers=1, cold=False, method=method)  # fmt: skip
    assert pre.shape == dec.shape == (1, spec.n_units)
    assert np.isfinite(pre).all() and np.isfinite(dec).all() and (dec > 0).all()
    layers = dec[0, 1:-1]
    assert np.allclose(layers, layers[0])  # alike layers share one cost


def test_wake_cost_is_measured_on_an_emulated_device():
    from edgeshard_mpi.seqprofile import wake_cost

    spec = PRESETS["tiny"]
    src = weight_source("tiny", spec, "float32", 0)
    emulation.configure("transport", 4.0)
    try:
        w = wake_cost(spec, src, "float32", CPU, 1e9, CacheFlusher(True), "fast")
        nofit = wake_cost(spec, src, "float32", CPU, 1.0, CacheFlusher(False), "fast")
        embed = wake_cost(spec, src, "float32", CPU, 1e9, CacheFlusher(True), "fast", unit=0)
    finally:
        emulation.configure("none")
    # Its size follows the host's other work (0.3-1.5 ms of CPU on `small`); only that it
    # is a cost, and small next to the wait it follows.
    assert 0.0 <= w < 4.0 * WAKE_GAP_S and nofit == 0.0
    assert 0.0 <= embed < 4.0 * WAKE_GAP_S


def test_the_wake_measurement_waits_asleep_while_memory_streams():
    """The wait before a woken call is the run's: asleep for WAKE_GAP_S while another
    thread streams memory (other stages computing), and the streaming has stopped when
    the timed call starts."""
    import threading

    calls, where = [], set()

    def stream():
        calls.append(time.perf_counter())
        where.add(threading.get_ident())
        time.sleep(0.001)

    t0, c0 = time.perf_counter(), time.thread_time()
    _idle(0.1, stream)
    t1, c1 = time.perf_counter(), time.thread_time()
    n = len(calls)
    time.sleep(0.01)
    assert 0.1 <= t1 - t0 < 0.5  # a loaded host wakes naps late; the bound is loose
    assert c1 - c0 < 0.003  # the waiting thread slept (2 ms naps), it did not poll
    assert n >= 20 and len(calls) == n  # it streamed, and stopped before the call
    assert threading.get_ident() not in where
    assert max(calls) <= t1
