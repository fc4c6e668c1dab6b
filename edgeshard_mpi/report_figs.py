"""The paper's figures (7a-c, 8a-c, 9, 10, 11) and measured-vs-predicted, one PNG each,
from the report's rows (report.collect). Each figure says what was measured, in which
unit, on what testbed, and the host's load while it ran: a reader needs no other text.

Where the bench reuses a run rather than repeating it, the figure takes it from there:
Edge-Solo (which uses no link) and every method at the base bandwidth are table4's runs,
the AGX source of Fig. 9 is table4's, no-bubbles in Fig. 11 is table4's throughput run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METHODS = ("edge-solo", "cloud-edge-even", "cloud-edge-opt", "edgeshard", "edgeshard-even")
STYLE = {
    "edge-solo": dict(color="tab:gray", marker="s", ls="--"),
    "cloud-edge-even": dict(color="tab:orange", marker="^", ls=":"),
    "cloud-edge-opt": dict(color="tab:blue", marker="o", ls="-"),
    "edgeshard": dict(color="tab:red", marker="D", ls="-"),
    "edgeshard-even": dict(color="tab:purple", marker="v", ls="-."),
}
LABEL = {
    "edge-solo": "Edge-Solo",
    "cloud-edge-even": "Cloud-Edge-Even",
    "cloud-edge-opt": "Cloud-Edge-Opt",
    "edgeshard": "EdgeShard",
    "edgeshard-even": "EdgeShard-Even",
}
PANEL = {"mini-7b": "a", "mini-13b": "b", "mini-70b": "c"}
PAPER_SCALE = 0.0806
"""Testbed Mb/s per paper Mb/s (the paper testbed's link scaling; README)."""


def method(r: dict) -> str:
    return "edgeshard-even" if r["strategy"] == "even" else r["strategy"]


def _load_note(rows) -> str:
    loads = [r.get("load_avg") for r in rows]
    loads = [x for x in loads if isinstance(x, float) and np.isfinite(x)]
    if not loads:
        return "host load not recorded"
    return f"host load average {min(loads):.1f}-{max(loads):.1f} (2 cores)"


def _ok(rows, **kw):
    return [r for r in rows if r["status"] == "ok" and all(r.get(k) == v for k, v in kw.items())]


def _figure(plt, title: str, rows, ncols: int = 1, width: float = 6.0):
    tall = 4.2 + 0.25 * title.count("\n")  # room for a title of more lines
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, tall), squeeze=False)
    emul = sorted({r.get("emulation", "") for r in rows} - {""})
    fig.suptitle(
        f"{title}\nmeasured, {', '.join(emul) or 'no'} emulation; {_load_note(rows)}",
        fontsize=10,
    )
    return fig, axes[0]


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=100, bbox_inches="tight")  # keeps a legend below the axes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def sweep_figures(plt, rows, out: Path) -> list[str]:
    """Figs. 7 (latency) and 8 (throughput), a-c: one PNG per model."""
    made = []
    base = [r for r in rows if r["experiment"] == "table4"]
    sweep = [r for r in rows if r["experiment"] == "bandwidth"]
    models = list(dict.fromkeys(r["model"] for r in sweep if r["status"] == "ok"))
    for fig_no, obj, key, unit in (
        (7, "latency", "latency_ms_per_token", "ms/token (lower is better)"),
        (8, "throughput", "tokens_per_s", "tokens/s (higher is better)"),
    ):
        for i, model in enumerate(models):
            # the paper's panel for the model it stands for (7B a, 13B b, 70B c)
            letter = PANEL.get(model, "abc"[i] if i < 3 else str(i))
            # by mode: an unplanned method (EdgeShard-Even) records no objective of its own
            pts = [r for r in _ok(base + sweep, model=model)
                   if (r["mode"] == "pipeline") == (obj == "throughput")]  # fmt: skip
            if not pts:
                continue
            xs_all = sorted({r["src_cloud_mbps"] for r in pts if np.isfinite(r["src_cloud_mbps"])})
            what = "latency" if obj == "latency" else "throughput (pipelined)"
            fig, (ax,) = _figure(
                plt, f"Fig. {fig_no}{letter}: {model} {what} vs "
                "source-cloud bandwidth", pts)  # fmt: skip
            for m in METHODS:
                mine = [r for r in pts if method(r) == m]
                if not mine:
                    continue
                if m == "edge-solo":  # no link: one run, the same at every bandwidth
                    y = mine[0][key]
                    ax.plot(xs_all, [y] * len(xs_all), label=f"{LABEL[m]} (no link)", **STYLE[m])
                    continue
                xy = sorted((r["src_cloud_mbps"], r[key]) for r in mine)
                ax.plot(*zip(*xy, strict=True), label=LABEL[m], **STYLE[m])
            ax.set_xscale("log")
            ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all], fontsize=8)
            ax.minorticks_off()
            ax.set(
                xlabel=f"source-cloud bandwidth, Mb/s on the testbed (paper's x {PAPER_SCALE})",
                ylabel=unit,
            )
            if not all(str(r.get("testbed", "")).startswith("paper") for r in pts):
                xlabel = "source-cloud bandwidth, Mb/s on the testbed"
                ax.set_xlabel(xlabel)
            else:
                _paper_axis(ax, xs_all)
            ax.grid(alpha=0.3)
            oom = [LABEL[method(r)] for r in base
                   if r["model"] == model and r["objective"] == obj and r["status"] != "ok"]
            if oom:  # the methods the planner refused (the paper plots them as OOM too)
                ax.plot([], [], " ", label="out of memory: " + ", ".join(oom))
            # below the axes: inside, it hid part of a line (Fig. 7c)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                      frameon=False)  # fmt: skip
            made.append(_save(fig, out, f"fig{fig_no}{letter}_{model}.png"))
    return made


