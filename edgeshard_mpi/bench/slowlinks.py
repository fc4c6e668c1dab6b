"""`make bench-slowlinks`: every slow-link option side by side on the emulated testbed.

The `small` testbed (4 devices: source edge box 0.25 core, a second 0.25, a weak one 0.125,
a cloud server 1 core; 8 Mb/s between edge boxes) with the source-cloud link swept over
1-8 Mb/s. Per model and bandwidth, one MPI launch runs every configuration in turn
(bench/world.py): EdgeShard with each wire (exact, bf16, fp16, int8), CE-CoLLM at three
thresholds (split fixed per model, int8 uploads: the paper quantises its transfers),
Cloud-Edge-Opt and Edge-Solo. Then, without the testbed (quality does not depend on the
links), `eval` prices every lossy configuration: perplexity on WikiText-2 and greedy-token
agreement with the exact run, on the plan the timing run used. Exact configurations are
exact by construction (tests/test_slowlinks.py, test_cecollm.py): their perplexity is the
exact one and their agreement 100%.

The profile is measured once per model on the testbed at 1 Mb/s; for each other bandwidth
the source-cloud entry of the profile is set to that bandwidth (the testbed's nominal value)
instead of profiling again.

    python -m edgeshard_mpi.bench.slowlinks [--out DIR] [--bandwidths 1,2,4,8]
        [--models stories260K,mini-7b] [--emulation auto|os|transport]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from .. import toml_out
from ..testbed import can_emulate_os, down, load_testbed, up
from .common import data_dir, median, mpiexec_path

WIRES = ("exact", "bf16", "fp16", "int8")
CE_WIRE = "int8"
MODELS = {
    # split: edge units [0, split) + the exit head. stories260K: embedding + 4 of 5 layers
    # (its exit head after 2 layers agreed with the full model on <10% of tokens in a first
    # try); mini-7b: embedding + 8 of 32 layers (the edge box's 300 MiB holds them and the
    # head).
    # thresholds: three exit rates from high to low, placed on each model's exit-head
    # confidences (stories260K after 4 layers: median 0.39, 90th percentile 0.89 in a first
    # run; mini-7b after 8 layers: peaked, mostly 0.9-1.0).
    "stories260K": {
        "split": 5, "thresholds": (0.3, 0.5, 0.8), "prompts": 2, "new_tokens": 24,
        "window": 256, "windows": 8, "eval_prompts": 4, "eval_tokens": 32,
    },
    "mini-7b": {
        "split": 9, "thresholds": (0.9, 0.99, 0.999), "prompts": 2, "new_tokens": 16,
        "window": 64, "windows": 2, "eval_prompts": 2, "eval_tokens": 16,
    },
}


def configs(model: str) -> list[tuple[str, dict, dict, dict]]:
    """(label, partition, transport, ce_collm) of every configuration."""
    out = [(f"EdgeShard {w}", {"strategy": "edgeshard"}, {"wire": w}, {}) for w in WIRES]
    out += [
        (f"CE-CoLLM t={t}", {"strategy": "ce-collm"}, {"wire": CE_WIRE}, {"threshold": t})
        for t in MODELS[model]["thresholds"]
    ]
    out += [
        ("Cloud-Edge-Opt", {"strategy": "cloud-edge-opt"}, {"wire": "exact"}, {}),
        ("Edge-Solo", {"strategy": "edge-solo"}, {"wire": "exact"}, {}),
    ]
    return out


def slug(label: str) -> str:
    return label.lower().replace(" ", "-").replace("=", "").replace(".", "")


class SlowLinks:
    def __init__(self, out: Path, emulation: str, timeout: int):
        self.out, self.timeout = out, timeout
        self.data = data_dir()
        if self.data is None:
            sys.exit("EDGESHARD_DATA: no wikitext-2-raw-v1/wiki.test.raw there; set it")
        why = can_emulate_os()
        if emulation == "auto":
            emulation = "os" if why is None else "transport"
        self.emulation = emulation
        if self.emulation == "os" and why:
            sys.exit(f"--emulation os: {why}")
        self.base = load_testbed("small")
        self.current = None

    # -- testbeds and profiles -----------------------------------------------------------

    def variant(self, mbps: float):
        data = tomllib.loads(self.base.path.read_text())
        data["name"] = f"slowlinks-{mbps:g}"
        for p in data["links"]["pairs"]:
            if {p["a"], p["b"]} == {data["source"], data["cloud"]}:
                p["bandwidth_mbps"] = mbps
        path = self.out / "testbeds" / f"{data['name']}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toml_out.dumps(data))
        return load_testbed(path)

    def use(self, tb) -> None:
        if self.emulation != "os" or self.current == tb.path:
            return
        self.close()
        up(tb, log=lambda m: print(f"    {m}", flush=True))
        self.current = tb.path

    def close(self) -> None:
        if self.emulation == "os" and self.current is not None:
            down(load_testbed(self.current), log=lambda *_: None)
            self.current = None

    def launch(self, tb, command: str, jobs: list[Path]) -> str:
        py = sys.executable
        tail = [py, "-m", "mpi4py", "-m", "edgeshard_mpi.bench.world", command, *map(str, jobs)]
        if tb is not None and self.emulation == "os":
            argv = [mpiexec_path()]
            for i in range(tb.n):
                argv += [*([":"] if i else []), "-n", "1", py, "-m", "edgeshard_mpi.testbed",
                         "enter", str(tb.path), str(i), "--", *tail]  # fmt: skip
        else:
            argv = [mpiexec_path(), "-n", str(self.base.n), *tail]
        env = dict(os.environ, MPIEXEC_TIMEOUT=str(self.timeout))
        proc = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        log = proc.stdout
        if proc.returncode != 0:
            sys.exit(f"{command} {jobs[0].parent} failed ({proc.returncode}):\n{log[-4000:]}")
        return log

    def job(self, model: str, name: str, tb, part: dict, wire: dict, ce: dict, folder: str):
        m = MODELS[model]
        stories = model == "stories260K"
        source = str(self.data / "stories260K-hf") if stories else model
        tok = str(self.data / "stories260K-hf" / "tokenizer.model") if stories else "bytes"
        job = {
            "name": name,
            "model": {"source": source},
            "workload": {
                "dataset": str(self.data / "wikitext-2-raw-v1" / "wiki.test.raw"),
                "tokenizer": tok,
                "prompt_tokens": 32,
                "prompts": m["prompts"],
                "new_tokens": m["new_tokens"],
            },
            "partition": part,
            "transport": wire,
            "output": {"path": str(self.out / folder / f"{name}.h5"), "events": False},
        }
        if ce:
            job["ce_collm"] = {"split": m["split"]} | ce
        if tb is not None:
            job["cluster"] = {"testbed": str(tb.path)}
        return job

    def write(self, job: dict) -> Path:
        path = Path(job["output"]["path"]).with_suffix(".toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toml_out.dumps(job))
        Path(job["output"]["path"]).unlink(missing_ok=True)
        return path

    def profile(self, model: str, tb) -> Path:
        path = self.out / "profiles" / f"{model}.json"
        if path.is_file():
            return path
        job = self.job(model, f"profile-{model}", tb, {"strategy": "edgeshard"}, {}, {}, "profiles")
        job["profile"] = {"sample_layers": 2, "warmup": 3, "repeats": 3}
        jpath = self.write(job)
        self.use(tb)
        py = sys.executable
        tail = [py, "-m", "mpi4py", "-m", "edgeshard_mpi", "profile", str(jpath), "--out",
                str(path)]  # fmt: skip
        if self.emulation == "os":
            argv = [mpiexec_path()]
            for i in range(tb.n):
                argv += [*([":"] if i else []), "-n", "1", py, "-m", "edgeshard_mpi.testbed",
                         "enter", str(tb.path), str(i), "--", *tail]  # fmt: skip
        else:
            argv = [mpiexec_path(), "-n", str(tb.n), *tail]
        env = dict(os.environ, MPIEXEC_TIMEOUT=str(self.timeout))
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"profiling {model} failed:\n{proc.stdout}\n{proc.stderr}")
        return path

    def profile_at(self, model: str, base_profile: Path, tb, mbps: float) -> Path:
        """The measured profile with the source-cloud link at `mbps` (nominal)."""
        from ..planner.problem import load_profile

        prof = load_profile(base_profile)
        bw = prof.bandwidth.copy()
        s, c = 0, tb.cloud
        bw[s, c] = bw[c, s] = mbps * 1e6 / 8
        path = self.out / "profiles" / f"{model}-{mbps:g}mbps.json"
        path.unlink(missing_ok=True)
        return replace(prof, bandwidth=bw).save(path, rename_ok=False)

    # -- the experiment ------------------------------------------------------------------

    def timing(self, models, bandwidths, repeats: int = 1) -> list[dict]:
        """Every configuration `repeats` times, interleaved in one launch per model and
        bandwidth; a row per configuration with the medians (ms/token, tokens/s, TTFT)."""
        rows = []
        for model in models:
            base = self.profile(model, self.variant(bandwidths[0]))
            for mbps in bandwidths:
                tb = self.variant(mbps)
                prof = self.profile_at(model, base, tb, mbps)
                folder = f"runs/{model}/{mbps:g}mbps"
                jobs = []
                for k in range(repeats):
                    for label, part, wire, ce in configs(model):
                        job = self.job(model, f"{slug(label)}-r{k}", tb, part, wire, ce, folder)
                        job["profile"] = {"reuse": str(prof)}
                        jobs.append((label, job))
                paths = [(lb, Path(j["output"]["path"]).with_suffix(".toml"),
                          Path(j["output"]["path"])) for lb, j in jobs]  # fmt: skip
                logfile = self.out / folder / "world.log"
                if done_before(logfile, [out for *_, out in paths]):
                    log = logfile.read_text()  # an earlier invocation ran them: reuse
                else:
                    for _, job in jobs:
                        self.write(job)  # (removes a stale results file of that name)
                    self.use(tb)
                    t0 = time.time()
                    log = self.launch(tb, "run", [p for _, p, _ in paths])
                    print(f"  {model} at {mbps:g} Mb/s: {len(paths)} runs in "
                          f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
                    logfile.write_text(log)
                for label, *_ in configs(model):
                    runs = [read_timing(model, mbps, lb, out, log) for lb, _, out in paths
                            if lb == label]  # fmt: skip
                    rows.append(medians(runs))
        self.close()
        return rows

    def quality(self, models, rows: list[dict]) -> dict:
        """(model, label, plan) -> eval attrs, for every lossy configuration's plans."""
        out = {}
        for model in models:
            m = MODELS[model]
            todo, jobs = {}, []
            for r in rows:
                if r["model"] != model or "error" in r:
                    continue
                label, plan = r["label"], r["plan"]
                lossy = label.startswith("CE-CoLLM") or (
                    label.startswith("EdgeShard") and not label.endswith("exact")
                )
                if not lossy or (label, plan) in todo:
                    continue
                _, part, wire, ce = next(c for c in configs(model) if c[0] == label)
                if not ce:  # the plan the timing run used, explicitly
                    part = {"strategy": "explicit", "stages": [
                        {"rank": s[0], "layers": [s[1], s[2]]} for s in r["stages"]]}  # fmt: skip
                name = f"{slug(label)}-{len(todo)}"
                job = self.job(model, name, None, part, wire, ce, f"eval/{model}")
                if ce:
                    job["cluster"] = {"cloud": self.base.cloud}
                job["workload"] |= {"prompts": m["eval_prompts"], "new_tokens": m["eval_tokens"]}
                done = Path(job["output"]["path"])
                if done.is_file():  # an earlier invocation evaluated it: reuse
                    todo[(label, plan)] = done
                    continue
                job["eval"] = {"window": m["window"], "stride": m["window"] // 2,
                               "max_windows": m["windows"]}  # fmt: skip
                todo[(label, plan)] = Path(job["output"]["path"])
                jobs.append(self.write(job))
            if jobs:
                self._evaluate(model, jobs)
            for (label, plan), path in todo.items():
                with h5py.File(path) as f:
                    out[(model, label, plan)] = {
                        k: _plain(f.attrs[k])
                        for k in ("perplexity", "perplexity_exact", "token_agreement",
                                  "prefix_agreement", "exit_rate")
                        if k in f.attrs
                    }
        return out

    def _evaluate(self, model: str, jobs: list[Path]) -> None:
        """One launch for all of a model's evals (no testbed: quality is link-blind)."""
        t0 = time.time()
        log = self.launch(None, "eval", jobs)
        print(f"  {model}: {len(jobs)} evals in {time.time() - t0:.0f} s", flush=True)
        (self.out / "eval" / model / "world.log").write_text(log)


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def medians(runs: list[dict]) -> dict:
    """One row from repeated runs of a configuration: the first run's facts, the median of
    the timings (and their spread), or the refusal if any run was refused."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    row = dict(runs[0])
    for key in ("ms_per_token", "tokens_per_s", "ttft_ms", "cloud_compute_s"):
        vals = [r[key] for r in runs]
        row[key] = median(vals)
        row[f"{key}_all"] = vals
    row["plans"] = sorted({r["plan"] for r in runs})
    row["repeats"] = len(runs)
    return row


def done_before(logfile: Path, outs: list[Path]) -> bool:
    """Every run of a launch has its file or its refusal in the launch's log."""
    if not logfile.is_file():
        return False
    refused = refusals(logfile.read_text())
    return all(o.is_file() or str(o.with_suffix(".toml")) in refused for o in outs)


