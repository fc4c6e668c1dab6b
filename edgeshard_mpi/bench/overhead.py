"""`make bench-overhead`: what the MPI runtime costs.

1. 1 rank vs plain transformers `generate` on the same model, prompts and threads
   (target: ms/token ratio <= 1.05);
2. 4 ranks on one host vs 1 rank, both at one torch thread per rank (so that thread
   scaling does not pose as hop cost): the added time per hop per token (target <= 0.5 ms).
   A token of an S-stage plan makes S hops: S - 1 activations forward and the token home.
   The added time is split, from the 4-rank run's event log, into
   - transport: from the start of a send to the end of the matching receive (MPI, the
     sleeping wait, the wake-up);
   - compute: extra compute time per hop, the same layers taking longer when a stage runs
     for a few ms after idling (its weights fell out of the shared L3) plus the per-stage
     fixed costs. A control in one process without MPI (the same stages, each called after
     a sleep as long as a real wait) shows how much of that idling alone causes.

This host is noisy (shared cores), so the configurations are interleaved round by round and
the medians of the rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .common import data_dir, median, run_job


def hf_ms_per_token(model: str, prompt_ids: np.ndarray, new_tokens: int, threads: int) -> float:
    """Plain transformers greedy generate, one prompt at a time, EOS ignored."""
    import torch

    from ..model import reference_model
    from ..presets import resolve
    from ..weights import weight_source

    torch.set_num_threads(threads)
    spec = resolve(model)
    ref = reference_model(spec, weight_source(model, spec, "float32", 0))
    ref.generation_config.eos_token_id = None
    per = []
    with torch.inference_mode():
        for row in prompt_ids:
            ids = torch.from_numpy(row[None])
            t0 = time.perf_counter()
            ref.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                pad_token_id=0,
            )
            per.append((time.perf_counter() - t0) / new_tokens)
    return float(np.mean(per) * 1e3)


def idle_control_ms(model: str, stages, new_tokens: int, prompt_tokens: int = 32) -> float:
    """In ONE process, no MPI: the same stages' decode steps run back to back, then each
    after a sleep as long as the other stages' compute (what a waiting rank sees). Returns
    the extra compute per stage call caused by idling alone."""
    import torch

    from ..kernels import load_stage
    from ..model import first_position, position_ids
    from ..presets import resolve
    from ..weights import weight_source

    torch.set_num_threads(1)
    spec = resolve(model)
    src = weight_source(model, spec, "float32", 0)
    # The runs' default kernels (runtime.kernels = "fast"), so the control matches them.
    mods = [load_stage(spec, int(a), int(b), "float32", "cpu", src) for _, a, b in stages]
    caches = [m.new_cache(1, prompt_tokens + new_tokens) for m in mods]

    def walk(gap: bool) -> list[float]:
        per_call = []
        for c in caches:
            c.reset()
        x = torch.zeros(1, prompt_tokens, dtype=torch.long)
        last: list[float] = []
        for k in range(new_tokens):
            h, times = x, []
            for m, c in zip(mods, caches, strict=True):
                if gap and k:
                    time.sleep(sum(last) - last[len(times)])  # the others' compute
                t0 = time.perf_counter()
                h = m(h, c, position_ids(1, prompt_tokens, k), first_position(prompt_tokens, k))
                times.append(time.perf_counter() - t0)
            last = times
            if k:
                per_call.append(sum(times) / len(times))
            x = h.argmax(-1).view(1, 1)
        return per_call

    hot, idle = walk(False), walk(True)
    return float((np.median(idle) - np.median(hot)) * 1e3)


def hop_transport_ms(run: dict) -> float:
    """Median time from a send's start to the end of its receive, over all hops."""
    ev = run["events"]
    ranks = [int(r) for r in run["plan"]["stages"][:, 0]]
    n = len(ranks)
    delays = []
    for s in range(n):
        sends = ev[(ev["rank"] == ranks[s]) & (ev["op"] == 2) & (ev["stage"] == s)]
        dst_stage = (s + 1) % n
        recvs = ev[(ev["rank"] == ranks[dst_stage]) & (ev["op"] == 0) & (ev["stage"] == dst_stage)]
        done = {(int(e["slot"]), int(e["it"])): e["t1"] for e in recvs}
        delays += [
            done[k] - e["t0"] for e in sends if (k := (int(e["slot"]), int(e["it"]))) in done
        ]
    return float(np.median(delays) * 1e3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--out", default="results/bench-overhead")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = data_dir()
    workload = {
        "tokenizer": "bytes",
        "prompts": args.prompts,
        "batch_size": 1,
        "new_tokens": args.new_tokens,
    }
    if data is not None:
        workload["dataset"] = str((data / "wikitext-2-raw-v1" / "wiki.test.raw").resolve())

    def job(n: int, threads: int = 0) -> dict:
        return {
            "name": f"overhead-{n}",
            "model": {"source": args.model},
            "workload": workload,
            "partition": {"strategy": "even"},
            "runtime": {"threads": threads},
            "output": {"path": str((out / f"r{n}-t{threads}.h5").resolve())},
        }

    cores = len(os.sched_getaffinity(0))
    rows = []
    print(
        f"bench-overhead: model {args.model}, {args.prompts} prompts x {args.new_tokens} "
        f"tokens, {args.rounds} interleaved rounds, {cores} cores"
    )
    for rnd in range(args.rounds):
        one = run_job(1, job(1), out / "r1.toml")
        one_t1 = run_job(1, job(1, threads=1), out / "r1-t1.toml")
        many = run_job(args.ranks, job(args.ranks, threads=1), out / f"r{args.ranks}.toml")
        hf = hf_ms_per_token(
            args.model,
            one["workload"]["prompt_ids"],
            args.new_tokens,
            threads=int(one["devices"]["threads"][0]),
        )
        hops = len(many["plan"]["stages"])
        tokens = many["summary"]["@generated_tokens"]
        compute_extra = many["ranks"]["compute_s"].sum() - one_t1["ranks"]["compute_s"].sum()
        row = {
            "hf": hf,
            "one": one["summary"]["@latency_ms_per_token"],
            "threads": int(one["devices"]["threads"][0]),
            "one_t1": one_t1["summary"]["@latency_ms_per_token"],
            "many": many["summary"]["@latency_ms_per_token"],
            "hops": hops,
            "transport_ms_per_hop": hop_transport_ms(many),
            "compute_ms_per_hop": compute_extra / tokens / hops * 1e3,
            "idle_control_ms_per_stage": idle_control_ms(
                args.model, many["plan"]["stages"], args.new_tokens
            ),
        }
        row["added_ms_per_hop"] = (row["many"] - row["one_t1"]) / hops
        rows.append(row)
        print(
            f"  round {rnd + 1}: generate {row['hf']:.2f} | 1 rank {row['one']:.2f} "
            f"({row['threads']} threads), {row['one_t1']:.2f} (1 thread) | {args.ranks} ranks "
            f"{row['many']:.2f} ms/token; per hop +{row['added_ms_per_hop']:.3f} ms "
            f"(transport {row['transport_ms_per_hop']:.3f}, compute "
            f"{row['compute_ms_per_hop']:.3f}; in one process, idling alone "
            f"+{row['idle_control_ms_per_stage']:.3f})"
        )
    med = {k: median([r[k] for r in rows]) for k in rows[0]}
    result = {
        "model": args.model,
        "rounds": rows,
        "median": med,
        "ratio_one_rank_vs_generate": med["one"] / med["hf"],
        "median_of_round_ratios": median([r["one"] / r["hf"] for r in rows]),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(
        f"1 rank / transformers generate: {result['ratio_one_rank_vs_generate']:.3f} "
        f"(median of round ratios {result['median_of_round_ratios']:.3f}; target <= 1.05)"
    )
    print(
        f"{args.ranks} ranks vs 1 rank (1 thread each): +{med['added_ms_per_hop']:.3f} ms per "
        f"hop per token over {med['hops']:.0f} hops (target <= 0.5): transport "
        f"{med['transport_ms_per_hop']:.3f} ms, slower compute {med['compute_ms_per_hop']:.3f} "
        f"ms, of which idling alone (one process, no MPI) explains "
        f"{med['idle_control_ms_per_stage']:.3f} ms"
    )
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
