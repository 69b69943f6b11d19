"""The report's figures: each function draws one part of a report summary (fuselabel.report.summarize).

Figures are ``matplotlib.figure.Figure`` objects rendered by Agg when saved; pyplot and its global
state are never touched, so drawing a report changes nothing for a caller that also plots.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

# Small multiples (one panel per label) wrap at this many columns.
PANEL_COLUMNS = 8


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _panels(count: int, size: float = 1.6, columns: int = PANEL_COLUMNS):
    cols = max(1, min(columns, count))
    rows = max(1, math.ceil(count / cols))
    fig = _figure(cols * size + 0.4, rows * size + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, axes[:count]


def per_label_scores(summary: dict) -> Figure:
    """Precision, recall and F1 of every label at the model's thresholds, with each label's support."""
    rows = summary["report"]["per_label"]
    names = summary["names"]
    y = np.arange(len(rows))
    fig = _figure(8, 1.2 + 0.3 * len(rows))
    ax = fig.subplots()
    h = 0.27
    for k, (key, colour) in enumerate((("precision", "#4c72b0"), ("recall", "#dd8452"), ("f1", "#55a868"))):
        ax.barh(y + (k - 1) * h, [r[key] for r in rows], height=h, color=colour, label=key)
    for yi, r in zip(y, rows):
        ax.text(1.01, yi, f"n={r['support']}", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("score at the model's thresholds")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Per-label precision, recall and F1 (n = rows holding the label)")
    return fig


def confusion_matrices(summary: dict) -> Figure:
    """One 2x2 confusion matrix per label: rows the truth (no, yes), columns the prediction."""
    rows = summary["report"]["per_label"]
    fig, axes = _panels(len(rows))
    for ax, r, name in zip(axes, rows, summary["names"]):
        m = np.array([[r["tn"], r["fp"]], [r["fn"], r["tp"]]])
        # Each truth row as a share of itself, so rare labels' misses show as plainly as common ones'.
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks([0, 1], ["no", "yes"], fontsize=6)
        ax.set_yticks([0, 1], ["no", "yes"], fontsize=6)
        ax.set_title(name, fontsize=8)
    fig.suptitle("Confusion matrices per label (rows: truth, columns: prediction)")
    return fig


def threshold_curve(summary: dict) -> Figure:
    """Mean F1 if one global threshold were used, with the model's own decision marked."""
    curve = summary["threshold_curve"]
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    ax.plot(curve["grid"], curve["mean_f1"], color="#4c72b0", label="one global threshold")
    best = int(np.argmax(curve["mean_f1"]))
    ax.plot(curve["grid"][best], curve["mean_f1"][best], "o", color="#4c72b0", fillstyle="none",
            label=f"best: {curve['grid'][best]:.2f} -> {curve['mean_f1'][best]:.4f}")
    if curve["chosen"] is not None:
        ax.plot(curve["chosen"], curve["model_mean_f1"], "*", color="#c44e52", markersize=14,
                label=f"model's threshold {curve['chosen']:.2f} -> {curve['model_mean_f1']:.4f}")
    else:
        ax.axhline(curve["model_mean_f1"], color="#c44e52", linestyle="--",
                   label=f"model's per-label thresholds -> {curve['model_mean_f1']:.4f}")
    ax.set_xlabel("threshold")
    ax.set_ylabel("mean F1 (rows)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Mean F1 against the global threshold")
    return fig


