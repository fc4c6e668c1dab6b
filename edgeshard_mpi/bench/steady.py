"""`make bench-steady`: are the emulated devices steady? Profile one testbed K times in a
row and compare each device's measured speed with its configured share of a core.

    python -m edgeshard_mpi.bench.steady [--testbed small] [--profiles 10]
           [--emulation auto|os|transport] [--model small] [--out DIR]

A device's speed is its profiled (prefill + decode) time summed over the units, relative to
the fastest device; configured is the ratio of their `cpu` shares. Printed per profile:
measured / configured for every device; at the end, how many profiles had every device
within 10% and within 20% (the issue's target: >= 9 of 10 within 10%, all within 20%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .. import toml_out
from ..planner.problem import load_profile
from ..testbed import can_emulate_os, down, launch_argv, load_testbed, up
from .common import mpiexec_path


def speed_error(prof, tb) -> np.ndarray:
    """measured / configured slowness of each device relative to the fastest one."""
    total = (prof.prefill_s[0] + prof.decode_s[0]).sum(axis=1)
    fastest = int(np.argmax([d.cpu for d in tb.devices]))
    measured = total / total[fastest]
    configured = np.array([tb.devices[fastest].cpu / d.cpu for d in tb.devices])
    return measured / configured


def profile_once(tb, job: Path, emulation: str, timeout: int = 600):
    py = sys.executable
    if emulation == "os":
        argv = launch_argv(tb, str(job), mpiexec_path(), py, "profile")
    else:
        argv = [mpiexec_path(), "-n", str(tb.n), py, "-m", "mpi4py", "-m", "edgeshard_mpi",
                "profile", str(job)]  # fmt: skip
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(timeout))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=job.parent)
    if proc.returncode != 0:
        sys.exit(f"profile failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return load_profile(job.parent / "run.profile.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default="small")
    ap.add_argument("--profiles", type=int, default=10)
    ap.add_argument("--model", default="small")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per unit (median)")
    ap.add_argument("--emulation", default="auto", choices=("auto", "os", "transport"))
    ap.add_argument("--out", type=Path, default=Path("results/bench-steady"))
    args = ap.parse_args(argv)
    tb = load_testbed(args.testbed)
    emulation = args.emulation
    if emulation == "auto":
        emulation = "os" if can_emulate_os() is None else "transport"
    out = args.out.resolve() / emulation
    out.mkdir(parents=True, exist_ok=True)
    job = {
        "model": {"source": args.model},
        "workload": {"tokenizer": "bytes", "prompts": 1, "new_tokens": 4},
        "partition": {"strategy": "edgeshard"},
        "profile": {"sample_layers": 1, "link_repeats": 2, "repeats": args.repeats, "warmup": 3},
        "cluster": {"testbed": str(tb.path), "emulation": emulation},
        "output": {"path": str(out / "run.h5")},
    }
    jpath = out / "job.toml"
    jpath.write_text(toml_out.dumps(job))
    if emulation == "os":
        up(tb, log=lambda m: print(f"  {m}", flush=True))
    rows = []
    try:
        for k in range(args.profiles):
            t0 = time.time()
            prof = profile_once(tb, jpath, emulation)
            (out / "run.profile.json").replace(out / f"profile-{k + 1}.json")
            err = speed_error(prof, tb)
            rows.append(err.tolist())
            print(
                f"profile {k + 1}/{args.profiles} ({time.time() - t0:.0f} s): measured/configured "
                + ", ".join(f"{d.name} {e:.2f}" for d, e in zip(tb.devices, err, strict=True)),
                flush=True,
            )
    finally:
        if emulation == "os":
            down(tb, log=lambda *_: None)
    dev = np.abs(np.array(rows) - 1).max(axis=1)
    in10, in20 = int((dev <= 0.10).sum()), int((dev <= 0.20).sum())
    print(
        f"{emulation} emulation, {tb.name}: every device within 10% in {in10}/{len(rows)} "
        f"profiles, within 20% in {in20}/{len(rows)}; worst {dev.max():.1%}"
    )
    summary = {"testbed": tb.name, "emulation": emulation, "ratios": rows}
    summary.update(within10=in10, within20=in20, n=len(rows))
    (out / "steady.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
