"""The planning problem: a Problem holds the arrays a solver needs for one workload (batch
size, micro-batches in flight) and one profiling strategy, made from a Profile (profiles.py:
what was measured, or written by hand, and its JSON file format)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .profiles import (
    TOKEN_BYTES,
    Profile,
    ProfileError,
    load_profile,
    profile_from_dict,
    shipped_profiles,
)

# Callers import the profile's names from here too (the file format is profiles.py's).
__all__ = [
    "Infeasible",
    "PlannerLimit",
    "Problem",
    "Profile",
    "ProfileError",
    "load_profile",
    "make_problem",
    "profile_from_dict",
    "shipped_profiles",
]

STRATEGIES = ("prefill", "decode", "average", "workload")


class PlannerLimit(RuntimeError):
    """A solver would take too long or too much memory on this problem."""


class Infeasible(ValueError):
    """No plan fits; the message gives the numbers (needed vs available)."""


PHASE_WEIGHTS = {"prefill": (1.0, 0.0), "decode": (0.0, 1.0), "average": (0.5, 0.5)}


@dataclass(frozen=True)
class Problem:
    """A Profile at one batch size and strategy: per-unit costs the DP adds up.

    The strategy says how prefill and decode are weighed: prefill or decode alone, their
    average (the paper's choice), or `workload`: the weights of one prompt's life, 1/G
    prefill and (G-1)/G decode, which is what the measured ms/token averages.
    """

    profile: Profile
    batch: int
    strategy: str
    slots: int
    compute: np.ndarray  # [M, N] weighted seconds
    prefill: np.ndarray  # [M, N]
    decode: np.ndarray  # [M, N]
    memory: np.ndarray  # [N] bytes
    act_prefill: np.ndarray  # [N] bytes crossing the cut after unit u (the whole batch)
    act_decode: np.ndarray  # [N]
    w_prefill: float
    w_decode: float

    @property
    def n_devices(self) -> int:
        return self.profile.n_devices

    @property
    def n_units(self) -> int:
        return self.profile.n_units

    @property
    def source(self) -> int:
        return self.profile.source

    def hop_s(self, cut: int, a: int, b: int, phase: str | None = None) -> float:
        """Seconds to move the output of unit `cut - 1` from device a to b (0 on a device)."""
        if a == b:
            return 0.0
        p = self.profile
        if phase == "prefill":
            size = self.act_prefill[cut - 1]
        elif phase == "decode":
            size = self.act_decode[cut - 1]
        else:
            size = (
                self.w_prefill * self.act_prefill[cut - 1]
                + self.w_decode * self.act_decode[cut - 1]
            )
        return float(p.latency_s[a, b] + size / p.bandwidth[a, b])

    def hop_matrix(self) -> np.ndarray:
        """[N + 1, M, M] weighted hop seconds at every cut (row 0 and N: unused/return)."""
        p = self.profile
        size = self.w_prefill * self.act_prefill + self.w_decode * self.act_decode  # [N]
        h = np.zeros((self.n_units + 1, self.n_devices, self.n_devices))
        h[1:] = p.latency_s[None] + size[:, None, None] / p.bandwidth[None]
        idx = np.arange(self.n_devices)
        h[:, idx, idx] = 0.0
        return h

    def _per_device(self, key: str) -> np.ndarray | None:
        v = self.profile.meta.get(key)
        return np.asarray(v, float) if isinstance(v, list) and len(v) == self.n_devices else None

    def self_wake_s(self) -> np.ndarray:
        """[M] a dilated device's wake-up, paid on every call (meta self_wake_s; 0 on
        undilated devices and real hardware): see return_s and pipeline.cost_functions."""
        own = self._per_device("self_wake_s")
        return np.zeros(self.n_devices) if own is None else own

    def source_layers_wake_s(self) -> float:
        """What a source stage holding more than the embedding pays on waking beyond what
        the embedding alone pays (meta wake_s - embed_wake_s at the source, 0 without them).

        A stage's wake-up cost (seqprofile.wake_cost) is charged with the hop into it; the
        source's comes with the token's return. Measured on the testbed, a stage that only
        looks up the embedding wakes at a third of a layer's cost (profiled on an NX-like
        source: 1.3-1.8 against 4.5-5.4 ms a call), and such a stage is what EdgeShard
        gives a weak source. So the
        return hop carries the embedding's wake-up and a source stage [0, e) with 2 <= e <
        N pays this difference as compute (dp.segment_costs, cost.evaluate, uniform.py);
        a one-stage plan pays return_s's self wake-up instead."""
        wake, embed = self._per_device("wake_s"), self._per_device("embed_wake_s")
        if wake is None or embed is None:
            return 0.0
        s = self.source
        return float(max(0.0, wake[s] - embed[s]))

    def source_stage_extra_s(self, end: int) -> float:
        """Seconds a source stage [0, end) pays beyond its units (source_layers_wake_s)."""
        return self.source_layers_wake_s() if 2 <= end < self.n_units else 0.0

    def return_s(self) -> np.ndarray:
        """[M] seconds for the sampled tokens to go from device k back to the source.

        From another device: the link and the source's wake-up (in latency_s), the
        embedding's when it was measured (source_layers_wake_s). On the source itself (a
        one-stage plan): no link, but an emulated device that sleeps its time dilation
        after every call starts every call cold, as a woken stage does; the profile
        measures that as `self_wake_s` (0 on real hardware and undilated devices;
        one-stage runs on the testbed read 1.15-1.17x their prediction without it)."""
        p, s = self.profile, self.profile.source
        out = p.latency_s[:, s] + self.batch * TOKEN_BYTES / p.bandwidth[:, s]
        out = np.maximum(out - self.source_layers_wake_s(), 0.0)
        out[s] = float(self.self_wake_s()[s])
        return out