def pr_curves(summary: dict) -> Figure:
    """Precision-recall curve of every label, its average precision in the title."""
    fig, axes = _panels(len(summary["names"]))
    for ax, curve, name in zip(axes, summary["pr"], summary["names"]):
        if curve["ap"] is None:
            ax.text(0.5, 0.5, "no positive rows", ha="center", va="center", fontsize=7)
        else:
            ax.plot(curve["recall"], curve["precision"], color="#4c72b0", linewidth=1)
            ax.plot(curve["point"][0], curve["point"][1], "o", color="#c44e52", markersize=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        ax.set_title(name if curve["ap"] is None else f"{name} (AP {curve['ap']:.2f})", fontsize=8)
    fig.suptitle("Precision (y) against recall (x) per label; dot: the model's threshold")
    return fig


def reliability(summary: dict) -> Figure:
    """Reliability diagrams: how often a label is true among (row, label) pairs given each probability."""
    heads = summary["calibration"]
    fig = _figure(3.4 * len(heads) + 0.4, 4.6)
    axes = np.atleast_1d(fig.subplots(2, len(heads), squeeze=False, sharex=True, height_ratios=[3, 1]))
    for k, (head, cal) in enumerate(heads.items()):
        top, bottom = axes[0, k], axes[1, k]
        top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        top.plot(cal["prob_pred"], cal["prob_true"], "o-", color="#4c72b0", markersize=3)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{head}: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}", fontsize=9)
        top.set_ylabel("share true")
        centres = (cal["edges"][:-1] + cal["edges"][1:]) / 2
        bottom.bar(centres, cal["counts"], width=np.diff(cal["edges"]), color="#8da0cb", edgecolor="white")
        bottom.set_yscale("log")
        bottom.set_xlabel("predicted probability")
        bottom.set_ylabel("pairs", fontsize=8)
    fig.suptitle("Calibration of each head and of the fused probabilities")
    return fig


def training_curves(history: list[dict]) -> Figure:
    """Loss and validation mean F1 per epoch, from the run's log."""
    fig = _figure(8, 3.4)
    loss_ax, f1_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), "o-", markersize=3, label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
    points = [(h["epoch"], h["val_f1"]) for h in history if h.get("val_f1") is not None]
    if points:
        f1_ax.plot(*zip(*points), "o-", markersize=3, color="#55a868")
        best = max(points, key=lambda p: p[1])
        f1_ax.plot(*best, "*", color="#c44e52", markersize=12, label=f"best {best[1]:.4f} (epoch {best[0]})")
        f1_ax.legend(fontsize=8)
    f1_ax.set_xlabel("epoch")
    f1_ax.set_ylabel("validation mean F1")
    fig.suptitle("Training curves")
    return fig


def label_frequency(summary: dict) -> Figure:
    """How many rows hold each label."""
    names, counts = summary["names"], summary["frequency"]
    fig = _figure(max(6, 0.18 * len(names) + 2), 3.6)
    ax = fig.subplots()
    ax.bar(np.arange(len(names)), counts, color="#4c72b0")
    ax.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("rows")
    ax.set_title(f"Label frequency over {summary['rows']} rows")
    return fig


def cooccurrence(summary: dict) -> Figure:
    """Share of the rows holding label i (row) that also hold label j (column)."""
    names = summary["names"]
    counts = np.asarray(summary["cooccurrence"], dtype=float)
    share = counts / np.maximum(np.diag(counts)[:, None], 1)
    np.fill_diagonal(share, np.nan)  # always 1: would swamp the colour scale
    side = max(4.5, 0.16 * len(names) + 2.5)
    fig = _figure(side + 1, side)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize=6 if len(names) > 20 else 8)
    ax.set_yticks(ticks, names, fontsize=6 if len(names) > 20 else 8)
    fig.colorbar(image, ax=ax, shrink=0.8, label="P(column label | row label)")
    ax.set_title("Label co-occurrence")
    return fig


def modality_share(summary: dict) -> Figure:
    """Mean F1 with both inputs, with the photo removed and with the caption removed."""
    cases = [(k, v) for k, v in summary["modality"].items() if v is not None]
    fig = _figure(5.5, 3.2)
    ax = fig.subplots()
    colours = ["#55a868", "#4c72b0", "#dd8452"]
    bars = ax.bar([k for k, _ in cases], [v for _, v in cases], color=colours[:len(cases)])
    for bar, (_, v) in zip(bars, cases):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.4f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("mean F1 (rows)")
    ax.set_title("How much each input carries")
    return fig
