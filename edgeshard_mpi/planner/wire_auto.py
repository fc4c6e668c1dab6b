"""`[transport] wire = "auto"`: per link of a plan, the lightest compression worth its loss
(pure: numpy only).

The plan is made with every hop priced at the most compressed size (int8), the most a link
could gain. Then each hop of that plan takes, of the codecs in order of increasing loss
(fp16, then int8), the first whose predicted saving on that hop, (bytes - compressed bytes) /
bandwidth weighted like the plan's cost (prefill and decode shares), is at least `min_gain`
of the plan's predicted per-token latency with exact activations; a hop where none saves that
much stays exact. A hop between two stages of one rank crosses no wire (exact).
"""

from __future__ import annotations

import itertools

from .cost import evaluate
from .plan import Plan
from .problem import Problem

CANDIDATES = ("fp16", "int8")
"""Codecs auto may pick, least lossy first (fp16: relative 2^-11, int8: max|x| / 254)."""


def hop_saving_s(prob: Problem, cut: int, a: int, b: int, ratio: float) -> float:
    """Weighted seconds a codec of `ratio` saves on the hop after unit cut - 1, a -> b."""
    if a == b:
        return 0.0
    size = prob.w_prefill * prob.act_prefill[cut - 1] + prob.w_decode * prob.act_decode[cut - 1]
    return float(size * (1.0 - ratio) / prob.profile.bandwidth[a, b])


def choose_wires(
    plan: Plan, exact_prob: Problem, ratios: dict[str, float], min_gain: float
) -> tuple[str, ...]:
    """The codec of every hop of `plan` (one per stage boundary, chain order). `exact_prob`
    prices activations uncompressed; `ratios`: codec -> wire bytes / dtype bytes."""
    if not 0.0 <= min_gain <= 1.0:
        raise ValueError(f"min_gain {min_gain} is not a fraction")
    base = evaluate(plan, exact_prob).per_token_s
    out = []
    for a, b in itertools.pairwise(plan.stages):
        pick = "exact"
        for name in CANDIDATES:
            if hop_saving_s(exact_prob, a.end, a.rank, b.rank, ratios[name]) >= min_gain * base:
                pick = name
                break
        out.append(pick if a.rank != b.rank else "exact")
    return tuple(out)


def uncompressed(profile):
    """The profile before compress_activations (its meta says the ratio it applied)."""
    from dataclasses import replace

    ratio = profile.meta.get("wire_ratio")
    if ratio is None:
        return profile
    act = profile.activation_bytes_per_token.astype(float).copy()
    act[:-1] /= ratio
    meta = {k: v for k, v in profile.meta.items() if k not in ("wire", "wire_ratio")}
    return replace(profile, activation_bytes_per_token=act, meta=meta)


def per_hop_profile(profile, plan: Plan, wires: tuple[str, ...], ratios: dict[str, float]):
    """The (uncompressed) profile with each of the plan's cuts priced at its hop's codec."""
    from dataclasses import replace

    act = profile.activation_bytes_per_token.astype(float).copy()
    for (a, _), w in zip(itertools.pairwise(plan.stages), wires, strict=True):
        act[a.end - 1] *= ratios[w]
    return replace(profile, activation_bytes_per_token=act, meta=dict(profile.meta, wire="auto"))
