"""The report's figures: each function draws one part of a report summary (fuselabel.report.summarize).

Per-label figures draw the labels the summary chose for them (``shown``: every label up to 30, beyond that
the most frequent, worst and most confused; ``frequent``: the most frequent), so no figure outgrows a screen
however many labels the model has; the page's table lists every label.

Figures are ``matplotlib.figure.Figure`` objects rendered by Agg when saved; pyplot and its global
state are never touched, so drawing a report changes nothing for a caller that also plots. Sizes are
in inches shown at 96 CSS pixels each, so no text is smaller than ``SMALL`` points (about 11 CSS px).
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

# Small multiples (one panel per label) wrap at this many columns: narrow enough for a phone held upright.
PANEL_COLUMNS = 4
SMALL, TEXT = 8, 9  # font sizes in points: tick labels and annotations; titles and legends


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _panels(count: int, size: float = 1.9, columns: int = PANEL_COLUMNS, share: bool = False):
    """One panel per label; with ``share``, the axes' tick labels only on the outer panels."""
    cols = max(1, min(columns, count))
    rows = max(1, math.ceil(count / cols))
    fig = _figure(cols * size + 0.5, rows * size + 0.6)
    grid = fig.subplots(rows, cols, squeeze=False, sharex=share, sharey=share)
    axes = np.atleast_1d(grid.ravel())
    for ax in axes[count:]:
        ax.set_axis_off()
    if share:  # the outer row and column keep their tick labels, also where the last row is short
        for k, ax in enumerate(axes[:count]):
            ax.tick_params(labelsize=SMALL, labelbottom=k + cols >= count, labelleft=k % cols == 0)
    return fig, axes[:count]


def _label_margin(names) -> float:
    """Inches a column of tick labels needs, from its longest name."""
    return 0.3 + 0.065 * max((len(n) for n in names), default=1)


def per_label_scores(summary: dict) -> Figure:
    """Precision, recall and F1 of every label at the model's thresholds, with each label's support."""
    rows = [summary["report"]["per_label"][j] for j in summary["shown"]]
    names = [summary["names"][j] for j in summary["shown"]]
    y = np.arange(len(rows))
    fig = _figure(_label_margin(names) + 5, 1.4 + 0.32 * len(rows))
    ax = fig.subplots()
    h = 0.27
    for k, (key, colour) in enumerate((("precision", "#4c72b0"), ("recall", "#dd8452"), ("f1", "#55a868"))):
        ax.barh(y + (k - 1) * h, [r[key] for r in rows], height=h, color=colour, label=key)
    for yi, r in zip(y, rows):
        ax.text(1.01, yi, f"n={r['support']}", va="center", fontsize=SMALL)
    ax.set_yticks(y, names, fontsize=SMALL)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("score at the model's thresholds")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=TEXT, frameon=False)
    fig.suptitle("Per-label precision, recall and F1 (n = rows holding the label)", fontsize=TEXT + 1)
    return fig


def confusion_matrices(summary: dict) -> Figure:
    """One 2x2 confusion matrix per label: rows the truth (no, yes), columns the prediction."""
    shown = summary["shown"]
    fig, axes = _panels(len(shown), size=1.6, columns=5)
    for ax, j in zip(axes, shown):
        r, name = summary["report"]["per_label"][j], summary["names"][j]
        m = np.array([[r["tn"], r["fp"]], [r["fn"], r["tp"]]])
        # Each truth row as a share of itself, so rare labels' misses show as plainly as common ones'.
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j, i, str(v), ha="center", va="center", fontsize=TEXT, color="white" if share[i, j] > 0.6 else "black"
            )
        ax.set_xticks([0, 1], ["no", "yes"], fontsize=SMALL)
        ax.set_yticks([0, 1], ["no", "yes"], fontsize=SMALL)
        ax.set_title(name, fontsize=TEXT)
    fig.suptitle("Confusion matrices per label (rows: truth, columns: prediction)", fontsize=TEXT + 1)
    return fig


