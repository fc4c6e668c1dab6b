"""`edgeshard-mpi report RESULTS... --out DIR`: tables and plots from many run files.

Reads every run file (*.h5) and every planner refusal (*.infeasible.json, written by the
benchmarks) under the given files or folders, and writes:
  runs.csv           one row per run: what ran, measured and predicted figures
  report.md          the Table IV analogue (with the paper's ratios beside ours), the
                     bandwidth sweep, source node, profiling strategies, pipeline orders,
                     and predicted vs measured for every run
  *.png              plots of the same (when matplotlib is installed: the `plot` extra)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .metrics import read_run

# What the paper reports (Section V, Table IV) that a scaled reproduction can compare:
# ratios, not absolute times. Llama2-7B, 1 Mb/s source-cloud: Edge-Solo 140.34 ms/token,
# EdgeShard 75.88 ms/token (so 0.54x); Cloud-Edge-Opt degenerates to Edge-Solo; 70B runs
# out of memory in every baseline; throughput up to about 2x Edge-Solo.
PAPER = {
    ("latency", "edgeshard/edge-solo", "7b"): 75.88 / 140.34,
    ("latency", "cloud-edge-opt/edge-solo", "7b"): 1.0,
}
COLUMNS = [
    "experiment",
    "run",
    "model",
    "strategy",
    "objective",
    "mode",
    "order",
    "micro_batches",
    "micro_batch_size",
    "profile_strategy",
    "emulation",
    "testbed",
    "plan",
    "devices",
    "latency_ms_per_token",
    "tokens_per_s",
    "predicted_ms_per_token",
    "predicted_tokens_per_s",
    "src_cloud_mbps",
    "source_kind",
    "load_avg",
    "status",
]


def _row_from_h5(path: Path) -> dict:
    r = read_run(path)
    plan, summ = r["plan"], r["summary"]
    pipe = r.get("pipeline", {})
    tb = r.get("@testbed") or {}
    pipelined = r.get("@mode") == "pipeline"
    return {
        "experiment": path.parent.name,
        "run": path.stem,
        "model": r["@model"]["name"],
        "strategy": plan["@strategy"],
        "objective": plan["@objective"],
        "mode": r.get("@mode", "sequential"),
        "order": r.get("@order", ""),
        "micro_batches": r.get("@micro_batches", 1),
        "micro_batch_size": r.get("@micro_batch_size", 1),
        "profile_strategy": r.get("@profile_strategy", ""),
        "emulation": r.get("@emulation", "none"),
        "testbed": tb.get("name", ""),
        "plan": plan["@description"],
        "devices": len({int(s[0]) for s in plan["stages"]}),
        "latency_ms_per_token": summ["@latency_ms_per_token"],
        "tokens_per_s": summ["@tokens_per_s"],
        "predicted_ms_per_token": plan.get("@predicted_ms_per_token", np.nan),
        "predicted_tokens_per_s": (
            pipe.get("@predicted_tokens_per_s", np.nan)
            if pipelined
            else plan.get("@predicted_tokens_per_s", np.nan)
        ),
        **_testbed_cols(tb),
        "load_avg": _load(path),
        "status": "ok",
    }


def _testbed_cols(tb: dict) -> dict:
    """The source-cloud bandwidth (Mb/s, as configured) and the source's device kind."""
    try:
        s, c = int(tb["source"]), int(tb["cloud"])
        mbps = float(np.asarray(tb["bandwidth_bytes_per_s"], dtype=float)[s, c]) * 8 / 1e6
        dev = tb["devices"][s]
        kind = json.loads(dev) if isinstance(dev, str | bytes) else dev
        return {"src_cloud_mbps": mbps, "source_kind": kind.get("kind", "")}
    except (KeyError, TypeError, ValueError, IndexError):
        return {"src_cloud_mbps": np.nan, "source_kind": ""}


def _load(path: Path) -> float:
    """The host's 1-minute load average when the run ended (the bench writes it beside)."""
    side = path.with_suffix(".load.json")
    try:
        return float(json.loads(side.read_text())["load_avg_1m"])
    except (OSError, ValueError, KeyError):
        return np.nan


