"""Profiles the paper bench derives instead of measuring again (`bench/paper.py`).

A profile of the 15-device `paper` testbed takes 5-6 minutes (every device times its units
in turns, then 210 ordered links are measured), a third of the 90-minute budget for the
three models. Two variants change nothing a device computes, only where the slow link is:
- a source-cloud bandwidth point: the swept link's measured bandwidth is scaled by the
  configured ratio (tc shapes that link alone; its measured / configured ratio carries);
- the weak (NX) source of Fig. 9: the same emulated devices in another order (an NX first),
  the slow link moved with the source: the NX gets the AGX source's measured link to the
  cloud, the AGX the NX's ordinary one.
Both were checked against a measured profile (README, "make bench").
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..planner.problem import load_profile


def scaled_link(base_path: Path, path: Path, s: int, c: int, old: float, new: float) -> Path:
    """The base profile with the s<->c bandwidth scaled by new / old (both directions)."""
    base = load_profile(base_path)
    bw = base.bandwidth.copy()
    bw[s, c] *= new / old
    bw[c, s] *= new / old
    notes = f"{base.notes}; source-cloud link scaled {old:g} -> {new:g} Mb/s"
    replace(base, bandwidth=bw, notes=notes).save(path, rename_ok=False)
    return path


def moved_source(base_path: Path, path: Path, order: list[int]) -> Path:
    """The base profile with its devices in `order` (order[0], the new source, was device
    order[0] of the base); the base source's link to the cloud goes with the new source."""
    base = load_profile(base_path)
    if base.cloud is None:
        raise ValueError(f"{base_path}: the profile names no cloud device")
    o = np.asarray(order)
    old_src, cloud = base.source, order.index(base.cloud)
    new_pos_old_src = order.index(old_src)

    def perm(m: np.ndarray) -> np.ndarray:
        m = m[np.ix_(o, o)].copy()
        for a, b in ((0, new_pos_old_src),):  # swap the two devices' links to the cloud
            m[[a, b], cloud] = m[[b, a], cloud]
            m[cloud, [a, b]] = m[cloud, [b, a]]
        return m

    meta = base.meta_for(order)
    latency = perm(base.latency_s)
    if "link_latency_s" in meta and "wake_s" in meta:
        # A hop's latency is the link's plus its receiver's wake-up cost (profile.py): move
        # the links, then charge each receiver its own wake-up again.
        link = perm(np.asarray(meta["link_latency_s"], float))
        wake = np.asarray(meta["wake_s"], float)
        latency = link + wake[None, :] * (1.0 - np.eye(len(order)))
        meta["link_latency_s"] = link.tolist()
    prof = replace(
        base,
        names=tuple(base.names[i] for i in order),
        memory_budget=base.memory_budget[o],
        prefill_s=base.prefill_s[:, o, :],
        decode_s=base.decode_s[:, o, :],
        latency_s=latency,
        bandwidth=perm(base.bandwidth),
        source=0,
        cloud=cloud,
        meta=meta,
        notes=f"{base.notes}; devices reordered {order} (source {base.names[order[0]]}), "
        "the source's link to the cloud moved with it",
    )
    prof.save(path, rename_ok=False)
    return path