def threshold_curve(summary: dict) -> Figure:
    """Mean F1 if one global threshold were used, with the model's own decision marked."""
    curve = summary["threshold_curve"]
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    ax.plot(curve["grid"], curve["mean_f1"], color="#4c72b0", label="one global threshold")
    best = int(np.argmax(curve["mean_f1"]))
    ax.plot(
        curve["grid"][best],
        curve["mean_f1"][best],
        "o",
        color="#4c72b0",
        fillstyle="none",
        label=f"best: {curve['grid'][best]:.2f} -> {curve['mean_f1'][best]:.4f}",
    )
    if curve.get("rule") == "argmax":
        ax.axhline(
            curve["model_mean_f1"],
            color="#c44e52",
            linestyle="--",
            label=f"model's rule (the most probable label) -> {curve['model_mean_f1']:.4f}",
        )
    elif curve["chosen"] is not None:
        ax.plot(
            curve["chosen"],
            curve["model_mean_f1"],
            "*",
            color="#c44e52",
            markersize=14,
            label=f"model's threshold {curve['chosen']:.2f} -> {curve['model_mean_f1']:.4f}",
        )
    else:
        ax.axhline(
            curve["model_mean_f1"],
            color="#c44e52",
            linestyle="--",
            label=f"model's per-label thresholds -> {curve['model_mean_f1']:.4f}",
        )
    ax.set_xlabel("threshold")
    ax.set_ylabel("mean F1 (rows)")
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=SMALL)
    ax.legend(fontsize=TEXT)
    ax.set_title("Mean F1 against the global threshold", fontsize=TEXT + 1)
    return fig


def pr_curves(summary: dict) -> Figure:
    """Precision-recall curve of every label, its average precision in the title."""
    shown = summary["shown"]
    fig, axes = _panels(len(shown), share=True)
    for ax, j in zip(axes, shown):
        curve, name = summary["pr"][j], summary["names"][j]
        if curve["ap"] is None:
            ax.text(0.5, 0.5, "no positive rows", ha="center", va="center", fontsize=SMALL)
        else:
            ax.plot(curve["recall"], curve["precision"], color="#4c72b0", linewidth=1.2)
            ax.plot(curve["point"][0], curve["point"][1], "o", color="#c44e52", markersize=5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"])
        ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"])
        ax.set_title(name if curve["ap"] is None else f"{name} (AP {curve['ap']:.2f})", fontsize=TEXT)
    fig.supxlabel("recall", fontsize=TEXT)
    fig.supylabel("precision", fontsize=TEXT)
    fig.suptitle("Precision against recall per label; dot: the model's threshold", fontsize=TEXT + 1)
    return fig


def reliability(summary: dict) -> Figure:
    """Reliability diagrams: how often a label is true among (row, label) pairs given each probability."""
    heads = summary["calibration"]
    fig = _figure(2.4 * len(heads) + 0.5, 4.2)
    axes = np.atleast_1d(fig.subplots(2, len(heads), squeeze=False, sharex=True, height_ratios=[3, 1]))
    for k, (head, cal) in enumerate(heads.items()):
        top, bottom = axes[0, k], axes[1, k]
        top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        top.plot(cal["prob_pred"], cal["prob_true"], "o-", color="#4c72b0", markersize=3)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{head}: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}", fontsize=TEXT)
        top.set_ylabel("share true", fontsize=TEXT)
        top.tick_params(labelsize=SMALL)
        bottom.tick_params(labelsize=SMALL)
        centres = (cal["edges"][:-1] + cal["edges"][1:]) / 2
        bottom.bar(centres, cal["counts"], width=np.diff(cal["edges"]), color="#8da0cb", edgecolor="white")
        bottom.set_yscale("log")
        bottom.set_xlabel("predicted probability", fontsize=TEXT)
        bottom.set_ylabel("pairs", fontsize=TEXT)
    fig.suptitle("Calibration of each head and of the fused probabilities", fontsize=TEXT + 1)
    return fig


def training_curves(history: list[dict]) -> Figure:
    """Loss and validation mean F1 per epoch, from the run's log."""
    fig = _figure(7, 3.2)
    loss_ax, f1_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), "o-", markersize=3, label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=TEXT)
    points = [(h["epoch"], h["val_f1"]) for h in history if h.get("val_f1") is not None]
    if points:
        f1_ax.plot(*zip(*points), "o-", markersize=3, color="#55a868")
        best = max(points, key=lambda p: p[1])
        f1_ax.plot(*best, "*", color="#c44e52", markersize=12, label=f"best {best[1]:.4f} (epoch {best[0]})")
        f1_ax.legend(fontsize=TEXT)
    f1_ax.set_xlabel("epoch")
    f1_ax.set_ylabel("validation mean F1")
    for ax in (loss_ax, f1_ax):
        ax.tick_params(labelsize=SMALL)
    fig.suptitle("Training curves", fontsize=TEXT + 1)
    return fig


