"""The validation report: report.md and report.html with matplotlib figures (PNG, Agg backend).

Figures: predicted vs measured on log axes with y = x and a +-5% band (the structured model held out by
model, the seed formula and weights x 1.2 on the same axes); the error by model and by context; the
breakdown of the predicted terms beside the measured allocated / reserved / NVML peaks.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

GIB = 2**30
FIGURES = {
    "pred_vs_measured.png": "Predicted vs measured peak (NVML), log axes; y = x and a +-5% band",
    "error_by_model.png": "Error of the held-out prediction by model",
    "error_by_context.png": "Error of the held-out prediction by context (prompt + new tokens)",
    "breakdown.png": "Predicted terms beside the measured allocated / reserved / NVML peaks",
}
DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7})
    return plt


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%" if x < 0 else f"{100 * x:.2f}%"


def figures(rows, out: Path) -> list[str]:
    """Write the PNGs from the per-record frame ``rows`` (see ``calibration.cli``); returns their names."""
    import numpy as np

    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    models = sorted(rows["model"].unique())
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    measured = rows["peak_nvml_bytes"] / GIB
    written = []

    # 1. predicted vs measured
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    shown = [rows[c] / GIB for c in ("pred_total_bytes", "lomo_total_bytes", "seed_total_bytes",
                                      "times12_total_bytes") if c in rows]
    lo = min([measured.min()] + [v.min() for v in shown]) * 0.8
    hi = max([measured.max()] + [v.max() for v in shown]) * 1.25
    xs = np.geomspace(lo, hi, 50)
    ax.fill_between(xs, xs * 0.95, xs * 1.05, color="0.85", label="+-5%")
    ax.plot(xs, xs, color="0.3", lw=0.8, label="y = x")
    for m in models:
        sel = rows["model"] == m
        col = "lomo_total_bytes" if "lomo_total_bytes" in rows else "pred_total_bytes"
        ax.scatter(measured[sel], rows.loc[sel, col] / GIB, s=14, color=colors[m], label=f"{m}", zorder=3)
    if "seed_total_bytes" in rows:
        ax.scatter(measured, rows["seed_total_bytes"] / GIB, s=12, marker="x", color="0.45",
                   label="seed formula (fitted)", zorder=2)
    if "times12_total_bytes" in rows:
        ax.scatter(measured, rows["times12_total_bytes"] / GIB, s=12, marker="v", facecolors="none",
                   edgecolors="0.6", label="weights x 1.2", zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _gib_ticks(ax, lo, hi)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured peak, NVML (GiB)")
    ax.set_ylabel("predicted peak (GiB)")
    ax.set_title("structured model (held-out model) vs baselines")
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(out / "pred_vs_measured.png", dpi=DPI)
    plt.close(fig)
    written.append("pred_vs_measured.png")

    err_col = "lomo_error" if "lomo_error" in rows else "error"
    # 2. error by model
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    for i, m in enumerate(models):
        e = rows.loc[rows["model"] == m, err_col] * 100
        jitter = (np.arange(len(e)) % 7 - 3) * 0.04
        ax.scatter(i + jitter, e, s=12, color=colors[m])
    for y, style in ((2, ":"), (-2, ":"), (5, "--"), (-5, "--")):
        ax.axhline(y, color="0.5", lw=0.7, ls=style)
    ax.axhline(0, color="0.3", lw=0.7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=20, ha="right")
    ax.set_ylabel("error (%)")
    ax.set_title("held-out error by model (dotted +-2%, dashed +-5%)")
    fig.tight_layout()
    fig.savefig(out / "error_by_model.png", dpi=DPI)
    plt.close(fig)
    written.append("error_by_model.png")

    # 3. error by context
    fig, ax = plt.subplots(figsize=(6.8, 3.0))
    markers = {"generate": "o", "forward": "s"}
    for m in models:
        for wl, mk in markers.items():
            sel = (rows["model"] == m) & (rows["workload"] == wl)
            if sel.any():
                ax.scatter(rows.loc[sel, "context"], rows.loc[sel, err_col] * 100, s=12, marker=mk,
                           color=colors[m], label=f"{m} ({wl})")
    for y, style in ((5, "--"), (-5, "--")):
        ax.axhline(y, color="0.5", lw=0.7, ls=style)
    ax.axhline(0, color="0.3", lw=0.7)
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("context, tokens per sequence")
    ax.set_ylabel("error (%)")
    ax.set_title("held-out error by context")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "error_by_context.png", dpi=DPI)
    plt.close(fig)
    written.append("error_by_context.png")

    # 4. breakdown
    order = rows.sort_values("peak_nvml_bytes").index
    r = rows.loc[order]
    x = np.arange(len(r))
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    bottom = np.zeros(len(r))
    parts = [("weights_bytes_pred", "weights", "#4c72b0"), ("kv_bytes_pred", "KV cache (final)", "#55a868"),
             ("activation_bytes_pred", "activations + transient KV", "#dd8452"),
             ("overhead_bytes_pred", "overhead: context + allocator reserve", "#8172b2")]
    for col, label, color in parts:
        if col in r:
            v = r[col].to_numpy(dtype=float) / GIB
            ax.bar(x, v, bottom=bottom, width=0.8, color=color, label=label, lw=0)
            bottom += v
    ax.scatter(x, r["peak_allocated_bytes"] / GIB, s=6, color="k", marker="_", label="measured allocated", zorder=3)
    ax.scatter(x, r["peak_reserved_bytes"] / GIB, s=6, color="k", marker="x", label="measured reserved", zorder=3)
    ax.scatter(x, r["peak_nvml_bytes"] / GIB, s=6, color="r", marker="o", label="measured NVML", zorder=3)
    ax.set_xlabel("records, by measured peak")
    ax.set_ylabel("GiB")
    ax.set_xticks([])
    ax.set_title("predicted terms (bars) and measured peaks (markers)")
    ax.legend(loc="upper left", frameon=False, fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=DPI)
    plt.close(fig)
    written.append("breakdown.png")
    return written


def _gib_ticks(ax, lo: float, hi: float) -> None:
    """Plain GiB labels (1, 2, 5, 10, 20, 50, ...) on both log axes."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ticks = [m * 10**e for e in range(-2, 4) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