def _paper_axis(ax, xs_all) -> None:
    """The paper's Mb/s on top (the paper testbed scales its links by PAPER_SCALE)."""
    secax = ax.secondary_xaxis(
        "top", functions=(lambda x: x / PAPER_SCALE, lambda x: x * PAPER_SCALE)
    )
    secax.set_xticks([x / PAPER_SCALE for x in xs_all],
                     [f"{x / PAPER_SCALE:.3g}" for x in xs_all], fontsize=8)  # fmt: skip
    secax.minorticks_off()
    secax.set_xlabel("the paper's Mb/s", fontsize=8)


def _bars(ax, groups: list[str], series: dict[str, list], unit: str) -> None:
    """Grouped bars; a run that did not fit shows its status (OOM) at the baseline, one not
    run says so."""
    n = len(series)
    w = 0.8 / max(n, 1)
    x = np.arange(len(groups))
    for k, (name, vals) in enumerate(series.items()):
        pos = x - 0.4 + w * (k + 0.5)
        ys = [v if isinstance(v, float) and np.isfinite(v) else 0.0 for v in vals]
        bars = ax.bar(pos, ys, w, label=name)
        for b, v in zip(bars, vals, strict=True):
            if v is None:
                txt = "not run"
            elif isinstance(v, str):
                txt = "OOM" if "OOM" in v else v.split()[0]
            else:
                txt = f"{v:.1f}"
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel(unit)
    # Headroom above the tallest bar and the legend in a row at the top, so that no value
    # label sits under the legend (a corner legend hid one in Fig. 10).
    top = max((v for vals in series.values() for v in vals
               if isinstance(v, float) and np.isfinite(v)), default=1.0)  # fmt: skip
    ax.set_ylim(0, top * 1.3)
    ax.legend(fontsize=8, loc="upper center", ncol=max(n, 1), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def _value(rows, key, **kw):
    """The measured figure, the status of a run that did not fit, or None (not run)."""
    got = [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
    ok = [r for r in got if r["status"] == "ok"]
    if ok:
        return float(ok[0][key])
    return got[0]["status"] if got else None


def source_figure(plt, rows, out: Path) -> list[str]:
    """Fig. 9: the source an AGX (table4) or an NX (source), every method."""
    nx = [r for r in rows if r["experiment"] == "source"]
    if not _ok(nx):
        return []
    model = _ok(nx)[0]["model"]
    agx = [r for r in rows if r["experiment"] == "table4" and r["model"] == model]
    used = _ok(agx) + _ok(nx)
    fig, axes = _figure(plt, f"Fig. 9: {model}, source node AGX-like vs NX-like", used, 2)
    for ax, obj, key, unit in (
        (axes[0], "latency", "latency_ms_per_token", "latency, ms/token (lower is better)"),
        (axes[1], "throughput", "tokens_per_s", "throughput, tokens/s (higher is better)"),
    ):
        groups = [LABEL[m] for m in METHODS[:4]]
        series = {
            f"{src} source": [_value(rs, key, strategy=m, objective=obj) for m in METHODS[:4]]
            for src, rs in (("AGX", agx), ("NX", nx))
        }
        _bars(ax, groups, series, unit)
        ax.set_title(f"({'ab'[obj == 'throughput']}) {obj}", fontsize=9)
    return [_save(fig, out, "fig9_source.png")]


def profiling_figure(plt, rows, out: Path) -> list[str]:
    """Fig. 10: EdgeShard planned from prefill, decode, average or workload costs."""
    pr = _ok([r for r in rows if r["experiment"] == "profiling"])
    if not pr:
        return []
    model = pr[0]["model"]
    if not any(r["profile_strategy"] == "workload" for r in pr):  # the bench reuses table4's
        pr += _ok([r for r in rows if r["experiment"] == "table4"], model=model,
                  strategy="edgeshard", profile_strategy="workload")  # fmt: skip
    fig, axes = _figure(plt, f"Fig. 10: {model} EdgeShard under each profiling strategy", pr, 2)
    strategies = ("prefill", "decode", "average", "workload")
    for ax, obj, key, unit in (
        (axes[0], "latency", "latency_ms_per_token", "latency, ms/token (lower is better)"),
        (axes[1], "throughput", "tokens_per_s", "throughput, tokens/s (higher is better)"),
    ):
        vals = [_value(pr, key, profile_strategy=s, objective=obj) for s in strategies]
        _bars(ax, [f"{s}-profile" for s in strategies], {"EdgeShard": vals}, unit)
        ax.set_title(f"({'ab'[obj == 'throughput']}) {obj}", fontsize=9)
    return [_save(fig, out, "fig10_profiling.png")]


def orders_figure(plt, rows, out: Path) -> list[str]:
    """Fig. 11: pipelined throughput, bubbles (orders) vs no-bubbles (table4)."""
    bub = _ok([r for r in rows if r["experiment"] == "orders"])
    if not bub:
        return []
    models = list(dict.fromkeys(r["model"] for r in bub))
    t4 = [r for r in rows if r["experiment"] == "table4"]
    used = bub + _ok(t4, objective="throughput")
    fig, axes = _figure(plt, "Fig. 11: pipelined throughput, bubbles vs no-bubbles order\n"
                        "(per method: the same plan and micro-batches in both orders)",
                        used, len(models), width=max(6.0, 8.0 / len(models)))  # fmt: skip
    methods = ("cloud-edge-even", "cloud-edge-opt", "edgeshard")
    for i, (ax, model) in enumerate(zip(axes, models, strict=True)):
        series = {
            "bubbles order": [  # by name: the run has the no-bubbles run's explicit plan
                _value(bub, "tokens_per_s", model=model, run=f"{model}-{m}-bubbles")
                for m in methods],
            "no-bubbles order": [
                _value(t4, "tokens_per_s", model=model, strategy=m, objective="throughput")
                for m in methods],
        }  # fmt: skip
        _bars(ax, [LABEL[m] for m in methods], series, "throughput, tokens/s (higher is better)")
        ax.set_title(f"({'abcdef'[i]}) {model}", fontsize=9)
    return [_save(fig, out, "fig11_orders.png")]


def fidelity_figure(plt, rows, out: Path) -> list[str]:
    """Measured / predicted for every run (sequential: time; pipelined: throughput)."""
    ok = [r for r in rows if r["status"] == "ok"]
    seq = [
        (r["predicted_ms_per_token"], r["latency_ms_per_token"])
        for r in ok
        if r["mode"] != "pipeline" and np.isfinite(r["predicted_ms_per_token"])
    ]
    pipe = [(r["predicted_tokens_per_s"], r["tokens_per_s"]) for r in ok
            if r["mode"] == "pipeline" and np.isfinite(r["predicted_tokens_per_s"])]  # fmt: skip
    if not seq and not pipe:
        return []

    def within(pts, band, inverted):
        # The bench's closing line's measure (bench/paper_fidelity.py): a ratio of times, so
        # pipelined runs compare predicted / measured tokens/s (1.17 slow is outside +-15%,
        # though its tokens/s ratio 0.855 is not).
        return sum(abs((p / m if inverted else m / p) - 1) <= band for p, m in pts)

    fig, axes = _figure(plt, "Measured vs predicted, every run", ok, 2, width=5.0)
    for ax, pts, unit, band, what, inverted in (
        (axes[0], seq, "ms/token", 0.10, "sequential latency", False),
        (axes[1], pipe, "tokens/s", 0.15, "pipelined throughput", True),
    ):
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=18, label="one run")
            lo = min(min(p) for p in pts) * 0.8
            hi = max(max(p) for p in pts) * 1.25
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
            for f in (1 - band, 1 + band):
                f = 1 / f if inverted else f
                ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.7)
            ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi))
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=8)
        ax.set(xlabel=f"predicted, {unit}", ylabel=f"measured, {unit}")
        n_in = within(pts, band, inverted)
        ax.set_title(f"{what}: {n_in} of {len(pts)} within ±{band:.0%} of the time (dotted)",
                     fontsize=9)  # fmt: skip
        ax.grid(alpha=0.3)
    return [_save(fig, out, "predicted_vs_measured.png")]


def all_figures(rows, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for fn in (sweep_figures, source_figure, profiling_figure, orders_figure, fidelity_figure):
        made += fn(plt, rows, out)
    return made
