"""The paper bench's derived profiles (bench/paper_profiles.py): a bandwidth point scales the
source-cloud link only; the NX-source testbed is the same devices reordered, the slow link
moved with the source."""

from __future__ import annotations

import numpy as np

from edgeshard_mpi.bench.paper_profiles import moved_source, scaled_link
from edgeshard_mpi.planner.problem import load_profile


def _base(tmp_path):
    path = tmp_path / "base.json"
    load_profile("paper-llama2-7b").save(path)
    return path, load_profile(path)


def test_scaled_link_changes_that_link_only(tmp_path):
    path, base = _base(tmp_path)
    s, c = base.source, base.cloud
    got = load_profile(scaled_link(path, tmp_path / "bw.json", s, c, 1.0, 10.0))
    assert np.isclose(got.bandwidth[s, c], 10 * base.bandwidth[s, c])
    assert np.isclose(got.bandwidth[c, s], 10 * base.bandwidth[c, s])
    mask = np.ones_like(base.bandwidth, bool)
    mask[s, c] = mask[c, s] = False
    assert np.array_equal(got.bandwidth[mask], base.bandwidth[mask])
    assert np.array_equal(got.decode_s, base.decode_s)


def test_moved_source_reorders_devices_and_moves_the_slow_link(tmp_path):
    path, base = _base(tmp_path)
    nx = base.names.index("nx-0")
    order = [nx] + [i for i in range(len(base.names)) if i != nx]
    got = load_profile(moved_source(path, tmp_path / "nx.json", order))
    c = got.cloud
    assert got.names[0] == "nx-0" and got.names[1] == "agx-0" and got.source == 0
    assert got.names[c] == "cloud-3090"
    assert np.array_equal(got.decode_s[:, 0], base.decode_s[:, nx])
    assert np.array_equal(got.memory_budget, base.memory_budget[order])
    # the NX source now has the AGX source's slow link to the cloud, the AGX an ordinary one
    assert got.bandwidth[0, c] == base.bandwidth[base.source, base.cloud]
    assert got.bandwidth[c, 0] == base.bandwidth[base.cloud, base.source]
    assert got.bandwidth[1, c] == base.bandwidth[nx, base.cloud]
    assert got.bandwidth[0, c] < got.bandwidth[1, c] / 10
    # links between edge devices move with them
    assert got.bandwidth[0, 2] == base.bandwidth[nx, 1]


def test_moved_source_charges_each_receiver_its_own_wake_up(tmp_path):
    # A measured profile's hop latency = link + the receiver's wake-up cost: after the
    # reorder each hop must carry its new receiver's cost, not the one the swap brought.
    from dataclasses import replace

    _, base = _base(tmp_path)
    n = len(base.names)
    rng = np.random.default_rng(0)
    link = rng.uniform(1e-3, 5e-3, (n, n)) * (1 - np.eye(n))
    wake = rng.uniform(0, 4e-3, n)
    meta = dict(base.meta, link_latency_s=link.tolist(), wake_s=wake.tolist())
    lat = link + wake[None, :] * (1 - np.eye(n))
    measured = tmp_path / "measured.json"
    replace(base, latency_s=lat, meta=meta).save(measured)
    nx = base.names.index("nx-0")
    order = [nx] + [i for i in range(n) if i != nx]
    got = load_profile(moved_source(measured, tmp_path / "nx.json", order))
    w = np.asarray(got.meta["wake_s"])
    assert np.allclose(w, wake[order])
    off = ~np.eye(n, dtype=bool)
    rest = got.latency_s - np.asarray(got.meta["link_latency_s"])
    assert np.allclose(rest[off], np.broadcast_to(w[None, :], (n, n))[off])