def refusals(log: str) -> dict[str, str]:
    """job file -> rank 0's error line. Every rank of a world prints `[world] run JOB` after
    each job; rank 0 prints its error before its own marker, so an error belongs to the job
    named by the next marker after it."""
    out, pending = {}, []
    for ln in log.splitlines():
        if ln.startswith("[world]"):
            if pending:
                job = ln.split(" ", 2)[2].rsplit(":", 1)[0]
                out.setdefault(job, pending[0])
                pending = []
        elif "[rank 0] error" in ln:
            pending.append(ln.strip())
    return out


def read_timing(model: str, mbps: float, label: str, out: Path, log: str) -> dict:
    row = {"model": model, "mbps": mbps, "label": label}
    if not out.is_file():  # refused (an infeasible plan): rank 0's message says why
        row["error"] = refusals(log).get(str(out.with_suffix(".toml")), "no results file")
        return row
    with h5py.File(out) as f:
        s, ranks = f["summary"].attrs, f["ranks"]
        stages = f["plan/stages"][:]
        cloud = int(json.loads(f.attrs["testbed"])["cloud"])
        row |= {
            "plan": str(f["plan"].attrs["description"]),
            "stages": stages.tolist(),
            "ms_per_token": float(s["latency_ms_per_token"]),
            "tokens_per_s": float(s["tokens_per_s"]),
            "ttft_ms": float(s["ttft_ms"]),
            "bytes_sent": int(ranks["bytes_sent"][:].sum()),
            "cloud_compute_s": float(ranks["compute_s"][cloud]),
            "predicted_ms_per_token": float(f["plan"].attrs.get("predicted_ms_per_token", np.nan)),
        }
        if "ce_collm" in f:
            g = f["ce_collm"].attrs
            row |= {
                "exit_rate": float(g["exit_rate"]),
                "bytes_uploaded": int(g["bytes_uploaded"]),
                "cloud_calls": int(g["cloud_calls"]),
            }
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/bench-slowlinks")
    ap.add_argument("--bandwidths", default="1,2,4,8", help="source-cloud Mb/s")
    ap.add_argument("--models", default="stories260K,mini-7b")
    ap.add_argument("--emulation", default="auto", choices=("auto", "os", "transport"))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (medians)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()  # job files name it from other folders
    out.mkdir(parents=True, exist_ok=True)
    models = a.models.split(",")
    bad = [m for m in models if m not in MODELS]
    if bad:
        sys.exit(f"--models: {bad[0]} is not one of {', '.join(MODELS)}")
    bws = [float(x) for x in a.bandwidths.split(",")]
    bench = SlowLinks(out, a.emulation, a.timeout)
    t0 = time.time()
    load = os.getloadavg()[0]
    print(f"bench-slowlinks: {models}, source-cloud {bws} Mb/s, emulation {bench.emulation}, "
          f"host load {load:.1f}", flush=True)  # fmt: skip
    try:
        rows = bench.timing(models, bws, a.repeats)
    finally:
        bench.close()
    qual = bench.quality(models, rows)
    from .slowlinks_report import report

    meta = {"load_start": load, "load_end": os.getloadavg()[0], "emulation": bench.emulation,
            "repeats": a.repeats}  # fmt: skip
    report(rows, qual, out, meta | {"seconds": time.time() - t0})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {out}/report.md, {out}/latency-quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