def _row_from_marker(path: Path) -> dict:
    m = json.loads(path.read_text())
    part = m.get("partition", {})
    name = path.name.removesuffix(".infeasible.json")
    return {
        "experiment": path.parent.name,
        "run": name,
        "model": m.get("model", ""),
        "strategy": part.get("strategy", ""),
        "objective": part.get("objective", ""),
        "mode": "pipeline" if name.endswith("throughput") else "sequential",
        "status": "killed (memory limit)" if m.get("killed") else "OOM (planner)",
        "plan": m.get("infeasible", "")[:200],
    }


def collect(paths: list[Path]) -> list[dict]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.rglob("*.h5")) + sorted(p.rglob("*.infeasible.json"))
        elif p.is_file():
            files.append(p)
    rows = []
    for f in files:
        if f.name.endswith(".infeasible.json"):
            rows.append(_row_from_marker(f))
        elif f.suffix == ".h5" and "profiles" not in f.parts:
            try:
                rows.append(_row_from_h5(f))
            except (OSError, KeyError, ValueError, TypeError) as e:  # not a run file
                print(f"skipping {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return rows


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
    return [*out, ""]


def _pick(rows, **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def table4(rows) -> list[str]:
    t4 = [r for r in rows if r["experiment"] == "table4"]
    if not t4:
        return []
    models = list(dict.fromkeys(r["model"] for r in t4 if r["model"]))
    strategies = ("edge-solo", "cloud-edge-even", "cloud-edge-opt", "edgeshard")
    out = ["## Table IV: latency and throughput by method", ""]
    body = []
    for m in models:
        solo = _pick(t4, model=m, strategy="edge-solo", objective="latency", status="ok")
        for s in strategies:
            lat = _pick(t4, model=m, strategy=s, objective="latency")
            thr = _pick(t4, model=m, strategy=s, objective="throughput")

            def cell(r, key):
                if r is None:
                    return "-"
                return r["status"] if r["status"] != "ok" else f"{r[key]:.1f}"

            ratio = (
                f"{lat['latency_ms_per_token'] / solo['latency_ms_per_token']:.2f}"
                if solo and lat and lat["status"] == "ok"
                else "-"
            )
            body.append(
                [m, s, cell(lat, "latency_ms_per_token"), ratio, cell(thr, "tokens_per_s"),
                 lat["plan"][:60] if lat and lat["status"] == "ok" else ""]
            )  # fmt: skip
    out += _md_table(
        ["model", "method", "latency ms/token", "vs edge-solo", "throughput tokens/s", "plan"],
        body,
    )
    out.append(
        "Paper (Llama2-7B, 1 Mb/s to the cloud): EdgeShard / Edge-Solo latency = "
        f"{PAPER[('latency', 'edgeshard/edge-solo', '7b')]:.2f} (75.88 vs 140.34 ms/token); "
        "Cloud-Edge-Opt = Edge-Solo; Llama2-70B out of memory for every baseline."
    )
    killed = [r for r in t4 if r["status"].startswith("killed")]
    for r in killed:
        out.append(
            f"Memory check off, {r['model']} on the source alone: the job was killed by the "
            "device's cgroup memory limit, as the planner predicted."
        )
    return [*out, ""]


def sweep(rows) -> list[str]:
    bw = [r for r in rows if r["experiment"] == "bandwidth" and r["status"] == "ok"]
    if not bw:
        return []

    def mbps(r):
        return float(r["run"].rsplit("-bw", 1)[1])

    out = ["## Figs. 7 and 8: source-cloud bandwidth (testbed-scaled Mb/s)", ""]
    body = []
    for b in sorted({mbps(r) for r in bw}):
        row = [b]
        for s in ("edge-solo", "cloud-edge-opt", "edgeshard"):
            lat = next((r for r in bw if mbps(r) == b and r["strategy"] == s
                        and r["objective"] == "latency"), None)  # fmt: skip
            thr = next((r for r in bw if mbps(r) == b and r["strategy"] == s
                        and r["objective"] == "throughput"), None)  # fmt: skip
            row += [lat["latency_ms_per_token"] if lat else None,
                    thr["tokens_per_s"] if thr else None]  # fmt: skip
        body.append(row)
    out += _md_table(
        ["Mb/s", "solo ms/tok", "solo tok/s", "c-e-opt ms/tok", "c-e-opt tok/s",
         "edgeshard ms/tok", "edgeshard tok/s"],
        body,
    )  # fmt: skip
    return out


def simple(rows, experiment: str, title: str) -> list[str]:
    sel = [r for r in rows if r["experiment"] == experiment and r["status"] == "ok"]
    if not sel:
        return []
    body = [
        [r["run"], r["latency_ms_per_token"], r["tokens_per_s"], r["predicted_ms_per_token"],
         r["predicted_tokens_per_s"], r["plan"][:60]]
        for r in sel
    ]  # fmt: skip
    return [
        f"## {title}",
        "",
        *_md_table(
            ["run", "ms/token", "tokens/s", "predicted ms/token", "predicted tokens/s", "plan"],
            body,
        ),
    ]


def predicted_vs_measured(rows) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    body = []
    for r in ok:
        pipelined = r["mode"] == "pipeline"
        meas = r["tokens_per_s"] if pipelined else r["latency_ms_per_token"]
        pred = r["predicted_tokens_per_s"] if pipelined else r["predicted_ms_per_token"]
        ratio = meas / pred if pred and np.isfinite(pred) else None
        body.append([f"{r['experiment']}/{r['run']}", "tokens/s" if pipelined else "ms/token",
                     pred, meas, ratio])  # fmt: skip
    return [
        "## Predicted vs measured, every run",
        "",
        *_md_table(["run", "metric", "predicted", "measured", "measured / predicted"], body),
    ]


def plots(rows, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(plots skipped: install the `plot` extra for matplotlib)", ""]
    made = []
    bw = [r for r in rows if r["experiment"] == "bandwidth" and r["status"] == "ok"]
    if bw:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for s in ("edge-solo", "cloud-edge-opt", "edgeshard"):
            for ax, obj, key in ((axes[0], "latency", "latency_ms_per_token"),
                                 (axes[1], "throughput", "tokens_per_s")):  # fmt: skip
                pts = sorted(
                    (float(r["run"].rsplit("-bw", 1)[1]), r[key])
                    for r in bw
                    if r["strategy"] == s and r["objective"] == obj
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=s)
        axes[0].set(xlabel="source-cloud Mb/s", ylabel="ms/token", title="latency (Fig. 7)")
        axes[1].set(xlabel="source-cloud Mb/s", ylabel="tokens/s", title="throughput (Fig. 8)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "bandwidth.png", dpi=100)
        plt.close(fig)
        made.append("bandwidth.png")
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        fig, ax = plt.subplots(figsize=(5, 5))
        series = (
            ("sequential", "latency_ms_per_token", "predicted_ms_per_token", "ms/token"),
            ("pipeline", "tokens_per_s", "predicted_tokens_per_s", "tokens/s"),
        )
        for mode, key, pkey, unit in series:
            pts = [(r[pkey], r[key]) for r in ok if r["mode"] == mode and np.isfinite(r[pkey])]
            if pts:
                what = "sequential latency" if mode == "sequential" else "pipelined throughput"
                ax.scatter(*zip(*pts, strict=True), label=f"{what} ({unit})")
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k--", lw=0.8, label="measured = predicted")
        for f in (0.9, 1.1):
            ax.plot(lim, [x * f for x in lim], "k:", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="predicted (ms/token or tokens/s)",
               ylabel="measured (same unit)",
               title="Measured vs predicted, every run\n(dotted: ±10%)")  # fmt: skip
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "predicted_vs_measured.png", dpi=100)
        plt.close(fig)
        made.append("predicted_vs_measured.png")
    return [f"![{m}]({m})" for m in made] + [""]


def write_report(paths: list[Path], out: Path) -> Path:
    rows = collect(paths)
    if not rows:
        raise FileNotFoundError(f"no run files (*.h5) under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    emulations = sorted({r.get("emulation", "") for r in rows if r.get("emulation")})
    md = [
        "# edgeshard-mpi report",
        "",
        f"{len(rows)} runs from {', '.join(map(str, paths))}; emulation: "
        f"{', '.join(emulations) or 'none'}.",
        "",
    ]
    md += table4(rows)
    md += sweep(rows)
    md += simple(rows, "source", "Fig. 9: source node")
    md += simple(rows, "profiling", "Fig. 10: profiling strategies")
    md += simple(rows, "orders", "Fig. 11: pipeline orders")
    md += predicted_vs_measured(rows)
    md += plots(rows, out)
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
