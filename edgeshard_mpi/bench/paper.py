"""`make bench` / `make bench-quick`: the paper's experiments on an emulated testbed.

Every run is a real job (mpiexec, one rank per device) that writes one HDF5 file; a run
whose plan cannot fit (the planner says so, exit status 2) leaves a .infeasible.json with
the planner's message instead. Finished runs are skipped, so a sweep can be interrupted
and resumed. Experiments:

  table4     latency (sequential, latency objective) and throughput (pipelined,
             throughput objective) of edge-solo, cloud-edge-even, cloud-edge-opt and
             edgeshard for three model sizes; the largest fits only with edgeshard, and one
             run with the memory check off confirms that the cgroup limit kills it
  bandwidth  Figs. 7 and 8 (a-c: one per model): the source-cloud bandwidth swept, latency
             and throughput; the base testbed's bandwidth is table4's runs, Edge-Solo
             (no link) is table4's run at every point; the largest model compares EdgeShard
             with EdgeShard-Even (the paper's variant) since every baseline is out of memory
  source     Fig. 9: the source node an AGX (table4's runs) or an NX, every method
  profiling  Fig. 10: planning from prefill, decode, average or workload-weighted costs
             (the second model, as the paper's 13B)
  orders     Fig. 11: pipelined throughput in bubbles order (no-bubbles: table4's runs) for
             cloud-edge-even, cloud-edge-opt and edgeshard on the first two models

Every run but Fig. 10's plans under the `workload` profiling strategy: the token mix the
run will have (1 prefill and new_tokens - 1 decode steps), which is also what the
prediction is computed under; planning under `average` chose plans the prediction itself
ranked behind a baseline's.

A profile is measured once per model on the base testbed; a bandwidth variant and the
NX-source testbed reuse it (paper_profiles.py: the swept link scaled by the configured
ratio; the same devices reordered, the slow link moved with the source).

With root (and ip, tc, cgroups) the testbed runs in namespaces with tc and cgroups
("os"); elsewhere inside the job ("transport"); each HDF5 file says which.

    python -m edgeshard_mpi.bench.paper [--quick] [--only table4,orders] [--out DIR]
        [--models mini-7b] [--bandwidths 0.081,4.03]      # a reduced run, e.g. to try it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from .. import toml_out
from ..testbed import can_emulate_os, down, launch_argv, load_testbed, up
from .common import mpiexec_path
from .paper_fidelity import fidelity
from .paper_profiles import moved_source, scaled_link
from .paper_world import BATCH, Item, pending_key, run_batch

STRATEGIES = ("edge-solo", "cloud-edge-even", "cloud-edge-opt", "edgeshard")
PROFILE_STRATEGIES = ("prefill", "decode", "average", "workload")

FULL = {
    "testbed": "paper",
    "models": ("mini-7b", "mini-13b", "mini-70b"),
    "main": "mini-7b",
    # Sized for about 50 minutes on a quiet 2-core host (90 allowed): the runs of one model
    # on one testbed variant share an MPI launch (15 ranks start once, 40-70 s here), three
    # profiles of 5-7 min, and tokens cut to what the slowest runs afford: mini-70b
    # EdgeShard decodes at 3.4 s/token on this testbed (the paper's 70B: 3.1 s). Sequential
    # runs generate for 3 prompts: with one, a run measured one sequence (0.2-1 s on
    # `small`), and a single stall of the shared host (seen: 160 ms in a 0.8 s run) or
    # the process's first, cold prefill (1.2-1.5x the next ones) moved its ms/token 10-35%.
    "prompts": 3,
    "pipeline_prompts": 4,
    "new_tokens": 16,
    "model_new_tokens": {"mini-70b": 8},
    # The paper's 1, 2, 5, 10, 20, 50 Mb/s source-cloud sweep, times the testbed's scale.
    "bandwidths": (0.081, 0.161, 0.403, 0.806, 1.61, 4.03),
    "sweep_models": ("mini-7b", "mini-13b", "mini-70b"),  # Figs. 7/8 a-c
    # The main model at every point; the others at the paper's 1, 10 and 50 Mb/s.
    "other_bandwidths": (0.081, 0.806, 4.03),
    "order_models": ("mini-7b", "mini-13b"),  # Fig. 11 a-b
    "profiling_model": "mini-13b",  # Fig. 10, as the paper's
    "source_model": "mini-7b",  # Fig. 9, as the paper's 7B: it fits one AGX, no NX
}
QUICK = {
    "testbed": "small",
    "models": ("small", "mini-7b", "mini-13b"),
    "main": "mini-7b",
    "prompts": 3,
    "pipeline_prompts": 4,
    "new_tokens": 16,
    "bandwidths": (1.0, 4.0, 8.0),
    "sweep_models": ("mini-7b",),
    "order_models": ("mini-7b",),
    "profiling_model": "mini-7b",
    # Fig. 9: the model that fits the source alone, as Llama2-7B fits an AGX in the paper,
    # so Cloud-Edge-Opt keeps it there at 1 Mb/s (mini-7b fits no edge box of this testbed:
    # every method then keeps only the embedding on the source, and the source's speed
    # shows in none of them).
    "source_model": "small",
}


class Bench:
    def __init__(self, cfg: dict, out: Path, emulation: str, timeout: int):
        self.cfg, self.out, self.timeout = cfg, out, timeout
        self.base = load_testbed(cfg["testbed"])
        why = can_emulate_os()
        if emulation == "auto":
            emulation = "os" if why is None else "transport"
        if emulation == "os" and why:
            sys.exit(f"--emulation os: {why}")
        self.emulation = emulation
        self.current = None  # the testbed variant that is up (os emulation)
        self.done = self.skipped = 0
        self.counting, self.total, self.seen = False, 0, 0  # a dry pass counts the runs
        self.launched, self.profiling_s = 0, 0.0
        self.profiles_todo: set[Path] = set()  # profiles the runs to do will measure
        self.profiled = 0
        # Runs wait here until the model or the testbed variant changes, then share one
        # MPI launch (paper_world.py); --one-launch-per-run turns that off.
        self.batch: list[Item] = []
        self.batch_tb, self.batch_key = None, None
        self.batched = True
        self.launches, self.world_s = 0, 0.0
        self.t_start = time.time()
        self.exps: list[str] = list(EXPERIMENTS)
        self.derived: dict[Path, tuple[float, float]] = {}  # variant -> (base, its) Mb/s
        self.moved: dict[Path, list[int]] = {}  # NX-source variant -> device order

    def base_src_cloud_mbps(self) -> float:
        tb = self.base
        return float(tb.bandwidth[tb.source, tb.cloud] * 8 / 1e6)

    # -- testbeds --------------------------------------------------------------------------

    def variant(self, name: str, src_cloud_mbps: float | None = None, nx_source: bool = False):
        """A testbed file derived from the base one (written under out/testbeds)."""
        if name == "base":
            return self.base
        data = tomllib.loads(self.base.path.read_text())
        data["name"] = f"{self.base.name}-{name}"
        if src_cloud_mbps is not None:
            for p in data["links"]["pairs"]:
                if {p["a"], p["b"]} == {data["source"], data["cloud"]}:
                    p["bandwidth_mbps"] = src_cloud_mbps
        if nx_source:  # an NX becomes device 0 (the source); the AGX count stays 12
            tb = self.base
            kinds = [d.kind for d in tb.devices]
            nx = kinds.index("nx")
            order = [nx] + [i for i in range(tb.n) if i != nx]
            data["devices"] = [
                {"name": tb.devices[i].name, "kind": tb.devices[i].kind,
                 "cpu": tb.devices[i].cpu, "memory": tb.devices[i].memory}
                for i in order
            ]  # fmt: skip
            data["source"] = tb.devices[nx].name
            for p in data["links"]["pairs"]:  # the slow link follows the source
                if p["a"] == self.base.devices[0].name:
                    p["a"] = tb.devices[nx].name
        path = self.out / "testbeds" / f"{data['name']}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toml_out.dumps(data))
        if src_cloud_mbps is not None and not nx_source:
            self.derived[path.resolve()] = (self.base_src_cloud_mbps(), src_cloud_mbps)
        if nx_source and src_cloud_mbps is None:
            self.moved[path.resolve()] = order
        return load_testbed(path)

    def use(self, tb) -> None:
        if self.emulation != "os" or self.current == tb.path:
            return
        if self.current is not None:
            down(load_testbed(self.current), log=lambda *_: None)
        up(tb, log=lambda m: print(f"    {m}", flush=True))
        self.current = tb.path

    def close(self) -> None:
        if self.emulation == "os" and self.current is not None:
            down(load_testbed(self.current), log=lambda *_: None)

    # -- jobs -------------------------------------------------------------------------------

    def launch(self, tb, job: Path, command: str = "run") -> subprocess.CompletedProcess:
        py = sys.executable
        if self.emulation == "os":
            argv = launch_argv(tb, str(job), mpiexec_path(), py, command)
            env = {}
        else:
            argv = [mpiexec_path(), "-n", str(tb.n), py, "-m", "mpi4py", "-m", "edgeshard_mpi",
                    command, str(job)]  # fmt: skip
            env = {}
        full = dict(os.environ, MPIEXEC_TIMEOUT=str(self.timeout), **env)
        return subprocess.run(argv, capture_output=True, text=True, env=full)

    def profile(self, tb, model: str) -> Path:
        path = self.out / "profiles" / f"{tb.name}-{model}.json"
        if path.is_file():
            return path
        key = tb.path.resolve()
        if key in self.derived:  # the same devices, one link scaled (paper_profiles.py)
            old, new = self.derived[key]
            return scaled_link(self.profile(self.base, model), path, tb.source, tb.cloud,
                               old, new)  # fmt: skip
        if key in self.moved:  # the same devices in another order (Fig. 9's NX source)
            return moved_source(self.profile(self.base, model), path, self.moved[key])
        self.use(tb)
        job = self._job(tb, model, path.with_suffix(".h5"), {"strategy": "edgeshard"})
        # Warm-up matters here: with 1 warm-up call and 3 repeats a layer of `small` read
        # 0.81-0.87 ms of CPU, with 3 and 5 it read 0.50-0.65, the run's 0.47.
        job["profile"] = {"sample_layers": 2, "warmup": 5, "repeats": 5}
        # 15 ranks measure 210 links after timing their units, a phase that reports no
        # progress: under load it outlasted the default 300 s watchdog (mini-70b, load 19).
        job["runtime"] = {"stall_timeout_s": 1800}
        jpath = path.with_suffix(".toml")
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(toml_out.dumps(job))
        t0 = time.time()
        proc = self.launch(tb, jpath, "profile")
        if proc.returncode != 0:
            sys.exit(f"profiling {model} on {tb.name} failed:\n{proc.stdout}\n{proc.stderr}")
        (self.out / "profiles" / f"{tb.name}-{model}.profile.json").replace(path)
        self.profiling_s += time.time() - t0
        self.profiled += 1
        parts = [x.split("] ", 1)[-1] for x in proc.stdout.splitlines()
                 if "profiled " in x or "measured " in x]  # fmt: skip
        print(f"    profiled {model} on {tb.name} in {time.time() - t0:.0f} s"
              + (f" ({'; '.join(parts)})" if parts else ""), flush=True)  # fmt: skip
        return path

    def _job(self, tb, model: str, out: Path, partition: dict, pipeline: dict | None = None):
        cfg = self.cfg
        pipelined = pipeline is not None
        return {
            "name": out.stem,
            "model": {"source": model},
            "workload": {
                "tokenizer": "bytes",
                "dataset": "${EDGESHARD_DATA}/wikitext-2-raw-v1/wiki.test.raw",
                "fallback": "builtin",
                "prompts": cfg["pipeline_prompts"] if pipelined else cfg["prompts"],
                "new_tokens": cfg.get("model_new_tokens", {}).get(model, cfg["new_tokens"]),
            },
            "partition": partition,
            "pipeline": pipeline or {},
            "cluster": {"testbed": str(tb.path)},
            "output": {"path": str(out), "events": pipelined},
        }

    def run(self, exp: str, name: str, tb, model: str, partition: dict, **kw) -> None:
        out = self.out / exp / f"{name}.h5"
        marker = out.with_suffix(".infeasible.json")
        finished = out.is_file() or marker.is_file()
        if self.counting:
            self.total += not finished
            key = tb.path.resolve()
            base_tb = tb if key not in self.derived and key not in self.moved else self.base
            measured = self.out / "profiles" / f"{base_tb.name}-{model}.json"
            if not finished and not measured.is_file():
                self.profiles_todo.add(measured)
            return
        if finished:
            self.skipped += 1
            return
        key = pending_key(tb, model)
        if self.batch and (key != self.batch_key or kw.get("expect_failure")):
            self.flush()
        prof = self.profile(tb, model)
        if not kw.get("expect_failure") and self._refused(prof, name, model, partition, marker):
            self.seen += 1
            self.done += 1
            return
        self.use(tb)
        job = self._job(tb, model, out, partition, kw.get("pipeline"))
        job["profile"] = {"reuse": str(prof), "strategy": kw.get("profile_strategy", "workload")}
        if kw.get("check_memory") is False:
            job["runtime"] = {"check_memory": False}
        jpath = out.with_suffix(".toml")
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(toml_out.dumps(job))
        if self.batched and not kw.get("expect_failure"):
            self.batch.append(Item(exp, name, model, partition, jpath, out))
            self.batch_tb, self.batch_key = tb, key
            if len(self.batch) >= BATCH:
                self.flush()
            return
        self.seen += 1
        t0 = time.time()
        spent = t0 - self.t_start
        eta = self.eta()
        self.launched += 1
        print(f"  [{self.seen}/{self.total}, {spent / 60:.0f} min, {eta}] {exp}/{name} ...",
              end=" ", flush=True)  # fmt: skip
        proc = self.launch(tb, jpath)
        took = time.time() - t0
        # The host's load when the run ended: the report states it beside each figure.
        out.with_suffix(".load.json").write_text(json.dumps(
            {"load_avg_1m": os.getloadavg()[0], "seconds": took}))  # fmt: skip
        if proc.returncode == 0:
            line = [x for x in proc.stdout.splitlines() if "ms/token" in x and "prompts x" in x]
            print(f"{took:.0f} s: {line[-1].split(': ', 1)[-1] if line else 'done'}", flush=True)
        elif proc.returncode == 2 and "error:" in proc.stderr:
            msg = proc.stderr.strip().splitlines()[0].split("error: ", 1)[-1]
            marker.write_text(json.dumps({"run": name, "model": model, "infeasible": msg,
                                          "partition": partition}))  # fmt: skip
            print(f"infeasible: {msg[:90]}", flush=True)
        elif kw.get("expect_failure"):
            marker.write_text(json.dumps({"run": name, "model": model, "killed": True,
                                          "status": proc.returncode,
                                          "stderr": proc.stderr[-2000:]}))  # fmt: skip
            print(f"failed as expected (status {proc.returncode})", flush=True)
        else:
            sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        self.done += 1

    def eta(self) -> str:
        """From the runs finished so far (an offline refusal takes no time) and the
        profiles measured so far (5-7 min each on the paper testbed before the first)."""
        if not self.launched:
            return "ETA after the first run"
        spent = time.time() - self.t_start
        per_run = (spent - self.profiling_s) / self.launched
        per_prof = self.profiling_s / self.profiled if self.profiled else 400.0
        left_prof = max(len(self.profiles_todo) - self.profiled, 0) * per_prof
        return f"ETA {(per_run * (self.total - self.seen) + left_prof) / 60:.0f} min"

    def flush(self) -> None:
        """Run the waiting runs: one world per model and testbed variant."""
        batch, self.batch = self.batch, []
        if batch:
            self.use(self.batch_tb)
            run_batch(self, self.batch_tb, batch)

    def _refused(self, prof: Path, name: str, model: str, partition: dict, marker: Path) -> bool:
        """Does the planner refuse this run already offline (no reserve held back, the
        smallest batch: looser than the job's own check, so a refusal here is one there)?
        Then write the marker without starting 15 ranks (about 40 s each here)."""
        from ..offline import plan_report

        if partition["strategy"] not in STRATEGIES:
            return False
        rep = plan_report(str(prof), partition["objective"], [partition["strategy"]],
                          profile_strategy="workload")  # fmt: skip
        row = rep["plans"][0]
        if row["feasible"]:
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"run": name, "model": model, "infeasible": row["error"],
                                      "partition": partition}))  # fmt: skip
        print(f"  [{self.seen + 1}/{self.total}] {name}: infeasible (planner, offline): "
              f"{row['error'][:80]}", flush=True)  # fmt: skip
        return True

    # -- experiments ----------------------------------------------------------------------

    def table4(self) -> None:
        tb = self.variant("base")
        for model in self.cfg["models"]:
            for s in STRATEGIES:
                self.run("table4", f"{model}-{s}-latency", tb, model,
                         {"strategy": s, "objective": "latency"})  # fmt: skip
                self.run("table4", f"{model}-{s}-throughput", tb, model,
                         {"strategy": s, "objective": "throughput"},
                         pipeline={"mode": "pipeline"})  # fmt: skip
        if self.emulation == "os" and len(self.cfg["models"]) > 1:
            # The planner says the largest model is out of memory; show the OS agrees.
            big = self.cfg["models"][-1]
            self.run("table4", f"{big}-edge-solo-memory-check-off", tb, big,
                     {"strategy": "even", "ranks": [0]}, check_memory=False,
                     expect_failure=True)  # fmt: skip

    def _sweep_methods(self, model: str) -> list[tuple[str, dict]]:
        """(label, partition) of the methods Figs. 7/8 compare for a model: the largest
        model (every baseline out of memory) against EdgeShard-Even over every device."""
        if model == self.cfg["models"][-1] and len(self.cfg["models"]) > 1:
            return [("edgeshard", {"strategy": "edgeshard"}),
                    ("edgeshard-even", {"strategy": "even"})]  # fmt: skip
        # Cloud-Edge-Even is table4's run at the base bandwidth only (time: 90 minutes).
        return [(s, {"strategy": s}) for s in ("cloud-edge-opt", "edgeshard")]

    def bandwidth(self) -> None:
        base = self.base_src_cloud_mbps()
        for model in self.cfg["sweep_models"]:
            points = self.cfg["bandwidths"]
            if model != self.cfg["main"]:
                points = self.cfg.get("other_bandwidths", points)
            for bw in points:
                same = abs(bw - base) <= 0.01 * base
                tb = self.base if same else self.variant(f"bw{bw:g}", src_cloud_mbps=bw)
                for label, part in self._sweep_methods(model):
                    if same and label in STRATEGIES:
                        continue  # table4's run is this point
                    for obj in ("latency", "throughput"):
                        pipe = {"mode": "pipeline"} if obj == "throughput" else None
                        self.run("bandwidth", f"{model}-{label}-{obj}-bw{bw:g}", tb, model,
                                 {**part, "objective": obj}, pipeline=pipe)  # fmt: skip

    def source(self) -> None:
        tb = self.variant("nx-source", nx_source=True)
        model = self.cfg["source_model"]
        for s in STRATEGIES:
            for obj in ("latency", "throughput"):
                pipe = {"mode": "pipeline"} if obj == "throughput" else None
                self.run("source", f"{model}-{s}-{obj}-source-nx", tb, model,
                         {"strategy": s, "objective": obj}, pipeline=pipe)  # fmt: skip

    def profiling(self) -> None:
        tb = self.variant("base")
        model = self.cfg["profiling_model"]
        for ps in PROFILE_STRATEGIES:
            if ps == "workload" and model in self.cfg["models"] and "table4" in self.exps:
                continue  # table4's EdgeShard runs are this job (the report takes them)
            for obj in ("latency", "throughput"):
                pipe = {"mode": "pipeline"} if obj == "throughput" else None
                self.run("profiling", f"{model}-edgeshard-{obj}-{ps}", tb, model,
                         {"strategy": "edgeshard", "objective": obj},
                         profile_strategy=ps, pipeline=pipe)  # fmt: skip

    def orders(self) -> None:
        """Fig. 11: each method's no-bubbles run (table4) again in bubbles order, with the
        same plan, micro-batch size and count in flight, as the paper compares them (left
        to choose, a bubbles run picks other candidates: the order is then not all that
        differs)."""
        tb = self.variant("base")
        for model in self.cfg["order_models"]:
            for s in ("cloud-edge-even", "cloud-edge-opt", "edgeshard"):
                part, pipe = {"strategy": s, "objective": "throughput"}, {}
                same = self.out / "table4" / f"{model}-{s}-throughput.h5"
                if same.is_file() and not self.counting:
                    part, pipe = same_schedule(same)
                self.run("orders", f"{model}-{s}-bubbles", tb, model, part,
                         pipeline={"mode": "pipeline", "order": "bubbles", **pipe})  # fmt: skip


def same_schedule(h5: Path) -> tuple[dict, dict]:
    """The partition (explicit stages) and micro-batching a finished pipelined run used."""
    from ..metrics import read_run

    r = read_run(h5)
    stages = [{"rank": int(k), "layers": [int(a), int(b)]} for k, a, b in r["plan"]["stages"]]
    pipe = r.get("pipeline", {})
    return (
        {"strategy": "explicit", "stages": stages, "objective": "throughput"},
        {"micro_batches": int(pipe["@micro_batches"]),
         "micro_batch_size": int(pipe["@micro_batch_size"])},
    )  # fmt: skip


EXPERIMENTS = ("table4", "bandwidth", "source", "profiling", "orders")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small testbed, short runs")
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated experiments")
    ap.add_argument("--emulation", default="auto", choices=("auto", "os", "transport"))
    ap.add_argument("--new-tokens", type=int, help="override the workload's new tokens")
    ap.add_argument("--prompts", type=int, help="prompts per sequential run (default 3)")
    ap.add_argument("--models", help="comma-separated presets (default: the config's three)")
    ap.add_argument("--bandwidths", help="comma-separated source-cloud Mb/s (testbed-scaled)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one-launch-per-run", action="store_true",
                    help="start the ranks for every run (default: once per model and "
                    "testbed variant, several runs per MPI launch)")  # fmt: skip
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.new_tokens:
        cfg["new_tokens"] = args.new_tokens
    if args.prompts is not None:
        if args.prompts < 1:
            ap.error(f"--prompts: {args.prompts} is not a count of prompts; give 1 or more")
        cfg["prompts"] = args.prompts
    if args.models:
        cfg["models"] = tuple(args.models.split(","))
        cfg["main"] = cfg["profiling_model"] = cfg["source_model"] = cfg["models"][0]
        cfg["sweep_models"] = cfg["models"]
        cfg["order_models"] = cfg["models"][:2]
    if args.bandwidths:
        try:
            cfg["bandwidths"] = tuple(float(x) for x in args.bandwidths.split(","))
            cfg["other_bandwidths"] = cfg["bandwidths"]
        except ValueError:
            sys.exit(f"--bandwidths: {args.bandwidths!r} is not a comma-separated list of "
                     "numbers (Mb/s), e.g. --bandwidths 0.081,4.03")  # fmt: skip
    out = (args.out or Path("results") / ("bench-quick" if args.quick else "bench")).resolve()
    bench = Bench(cfg, out, args.emulation, args.timeout)
    print(f"testbed {cfg['testbed']} ({bench.emulation} emulation), results in {out}")
    t0 = time.time()
    exps = bench.exps = args.only.split(",")
    for exp in exps:
        if exp not in EXPERIMENTS:
            sys.exit(f"--only: unknown experiment {exp!r}; choose from {EXPERIMENTS}")
    bench.counting = True
    for exp in exps:
        getattr(bench, exp)()
    bench.counting, bench.t_start = False, time.time()
    print(f"{bench.total} run(s) to do", flush=True)
    bench.batched = not args.one_launch_per_run
    try:
        for exp in exps:
            print(f"{exp}:", flush=True)
            getattr(bench, exp)()
            bench.flush()
    finally:
        bench.close()
    fidelity(out)
    print(
        f"{bench.done} run(s) in {time.time() - t0:.0f} s ({bench.launches} MPI launches of "
        f"several runs), {bench.skipped} already done; "
        f"report: edgeshard-mpi report {out} --out {out}/report"
    )


if __name__ == "__main__":
    main()