def make_problem(
    profile: Profile, batch: int | None = None, strategy: str = "average", slots: int = 1
) -> Problem:
    if strategy not in STRATEGIES:
        raise ValueError(f"profile strategy must be one of {STRATEGIES}, got {strategy!r}")
    if batch is not None and not 1 <= batch <= 2**20:
        raise ValueError(f"batch size {batch}: must be an integer from 1 to {2**20}")
    batch = batch or profile.batch_sizes[0]
    pre, dec = profile.times(batch)
    g = profile.new_tokens
    w_p, w_d = (1 / g, (g - 1) / g) if strategy == "workload" else PHASE_WEIGHTS[strategy]
    act = profile.activation_bytes_per_token * batch
    return Problem(
        profile=profile,
        batch=batch,
        strategy=strategy,
        slots=slots,
        # A unit a device cannot run stays inf whatever the weights (0 * inf is nan).
        compute=np.where(
            np.isinf(pre) | np.isinf(dec),
            np.inf,
            w_p * np.nan_to_num(pre, posinf=0) + w_d * np.nan_to_num(dec, posinf=0),
        ),
        prefill=pre,
        decode=dec,
        memory=profile.unit_memory(batch, slots),
        act_prefill=np.where(
            np.arange(profile.n_units) == profile.n_units - 1, act, act * profile.prompt_tokens
        ),
        act_decode=act,
        w_prefill=w_p,
        w_decode=w_d,
    )


def compress_activations(profile: Profile, ratio: float, wire: str) -> Profile:
    """The profile as a compressed wire sees it: every activation between units takes
    `ratio` of its bytes (wire.py's bytes per token over the dtype's); the last unit's
    output (the token ids returning to the source) is never compressed. A ratio of 1 returns
    the profile unchanged."""
    from dataclasses import replace

    if ratio == 1.0:
        return profile
    if not 0 < ratio <= 1:
        raise ValueError(f"wire compression ratio must be in (0, 1], got {ratio}")
    act = profile.activation_bytes_per_token.astype(float).copy()
    act[:-1] *= ratio
    meta = dict(profile.meta, wire=wire, wire_ratio=ratio)
    return replace(profile, activation_bytes_per_token=act, meta=meta)
