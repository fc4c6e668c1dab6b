"""The paper bench's closing line: how far each run measured from its prediction.

The bands are the issue's: +-10% for sequential latency, +-15% for pipelined throughput."""

from __future__ import annotations

from pathlib import Path

SEQUENTIAL_BAND, PIPELINED_BAND = 0.10, 0.15


def fidelity(out: Path) -> None:
    """Print the distribution of measured / predicted and name every run outside the band
    (sequential: latency; pipelined: throughput, predicted / measured so that > 1 is slow
    for both)."""
    import numpy as np

    from ..report import collect

    rows = [r for r in collect([out]) if r.get("status") == "ok"]
    for mode, band in (("sequential", SEQUENTIAL_BAND), ("pipeline", PIPELINED_BAND)):
        pairs = []
        for r in rows:
            if (r["mode"] == "pipeline") != (mode == "pipeline"):
                continue
            if mode == "pipeline":
                x = r["predicted_tokens_per_s"] / r["tokens_per_s"]
            else:
                x = r["latency_ms_per_token"] / r["predicted_ms_per_token"]
            if np.isfinite(x):
                pairs.append((r["experiment"] + "/" + r["run"], x))
        if not pairs:
            continue
        xs = np.array([x for _, x in pairs])
        q = np.percentile(xs, [0, 25, 50, 75, 100])
        outside = [f"{n} {x:.2f}" for n, x in pairs if abs(x - 1) > band]
        print(
            f"{mode}: measured/predicted time over {len(xs)} runs: min {q[0]:.2f}, "
            f"quartiles {q[1]:.2f} {q[2]:.2f} {q[3]:.2f}, max {q[4]:.2f}; "
            f"{len(xs) - len(outside)} within +-{band:.0%}"
            + (f"; outside: {', '.join(outside)}" if outside else "")
        )
