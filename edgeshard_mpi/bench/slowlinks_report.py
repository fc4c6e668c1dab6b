"""The slow-links benchmark's outputs: results.json, results.csv, report.md and a PNG of
latency against quality (bench/slowlinks.py measures)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = (
    "model", "mbps", "label", "plan", "ms_per_token", "tokens_per_s", "ttft_ms", "bytes_sent",
    "cloud_compute_s", "exit_rate", "cloud_calls", "bytes_uploaded", "perplexity",
    "perplexity_exact", "token_agreement", "prefix_agreement", "predicted_ms_per_token", "error",
)  # fmt: skip


def merge(rows: list[dict], qual: dict) -> list[dict]:
    """Each timing row with its quality: a lossy one from its eval (same plan), an exact one
    the exact perplexity (the model's, from any eval) and 100% agreement."""
    exact_ppl = {}
    for (model, _, _), q in qual.items():
        exact_ppl.setdefault(model, q.get("perplexity_exact"))
    out = []
    for r in rows:
        r = dict(r)
        q = qual.get((r["model"], r["label"], r.get("plan")))
        if "error" in r:
            pass
        elif q is not None:
            r |= {k: v for k, v in q.items() if k != "exit_rate"}
            r.setdefault("eval_exit_rate", q.get("exit_rate"))
        else:
            ppl = exact_ppl.get(r["model"])
            r |= {"perplexity": ppl, "perplexity_exact": ppl, "token_agreement": 1.0,
                  "prefix_agreement": 1.0}  # fmt: skip
        out.append(r)
    return out


def _fmt(v, digits=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _ppl(v) -> str:
    """Perplexity; a synthetic-weight model's is astronomically large: 4 digits, e-form."""
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def report(rows: list[dict], qual: dict, out: Path, meta: dict) -> None:
    rows = merge(rows, qual)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# bench-slowlinks",
        "",
        f"Emulation: {meta['emulation']}; host load average {meta['load_start']:.1f} at the "
        f"start, {meta['load_end']:.1f} at the end (2 cores); {meta['seconds'] / 60:.1f} min "
        "in this invocation (runs and evals of an earlier one are reused). "
        f"Timings: medians of {meta.get('repeats', 1)} interleaved runs per configuration.",
        "",
        "| model | Mb/s | configuration | plan | ms/token | tokens/s | bytes on wire | "
        "cloud compute ms | exit rate | perplexity | vs exact | token agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['mbps']:g} | {r['label']} | refused: "
                f"{r['error'][:90]} | | | | | | | | |"
            )
            continue
        ppl, ref = r.get("perplexity"), r.get("perplexity_exact")
        rel = f"{(ppl / ref - 1) * 100:+.2f}%" if ppl and ref else "-"
        agree = r.get("token_agreement")
        lines.append(
            f"| {r['model']} | {r['mbps']:g} | {r['label']} | `{r['plan']}` | "
            f"{_fmt(r['ms_per_token'])} | {_fmt(r['tokens_per_s'])} | "
            f"{r['bytes_sent'] / 1e3:.1f} kB | {_fmt(r['cloud_compute_s'] * 1e3)} | "
            f"{_fmt(r.get('exit_rate'), 2)} | {_ppl(ppl)} | {rel} | "
            f"{_fmt(agree * 100 if agree is not None else None)}% |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "latency-quality.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(models), figsize=(7.8 * len(models), 5.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for i, label in enumerate(labels):
            pts = sorted(
                (r["mbps"], r["ms_per_token"], 100 * r["token_agreement"])
                for r in rows
                if r["model"] == model and r["label"] == label and "error" not in r
                and r.get("token_agreement") is not None
            )  # fmt: skip
            if not pts:
                continue
            mb, x, y = zip(*pts, strict=True)
            marker = "o" if label.startswith("EdgeShard") else "s" if "CE" in label else "^"
            # One point per bandwidth, joined in bandwidth order (1 -> 8 Mb/s).
            ax.plot(x, y, marker=marker, color=cmap(i % 20), label=label, alpha=0.85)
            ax.annotate(f"{mb[0]:g}", (x[0], y[0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
            ax.annotate(f"{mb[-1]:g}", (x[-1], y[-1]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("latency (ms/token, log scale; labels: source-cloud Mb/s)")
        ax.set_ylabel("greedy tokens agreeing with the exact run (%)")
        ax.set_title(f"{model}: latency vs quality, source-cloud 1-8 Mb/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Slow links, emulated small testbed: EdgeShard wires, CE-CoLLM, baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
