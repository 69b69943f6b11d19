"""Results of a study: rows grouped by settings (mean ± std over seeds), written as CSV, Markdown, JSON and a plot.

``write_results`` rewrites every file after each run with atomic replaces, so a reader never sees a
half-written table and nothing already written is lost when a later run fails.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .writers import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

NA = "-"  # a setting that cannot matter for this run
METRIC_COLUMNS = (
    "val_mean_f1",
    "val_f1_global",
    "val_f1_per_class",
    "val_f1_balanced",
    "micro_f1",
    "macro_f1",
    "late_weight",
    "val_rows",
    "features_s",
    "train_s",
    "total_s",
    "size_mb",
)


def _stats(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def summarize(rows: list[dict], varied: list[str]) -> list[dict]:
    """Rows grouped by their settings and threshold method: n, failures, mean and sample std of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(str(r.get(k, "")) for k in varied) + (r["threshold_method"],)
        groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        ok = [m for m in members if m["status"] == "ok"]
        g: dict[str, Any] = dict(zip(varied + ["threshold_method"], key))
        g.update(
            n=len(ok),
            failed=len(members) - len(ok),
            errors=sorted({m["error"] for m in members if m["status"] != "ok"}),
        )
        for col in METRIC_COLUMNS:
            vals = [m[col] for m in ok if m.get(col) is not None]
            g[col] = _stats(vals) if vals else None
        out.append(g)
    return out


def _fmt(stat, digits: int = 4) -> str:
    """mean ± std; digits < 0: the mean alone, with -digits decimals (timings and sizes)."""
    if stat is None:
        return ""
    mean, std = stat
    if digits < 0:
        return f"{mean:.{-digits}f}"
    if std is None:
        return f"{mean:.{digits}f} ± –"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(plan_name: str, groups: list[dict], varied: list[str], rows: list[dict]) -> str:
    cols = varied + ["threshold_method"]
    # All three threshold rules per model, unless the rows already are one per rule.
    one_method = len({g["threshold_method"] for g in groups}) == 1
    alternatives = (
        [
            ("F1 global", "val_f1_global", 4),
            ("F1 per_class", "val_f1_per_class", 4),
            ("F1 balanced", "val_f1_balanced", 4),
        ]
        if one_method
        else []
    )
    metric_cols = (
        [("mean F1", "val_mean_f1", 4)]
        + alternatives
        + [
            ("micro F1", "micro_f1", 4),
            ("macro F1", "macro_f1", 4),
            ("features s", "features_s", -1),
            ("train s", "train_s", -1),
            ("total s", "total_s", -1),
            ("size MB", "size_mb", -1),
        ]
    )
    header = cols + ["n", "failed"] + [c[0] for c in metric_cols]
    lines = [
        f"# Experiment `{plan_name}`",
        "",
        f"{len(rows)} result rows, {sum(r['status'] != 'ok' for r in rows)} failed. Values are mean ± sample "
        "std over seeds (± – for a single seed); timings and sizes are means. *mean F1* is validation mean F1 "
        "with the row's threshold method"
        + (
            "; *F1 global / per_class / balanced* are all three methods on the same trained models"
            if one_method
            else ""
        )
        + ". Runs that differ only in threshold method "
        "share one training.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(cols) + ["---:"] * (len(header) - len(cols))) + "|",
    ]
    for g in groups:
        cells = [_md_cell(g[c]) for c in cols] + [str(g["n"]), str(g["failed"])]
        cells += [_fmt(g[key], d) for _, key, d in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failed runs", ""]
        for r in failures:
            lines.append(f"- `{r['run_id']}` (seed {r['seed']}, {r['threshold_method']}): {_md_cell(r['error'])}")
    return "\n".join(lines) + "\n"


def plot_results(path: Path, groups: list[dict], varied: list[str], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, means, errs, notes = [], [], [], []
    for g in groups:
        parts = [f"{k}={g[k]}" for k in varied if g[k] not in ("", NA)]
        labels.append(", ".join(parts + [f"thresholds={g['threshold_method']}"]))
        stat = g["val_mean_f1"]
        means.append(stat[0] if stat else 0.0)
        errs.append(stat[1] if stat and stat[1] is not None else 0.0)
        notes.append(
            ("" if g["n"] else "failed, ") + f"n={g['n']}" + (f", {g['failed']} failed" if g["failed"] else "")
        )
    height = max(2.5, 0.38 * len(groups) + 1.2)
    fig = Figure(figsize=(10, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(groups))
    ax.barh(y, means, xerr=errs, capsize=3, color="#4c72b0", alpha=0.85)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ok = [m for m, g in zip(means, groups) if g["n"]]
    lo = max(0.0, min(ok) - 0.05) if ok else 0.0
    ax.set_xlim(lo, 1.0)
    for yi, m, note in zip(y, means, notes):  # inside the bar's left end: never clipped at F1 = 1
        text = f"{m:.3f} ({note})" if not note.startswith("failed") else note
        ax.text(
            lo + 0.003 * (1 - lo),
            yi,
            text,
            va="center",
            fontsize=7,
            color="white" if m > lo + 0.15 * (1 - lo) else "black",
        )
    ax.set_xlabel("validation mean F1 (mean ± std over seeds)")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write_results(out: Path, plan, rows: list[dict], spec: dict | None = None) -> None:
    """results.csv / .md / .json / .png for the rows so far (atomic replaces, so a reader never sees half).

    ``plan`` is the study's fuselabel.experiment.Plan (its ``name`` and ``varied`` settings are used).
    """
    out.mkdir(parents=True, exist_ok=True)
    columns = (
        ["run_id", "status"]
        + plan.varied
        + ["threshold_method", "seed"]
        + list(METRIC_COLUMNS)
        + ["model_dir", "error"]
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {k: ("" if r.get(k) is None else round(r[k], 6) if isinstance(r.get(k), float) else r[k]) for k in columns}
        )
    atomic_write_text(out / "results.csv", [buf.getvalue()])
    groups = summarize(rows, plan.varied)
    atomic_write_text(out / "results.md", [format_markdown(plan.name, groups, plan.varied, rows)])
    atomic_write_text(
        out / "results.json",
        [
            json.dumps({"name": plan.name, "grid": spec, "varied": plan.varied, "rows": rows}, indent=2, default=str)
            + "\n"
        ],
    )
    try:
        plot_results(out / "results.png", groups, plan.varied, f"{plan.name}: validation mean F1")
    except Exception as err:  # a plotting problem must not lose a night of results
        logger.warning("could not draw %s: %s", out / "results.png", err)
