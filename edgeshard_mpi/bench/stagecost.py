"""`make bench-stagecost`: what an extra stage (rank) costs per token, and where it goes.

The same decode (even partition, 1 thread per rank, fast kernels, `bench-speed`'s models:
the 232 MB random Llama and stories260K) on 1, 2 and 4 ranks, under configurations given
as environment settings (default: the doorbells off, i.e. the 20-100 us sleep-polls, against
the doorbells on, see edgeshard_mpi/wakeup.py), interleaved round by round; medians of the
rounds. Each run goes through edgeshard_mpi.bench.phases, so besides ms/token (from the
token times, prefill excluded, as bench-speed) and the transport per hop (send start to
receive end, as bench-overhead) it reports, per token summed over the ranks: wall and CPU
time of computing, of waiting (the CPU a wait burns is its polling), of sending, and the
wake-ups (voluntary context switches) and preemptions (involuntary ones). What an extra rank
adds is given against each configuration's own 1-rank runs and against all 1-rank runs
pooled (no rank waits at 1 rank: the same computation whatever the configuration).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from . import phases
from .common import data_dir, median, run_job
from .overhead import hop_transport_ms
from .speed import data_dir_any, save_random_llama

RANKS = (1, 2, 4)


def one_run(n: int, model: str, out: Path, name: str, env: dict, args) -> dict:
    """One job on n ranks; its ms/token, transport per hop and per-phase figures per token."""
    tag = f"{name}-{Path(model).name}-{n}"
    job = {
        "name": tag,
        "model": {"source": model},
        "workload": {
            "tokenizer": "bytes",
            "prompts": args.prompts,
            "batch_size": 1,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "fallback": "builtin",
        },
        "partition": {"strategy": "even"},
        "runtime": {"threads": 1, "kernels": "fast"},
        "output": {"path": str((out / f"{tag}.h5").resolve()), "events": True},
    }
    data = data_dir()
    if data is not None:
        job["workload"]["dataset"] = str((data / "wikitext-2-raw-v1" / "wiki.test.raw").resolve())
    prefix = str((out / tag).resolve())
    env = dict(env, EDGESHARD_PHASES=prefix)
    run = run_job(n, job, out / f"{tag}.toml", env=env, module="edgeshard_mpi.bench.phases")
    tt = run["workload"]["token_time_s"]  # [groups, steps]
    steps = tt.shape[0] * (tt.shape[1] - 1)
    gaps = np.diff(tt, axis=1).ravel() * 1e3  # each decode token's own time
    row = {
        "ms_per_token": float(np.median((tt[:, -1] - tt[:, 0]) / (tt.shape[1] - 1)) * 1e3),
        # A shared host's other work slows some tokens a lot: the quarter least hit.
        "p25_ms_per_token": float(np.percentile(gaps, 25)),
        "transport_ms_per_hop": hop_transport_ms(run) if n > 1 else 0.0,
    }
    dumps = phases.read(prefix, n)
    for key, label in (("_compute", "compute"), ("_recv", "wait"), ("_send", "send")):
        row[f"{label}_wall_ms"] = sum(d.get(key, [0, 0])[0] for d in dumps) / steps * 1e3
        row[f"{label}_cpu_ms"] = sum(d.get(key, [0, 0])[1] for d in dumps) / steps * 1e3
    # Per token over the whole run (prefill included: the counts cannot be split).
    tokens = tt.shape[0] * tt.shape[1]
    counts = {"nr_voluntary_switches": "wakeups", "nr_involuntary_switches": "preempted"}
    for key, label in counts.items():
        row[f"{label}_per_token"] = sum(d["sched"].get(key, np.nan) for d in dumps) / tokens
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/bench-stagecost")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--models", default="232m,stories260K", help="232m and/or stories260K")
    ap.add_argument(
        "--configs",
        default="polls:EDGESHARD_DOORBELLS=0,doorbells:",
        help="NAME:VAR=VALUE:... per configuration, comma-separated",
    )
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for m in args.models.split(","):
        if m == "232m":
            models[m] = str(save_random_llama(out / "models" / "rand-232m"))
        elif m == "stories260K":
            models[m] = str((data_dir_any() / "stories260K-hf").resolve())
        else:
            ap.error(f"--models: unknown model {m!r} (232m, stories260K)")
    configs = []
    for c in args.configs.split(","):
        name, *sets = c.split(":")
        configs.append((name, dict(s.split("=", 1) for s in sets if s)))
    rows: dict[tuple, list] = {}
    for rnd in range(args.rounds):
        load = os.getloadavg()[0]
        for m, path in models.items():
            for name, env in configs:
                for n in RANKS:
                    row = one_run(n, path, out, name, env, args)
                    row["load"] = load
                    rows.setdefault((m, name, n), []).append(row)
                    cells = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                    print(f"  round {rnd + 1} {m} {name} {n} ranks: {cells}", flush=True)
    med = {k: {f: median([r[f] for r in v]) for f in v[0]} for k, v in rows.items()}
    # At 1 rank nothing waits, so every configuration's 1-rank run is the same computation
    # (unless a configuration changes the kernels): their pooled median is a steadier
    # reference than each configuration's own 3-5 runs (which read 6.98 against 6.36 ms
    # in one bench, a 0.3 ms swing in every "per extra rank" figure).
    pooled = {
        m: median([r["ms_per_token"] for (mm, _, n), v in rows.items() if (mm, n) == (m, 1)
                   for r in v])
        for m in models
    }  # fmt: skip
    report(med, models, configs, pooled)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "rounds": {"|".join(map(str, k)): v for k, v in rows.items()},
                "median": {"|".join(map(str, k)): v for k, v in med.items()},
                "pooled_1_rank_ms_per_token": pooled,
            },
            indent=2,
        )
    )
    print(f"wrote {out / 'summary.json'}")


def report(med: dict, models: dict, configs: list, pooled: dict) -> None:
    print("\nper token, medians of rounds (ms; phases summed over ranks, decode steps)")
    cols = ("ms_per_token", "p25_ms_per_token", "transport_ms_per_hop", "compute_wall_ms",
            "compute_cpu_ms", "wait_cpu_ms", "send_wall_ms", "wakeups_per_token",
            "preempted_per_token")  # fmt: skip
    print("| model | config | ranks | " + " | ".join(cols) + " |")
    for m in models:
        for name, _ in configs:
            for n in RANKS:
                r = med[(m, name, n)]
                print(f"| {m} | {name} | {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    print()
    for m in models:
        for name, _ in configs:
            one = med[(m, name, 1)]
            for n in RANKS[1:]:
                r, k = med[(m, name, n)], n - 1
                added = (r["ms_per_token"] - one["ms_per_token"]) / k
                vs_pooled = (r["ms_per_token"] - pooled[m]) / k
                p25 = (r["p25_ms_per_token"] - one["p25_ms_per_token"]) / k
                wall = (r["compute_wall_ms"] - one["compute_wall_ms"]) / k
                cpu = (r["compute_cpu_ms"] - one["compute_cpu_ms"]) / k
                print(
                    f"{m}, {name}: {n} ranks add {added:.3f} ms per extra rank against "
                    f"this configuration's 1-rank runs, {vs_pooled:.3f} against all 1-rank "
                    f"runs pooled ({pooled[m]:.3f} ms/token) (p25 of tokens {p25:.3f}; transport "
                    f"{r['transport_ms_per_hop']:.3f} ms per hop; summed compute wall "
                    f"{wall:+.3f}, CPU {cpu:+.3f} ms per extra rank; the waits burn "
                    f"{r['wait_cpu_ms']:.3f} ms CPU per token)"
                )


if __name__ == "__main__":
    main()
