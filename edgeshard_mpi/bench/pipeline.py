"""`make bench-pipeline`: pipelined throughput on one host, measured and predicted.

On a 2-core host, the same workload (prompts of 32 tokens, micro-batches of B sequences)
runs:
  single    1 rank, sequential, every core to torch (the baseline);
  single-1t 1 rank, sequential, one thread (shows what thread scaling gives);
  nb / bb   2 ranks, one thread each, the EdgeShard throughput plan, pipeline with
            enough micro-batches in flight, no-bubbles and bubbles orders.
The 2-rank runs reuse one measured profile (measured first, ranks taking turns), so their
simulated predictions are comparable. Configurations are interleaved round by round and
medians are reported (this host's cores are shared and noisy).

Targets: no-bubbles >= 90% of the simulator's prediction; no-bubbles >= bubbles; the
2-stage pipeline >= 1.6x the single rank's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import median, run_job


def job(model: str, out: Path, prompts: int, size: int, new_tokens: int, **sections) -> dict:
    base = {
        "name": "bench-pipeline",
        "model": {"source": model},
        "workload": {
            "tokenizer": "bytes",
            "prompts": prompts,
            "batch_size": size,
            "new_tokens": new_tokens,
        },
        "output": {"path": str(out), "events": False},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return base


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # mini-7b: Llama2-7B's 32 layers at width 512, so the head is a small share of the
    # work as in the real model ('small' has a head heavier than all its layers, which caps
    # any 2-stage split near 1.5x).
    ap.add_argument("--model", default="mini-7b")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/bench-pipeline"))
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    b, wl = args.micro_batch_size, (args.prompts, args.micro_batch_size, args.new_tokens)

    profile = out / "profile.json"
    print(f"profiling {args.model} on 2 ranks at micro-batch size {b} ...", flush=True)
    run_job(
        2,
        job(
            args.model,
            out / "profile-run.h5",
            *wl,
            partition={"strategy": "edgeshard", "objective": "throughput"},
            pipeline={"mode": "pipeline", "micro_batches": args.micro_batches},
            profile={"save": str(profile)},
        ),
        out / "profile-run.toml",
    )
    pipe = {
        "partition": {"strategy": "edgeshard", "objective": "throughput"},
        "profile": {"reuse": str(profile)},
    }
    configs = {
        "single": (1, job(args.model, out / "single.h5", *wl, runtime={"threads": cores})),
        "single-1t": (1, job(args.model, out / "single-1t.h5", *wl, runtime={"threads": 1})),
        "nb": (
            2,
            job(
                args.model,
                out / "nb.h5",
                *wl,
                **pipe,
                pipeline={"mode": "pipeline", "micro_batches": args.micro_batches},
                runtime={"threads": 1},
            ),
        ),
        "bb": (
            2,
            job(
                args.model,
                out / "bb.h5",
                *wl,
                **pipe,
                pipeline={
                    "mode": "pipeline",
                    "micro_batches": args.micro_batches,
                    "order": "bubbles",
                },
                runtime={"threads": 1},
            ),
        ),
    }
    tps = {k: [] for k in configs}
    ratio, busy, plan = [], {}, None
    for rnd in range(args.rounds):
        for name, (n, j) in configs.items():
            r = run_job(n, j, out / f"{name}.toml")
            tps[name].append(r["summary"]["@tokens_per_s"])
            if name == "nb":
                ratio.append(r["pipeline"]["@measured_over_predicted"])
                busy = {
                    "measured": r["pipeline"]["busy_fraction"].tolist(),
                    "predicted": r["pipeline"]["predicted_busy_fraction"].tolist(),
                    "predicted_tokens_per_s": r["pipeline"]["@predicted_tokens_per_s"],
                }
                plan = r["plan"]["@description"]
        print(
            f"round {rnd + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1]:.1f} tokens/s" for k, v in tps.items()),
            flush=True,
        )
    med = {k: median(v) for k, v in tps.items()}
    result = {
        "model": args.model,
        "prompts": args.prompts,
        "micro_batch_size": b,
        "micro_batches": args.micro_batches,
        "new_tokens": args.new_tokens,
        "cores": cores,
        "plan": plan,
        "tokens_per_s": tps,
        "median_tokens_per_s": med,
        "nb_over_predicted": median(ratio),
        "nb_over_bb": med["nb"] / med["bb"],
        "nb_over_single": med["nb"] / med["single"],
        "nb_over_single_1t": med["nb"] / med["single-1t"],
        "busy_fraction": busy,
    }
    (out / "pipeline.json").write_text(json.dumps(result, indent=1))
    print()
    print(f"{args.model}: {args.prompts} prompts x {args.new_tokens} tokens, micro-batches of {b}")
    print(f"2-rank plan: {plan}, {args.micro_batches} micro-batches in flight")
    for k, v in med.items():
        print(f"  {k:<10} {v:8.1f} tokens/s (median of {args.rounds})")
    checks = [
        ("no-bubbles / simulator prediction", result["nb_over_predicted"], 0.9),
        ("no-bubbles / bubbles", result["nb_over_bb"], 1.0),
        ("2-stage pipeline / single rank", result["nb_over_single"], 1.6),
    ]
    for label, value, target in checks:
        verdict = "ok" if value >= target else "MISSED"
        print(f"  {label:<36} {value:5.2f}  (target >= {target}) {verdict}")
    print(f"  (2-stage pipeline / single rank at 1 thread: {result['nb_over_single_1t']:.2f})")
    print(f"wrote {out / 'pipeline.json'}")


if __name__ == "__main__":
    main()
