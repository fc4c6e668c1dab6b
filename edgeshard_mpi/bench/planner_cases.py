"""Planner benchmark instances: the paper's testbed resized, its layers made non-uniform,
its devices made alike (types) or all distinct."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..planner.problem import Problem, Profile, make_problem, profile_from_dict
from ..planner.roofline import paper_testbed


def testbed_profile(
    model: str = "llama2-70b",
    devices: int = 15,
    nx: int = 2,
    units: int | None = None,
    jitter: float = 0.0,
    typed: bool = False,
    seed: int = 0,
) -> Profile:
    """The paper testbed with `devices` in all (source AGX, AGX, `nx` Orin NX, the cloud
    RTX 3090 last). units: stretch the model to that many units (each layer split in
    equal parts, times and bytes shared). jitter: every device's per-unit times scaled by
    U(1 - j, 1 + j) (non-uniform layers, as Gemma-style or MoE profiles have). typed:
    links equal per pair of types (no per-pair jitter), so alike devices collapse."""
    d = paper_testbed(model, batch_sizes=(1,), n_agx=devices - nx - 1, n_nx=nx)
    if typed:
        d["links"]["default"]["jitter"] = 0.0
    prof = profile_from_dict(d, "testbed")
    if units is not None and units != prof.n_units:
        prof = _stretch(prof, units)
    if jitter:
        rng = np.random.default_rng(seed)
        n_dev, n = prof.n_devices, prof.n_units
        if typed:  # one draw per type keeps alike devices alike
            keys = [prof.prefill_s[0, k].tobytes() for k in range(n_dev)]
            uniq = {k: rng.uniform(1 - jitter, 1 + jitter, n) for k in dict.fromkeys(keys)}
            f = np.stack([uniq[k] for k in keys])
        else:
            f = rng.uniform(1 - jitter, 1 + jitter, (n_dev, n))
        prof = replace(prof, prefill_s=prof.prefill_s * f[None], decode_s=prof.decode_s * f[None])
    return prof


def _stretch(prof: Profile, units: int) -> Profile:
    """The embedding and head kept, the layers cut into parts until there are `units`."""
    n = prof.n_units
    layers, want = n - 2, units - 2
    src = np.concatenate([[0], 1 + (np.arange(want) * layers) // want, [n - 1]])
    share = np.ones(units)
    parts = np.bincount(src[1:-1], minlength=n)
    share[1:-1] = 1.0 / parts[src[1:-1]]

    def cut(a):
        return a[..., src] * share

    spec = replace(prof.model, name=f"{prof.model.name}-x{units}", num_layers=want)
    return replace(
        prof,
        model=spec,
        prefill_s=cut(prof.prefill_s),
        decode_s=cut(prof.decode_s),
        weight_bytes=cut(prof.weight_bytes),
        kv_bytes_per_token=cut(prof.kv_bytes_per_token),
        activation_bytes_per_token=prof.activation_bytes_per_token[src],
    )


def testbed_problem(**kw) -> Problem:
    return make_problem(testbed_profile(**kw), 1, "average")