def label_frequency(summary: dict) -> Figure:
    """How many rows hold each label, most frequent first, as horizontal bars (names read across)."""
    order = summary["frequent"]
    counts = np.asarray(summary["frequency"])
    names = [summary["names"][j] for j in order]
    fig = _figure(_label_margin(names) + 4.5, 0.9 + 0.24 * len(names))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, counts[order], color="#4c72b0")
    top = max(int(counts.max(initial=0)), 1)
    for yi, c in zip(y, counts[order]):
        ax.text(c + top * 0.01, yi, str(int(c)), va="center", fontsize=SMALL)
    ax.set_yticks(y, names, fontsize=SMALL)
    ax.set_ylim(len(names) - 0.5, -0.5)  # top to bottom
    ax.set_xlim(0, top * 1.12)
    ax.tick_params(axis="x", labelsize=SMALL)
    ax.set_xlabel("rows holding the label", fontsize=TEXT)
    of = "" if len(order) == len(counts) else f" (the {len(order)} most frequent of {len(counts)} labels)"
    ax.set_title(f"Label frequency over {summary['rows']} rows{of}", fontsize=TEXT + 1)
    return fig


def cooccurrence(summary: dict) -> Figure:
    """Share of the rows holding label i (row) that also hold label j (column), for the most frequent labels."""
    top = sorted(summary["frequent"])
    names = [summary["names"][j] for j in top]
    counts = np.asarray(summary["cooccurrence"], dtype=float)[np.ix_(top, top)]
    share = counts / np.maximum(np.diag(counts)[:, None], 1)
    np.fill_diagonal(share, np.nan)  # always 1: would swamp the colour scale
    # The matrix is square and its tick labels take the same room on both sides, so a figure sized from
    # them is filled by the matrix, whatever the number of labels or the length of their names.
    cell = 0.26 if len(names) > 12 else 0.4
    side, margin = max(2.2, cell * len(names)), _label_margin(names)
    fig = _figure(side + margin + 1.1, side + margin + 0.5)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize=SMALL)
    ax.set_yticks(ticks, names, fontsize=SMALL)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("P(column label | row label)", fontsize=TEXT)
    bar.ax.tick_params(labelsize=SMALL)
    of = "" if len(top) == len(summary["names"]) else f" of the {len(top)} most frequent labels"
    ax.set_title(f"Label co-occurrence{of}", fontsize=TEXT + 1)
    return fig


def modality_share(summary: dict) -> Figure:
    """Mean F1 with both inputs, with the photo removed and with the caption removed."""
    cases = [(k, v) for k, v in summary["modality"].items() if v is not None]
    fig = _figure(5.5, 3.2)
    ax = fig.subplots()
    colours = ["#55a868", "#4c72b0", "#dd8452"]
    bars = ax.bar([k for k, _ in cases], [v for _, v in cases], color=colours[: len(cases)])
    for bar, (_, v) in zip(bars, cases):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.4f}", ha="center", fontsize=TEXT)
    ax.set_ylim(0, 1.08)
    ax.tick_params(labelsize=SMALL)
    ax.set_ylabel("mean F1 (rows)", fontsize=TEXT)
    ax.set_title("How much each input carries", fontsize=TEXT + 1)
    return fig


def changed_labels(comparison: dict, limit: int = 30) -> list[dict]:
    """The per-label rows whose F1 differs between the models, the largest difference first (at most ``limit``)."""
    rows = [r for r in comparison["per_label"] if any(d is not None and abs(d) > 5e-4 for d in r["delta"])]
    rows.sort(key=lambda r: -max(abs(d) for d in r["delta"] if d is not None))
    return rows[:limit]


def f1_deltas(comparison: dict) -> Figure | None:
    """Each model's per-label F1 minus the first model's, one bar per label and model, for the labels that
    differ most (:func:`changed_labels`); None where no label's F1 differs."""
    rows = changed_labels(comparison)
    if not rows:
        return None
    models = comparison["models"][1:]
    names = [r["name"] for r in rows]
    fig = _figure(_label_margin(names) + 4.5, 1.2 + 0.22 * max(len(rows), 1) * max(len(models), 1) ** 0.5)
    ax = fig.subplots()
    y = np.arange(len(rows))
    h = 0.8 / max(len(models), 1)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    for k, model in enumerate(models):
        deltas = [np.nan if r["delta"][k] is None else r["delta"][k] for r in rows]
        ax.barh(
            y + (k - (len(models) - 1) / 2) * h,
            deltas,
            height=h,
            color=colours[k % len(colours)],
            label=f"{model['name']} minus {comparison['models'][0]['name']}",
        )
    ax.axvline(0, color="#444", linewidth=0.8)
    ax.set_yticks(y, names, fontsize=SMALL)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=SMALL)
    ax.set_xlabel("difference in F1", fontsize=TEXT)
    ax.legend(fontsize=TEXT, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(f"Per-label F1 of each model minus {comparison['models'][0]['name']}'s", fontsize=TEXT + 1)
    return fig