def _table(headers: list[str], rows: list[list]) -> tuple[str, str]:
    """(markdown, html) of a table."""
    md = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return "\n".join(md), f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _summary_row(name: str, s: dict) -> list:
    return [name, s.get("n"), _pct(s.get("median_abs_error")), _pct(s.get("p90_abs_error")),
            _pct(s.get("worst_underestimate")), _pct(s.get("worst_overestimate")),
            _pct(s.get("interval_coverage")) if s.get("interval_coverage") is not None else "-"]


SUMMARY_HEADERS = ["", "n", "median abs", "p90 abs", "worst under", "worst over", "interval coverage"]


def write_report(out: Path, result: dict, rows) -> list[Path]:
    """report.md, report.html and the figures in ``out``; ``result`` is ``calibration.cli``'s JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = figures(rows, out)
    md, ht = [], []

    def para(text: str):
        md.append(text + "\n")
        ht.append(f"<p>{html.escape(text)}</p>")

    def head(text: str, level: int = 2):
        md.append("#" * level + " " + text + "\n")
        ht.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def table(headers, data):
        m, h = _table(headers, data)
        md.append(m + "\n")
        ht.append(h)

    head("vramcal validation report", 1)
    para(f"Records: {result['summary']['n']} used; left out: "
         f"{json.dumps(result.get('left_out') or {})}. Errors are (predicted - measured) / measured NVML peak; "
         "negative = under-estimate. Coefficients: " + ", ".join(sorted(set(result.get("coefficients_used", [])))) + ".")
    for src in result.get("sources", []):
        para(f"Source: {src['path']} (sha256 {src['sha256'][:16]}..., {src['records']} records)")

    head("Summary")
    data = [_summary_row("structured model, shipped coefficients", result["summary"])]
    lomo = result.get("lomo")
    if lomo:
        data.append(_summary_row("structured model, leave-one-model-out", lomo["summary"]))
        for name, s in lomo.get("baselines", {}).items():
            data.append(_summary_row(name, s))
    table(SUMMARY_HEADERS, data)
    if lomo and lomo.get("goal"):
        para("Goal (issue 4, held-out models): median <= 2%, p90 <= 5%, worst under-estimate >= -5%, "
             "coverage >= 90%. Met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in lomo["goal"].items()))
    if lomo and lomo.get("seed_coefficients"):
        c = lomo["seed_coefficients"]
        para(f"Seed formula fitted on all records: kv_factor {c['kv_factor']:.3f}, overhead_bytes "
             f"{c['overhead_bytes'] / 1e9:.3f} GB, overhead_fraction {100 * c['overhead_fraction']:.2f}% "
             "(published guesses 0.30, 0.8 GB, 10%).")

    head("By subgroup" + (" (leave-one-model-out)" if lomo else ""))
    groups = (lomo or result)["subgroups"]
    for name, by in groups.items():
        table([name] + SUMMARY_HEADERS[1:], [_summary_row(k, s)[0:1] + _summary_row(k, s)[1:] for k, s in by.items()])

    head("Figures")
    for png in pngs:
        md.append(f"![{FIGURES.get(png, png)}]({png})\n")
        ht.append(f"<figure><img src='{png}' alt='{html.escape(FIGURES.get(png, png))}'>"
                  f"<figcaption>{html.escape(FIGURES.get(png, png))}</figcaption></figure>")

    head("Largest errors" + (" (held out)" if lomo else ""))
    col = "lomo_error" if "lomo_error" in rows else "error"
    worst = rows.reindex(rows[col].abs().sort_values(ascending=False).index).head(12)
    table(["model", "workload", "attn", "dtype", "batch", "context", "measured GiB", "error"],
          [[r["model"], r["workload"], r["attn_implementation"], r["dtype"], r["batch_size"], r["context"],
            f"{r['peak_nvml_bytes'] / GIB:.2f}", _pct(r[col])] for _, r in worst.iterrows()])
    for note in result.get("notes", []):
        para(note)

    (out / "report.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;font-size:14px}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "text-align:right}figure{display:inline-block;margin:0.5em}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>vramcal validation"
                                     f"</title><style>{style}</style></head><body>{''.join(ht)}</body></html>")
    return [out / "report.md", out / "report.html"] + [out / p for p in pngs]
