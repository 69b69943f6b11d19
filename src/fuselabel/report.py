"""``fuselabel report``: one self-contained HTML file about a model (or several) on labelled rows.

Three steps, each usable alone: :func:`summarize` computes every figure's numbers from arrays (truth,
probabilities, per-head parts, thresholds, names) into a plain dict; fuselabel.figures draws it; and
:func:`write_report` writes one HTML file with every figure (PNG at twice the screen's density) and
photo thumbnail (small JPEG) inside it, so the file alone can be mailed, archived or opened offline.
:func:`build_report` runs a model over a table and does all three; :func:`build_comparison` runs several
models over the same rows and writes one page comparing them (:func:`compare` from arrays).
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, classification_report, precision_recall_curve

from . import figures, outputs
from .images import ImageError, load_rgb
from .labels import labels_to_matrix
from .metrics import evaluate, mean_f1, row_f1
from .runtime import decide
from .thresholds import DEFAULT_GRID, apply_thresholds
from .writers import atomic_write_text

log = logging.getLogger(__name__)

CALIBRATION_BINS = 10
GALLERY_ROWS = 24  # worst rows shown
ISSUE_ROWS = 30  # likely label errors shown
THUMBNAIL_SIZE = 160  # longest side, pixels
MODALITY_CASES = ("both inputs", "photo removed", "caption removed")
DISAGREEMENT_ROWS = 30  # rows where compared models disagree, shown
AVERAGES = ("micro avg", "macro avg", "weighted avg", "samples avg")
FIGURE_DPI = 192  # figures are shown at 96 CSS px an inch: twice the density, sharp on high-density screens


def _calibration(truth: np.ndarray, probs: np.ndarray) -> dict:
    y, p = truth.ravel(), probs.ravel()
    prob_true, prob_pred = calibration_curve(y, p, n_bins=CALIBRATION_BINS)
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    # The same binning as calibration_curve, whose output skips empty bins.
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=CALIBRATION_BINS)
    weights = counts[counts > 0] / len(p)
    return {
        "prob_true": prob_true,
        "prob_pred": prob_pred,
        "edges": edges,
        "counts": counts,
        # expected calibration error: the bins' gaps between confidence and frequency, weighted by size
        "ece": float(np.sum(weights * np.abs(prob_true - prob_pred))),
        "brier": float(brier_score_loss(y, p)),
    }


def _pr_curves(truth: np.ndarray, probs: np.ndarray, per_label: list[dict]) -> list[dict]:
    curves = []
    for j, r in enumerate(per_label):
        if not truth[:, j].any():
            curves.append({"ap": None})
            continue
        precision, recall, _ = precision_recall_curve(truth[:, j], probs[:, j])
        curves.append(
            {
                "precision": precision,
                "recall": recall,
                "point": (r["recall"], r["precision"]),
                "ap": float(average_precision_score(truth[:, j], probs[:, j])),
            }
        )
    return curves


def _label_issues(truth: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> tuple[list[dict], str]:
    """Rows whose given labels the model most confidently disputes (cleanlab, multi-label), best first."""
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues

    given = [[int(j) for j in np.flatnonzero(row)] for row in truth]
    try:
        with warnings.catch_warnings(record=True) as caught:
            # cleanlab warns once per rare label per call; said once in the log instead of dozens of times
            warnings.simplefilter("always")
            ranked = find_label_issues(
                labels=given, pred_probs=probs, return_indices_ranked_by="self_confidence", n_jobs=1
            )  # a process pool per label costs more than it saves
            quality = get_label_quality_scores(given, probs)
    except ValueError as err:  # e.g. a label that no row holds
        return [], f"cleanlab could not rank these rows: {err}"
    for message in sorted({str(w.message) for w in caught}):
        log.info("cleanlab: %s", message)
    issues = []
    for i in ranked[:ISSUE_ROWS]:
        # What the model disputes: labels given that it does not predict, labels it predicts that are not given;
        # the most confident first.
        disputed = [
            (int(j), float(probs[i, j]), "given" if truth[i, j] else "missing")
            for j in np.flatnonzero(truth[i].astype(bool) != pred[i])
        ]
        disputed.sort(key=lambda d: d[1] if d[2] == "given" else 1 - d[1])
        issues.append({"row": int(i), "quality": float(quality[i]), "disputed": disputed})
    if not issues:
        return [], "cleanlab flags no row: the model disputes none of the given label sets"
    return issues, f"{len(ranked)} rows flagged by cleanlab; the {len(issues)} most confident shown"


def _averages(truth: np.ndarray, pred: np.ndarray) -> dict:
    """scikit-learn's classification_report averages: ``{"micro avg": {"precision", "recall", "f1-score",
    "support"}, ...}``. A label never predicted (or never given) counts 0, as sklearn does with zero_division=0."""
    full = classification_report(truth, pred.astype(np.uint8), output_dict=True, zero_division=0)
    return {name: {k: float(v) for k, v in full[name].items()} for name in AVERAGES}


def summarize(
    truth,
    probs,
    thresholds,
    names,
    *,
    labels=None,
    parts=None,
    degraded=None,
    ensure_nonempty: bool = True,
    history: list[dict] | None = None,
) -> dict:
    """Every number the report shows, from arrays.

    Args:
        truth: ``(n, L)`` 0/1 given labels.
        probs: ``(n, L)`` fused probabilities; rows with NaN (no usable input) are left out and counted.
        thresholds: ``(L,)`` the model's own thresholds.
        names: ``L`` label names, for every figure and table.
        labels: ``L`` label tokens (default: the names).
        parts: ``{head: (n, L)}`` per-head probabilities, each with NaN where that head had no input.
        degraded: ``{"photo removed": (n, L), "caption removed": (n, L)}`` fused probabilities with one
            input taken away (a case the model cannot be scored on is absent or None).
        ensure_nonempty: the model's fallback when no label reaches its threshold.
        history: per-epoch ``{"epoch", "train_loss", "val_loss", "val_f1"}`` of the run, if known.

    Returns:
        A dict of plain values and numpy arrays; row indices in it refer to the rows given.
    """
    truth = np.asarray(truth).astype(np.uint8)
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    names = [str(n) for n in names]
    labels = [str(x) for x in (labels if labels is not None else names)]
    if truth.shape != probs.shape or truth.shape[1] != len(names) or thresholds.shape != (len(names),):
        raise ValueError(
            f"report arrays disagree: truth {truth.shape}, probabilities {probs.shape}, "
            f"thresholds {thresholds.shape}, {len(names)} label names"
        )
    usable = np.flatnonzero(np.isfinite(probs).all(1))
    if len(usable) == 0:
        raise ValueError("no row has a usable photo or caption, so there is nothing to report")
    y, p = truth[usable], probs[usable]
    pred = decide(p, thresholds, ensure_nonempty)
    report = evaluate(y, pred, labels, dict(zip(labels, names)))
    averages = _averages(y, pred)

    uniform = bool(np.all(thresholds == thresholds[0]))
    curve = np.array([row_f1(y, apply_thresholds(p, t, ensure_nonempty)).mean() for t in DEFAULT_GRID])

    calibration = {}
    for head, values in (parts or {}).items():
        values = np.asarray(values, dtype=np.float64)[usable]
        rows = np.isfinite(values).all(1)
        if rows.any():
            calibration[head] = _calibration(y[rows], values[rows])
    calibration["fused"] = _calibration(y, p)

    modality = {MODALITY_CASES[0]: report["mean_f1"]}
    for case in MODALITY_CASES[1:]:
        other = (degraded or {}).get(case)
        modality[case] = (
            None
            if other is None
            else mean_f1(y, decide(np.asarray(other, dtype=np.float64)[usable], thresholds, ensure_nonempty))
        )

    # Worst rows: lowest row F1, then the largest gap between the given labels and the probabilities.
    f1 = row_f1(y, pred)
    gap = np.abs(y - p).sum(1)
    order = np.lexsort((-gap, f1))[:GALLERY_ROWS]
    worst = [
        {
            "row": int(usable[i]),
            "f1": float(f1[i]),
            "true": np.flatnonzero(y[i]).tolist(),
            "pred": np.flatnonzero(pred[i]).tolist(),
        }
        for i in order
    ]

    issues, issue_note = _label_issues(y, p, pred)
    for issue in issues:
        local = issue["row"]
        issue.update(
            row=int(usable[local]), true=np.flatnonzero(y[local]).tolist(), pred=np.flatnonzero(pred[local]).tolist()
        )

    return {
        "labels": labels,
        "names": names,
        "rows": len(usable),
        "rows_given": len(truth),
        "rows_without_input": len(truth) - len(usable),
        "thresholds": thresholds,
        "ensure_nonempty": ensure_nonempty,
        "report": report,
        "averages": averages,
        "threshold_curve": {
            "grid": DEFAULT_GRID,
            "mean_f1": curve,
            "chosen": float(thresholds[0]) if uniform else None,
            "model_mean_f1": report["mean_f1"],
        },
        "pr": _pr_curves(y, p, report["per_label"]),
        "calibration": calibration,
        "frequency": y.sum(0).astype(int),
        "cooccurrence": (y.T.astype(np.int64) @ y.astype(np.int64)),
        "modality": modality,
        "history": history,
        "worst": worst,
        "label_issues": issues,
        "label_issue_note": issue_note,
    }


def read_history(path: str | Path) -> list[dict] | None:
    """Per-epoch training loss, validation loss and validation mean F1 from a Lightning CSVLogger file."""
    path = Path(path)
    if not path.is_file():
        return None
    epochs: dict[int, dict] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            entry = epochs.setdefault(int(float(row["epoch"])), {})
            for key, column in (("train_loss", "train_loss_epoch"), ("val_loss", "val_loss"), ("val_f1", "val_f1")):
                if row.get(column):
                    entry[key] = float(row[column])
    return [{"epoch": e, **v} for e, v in sorted(epochs.items()) if v] or None


def draw(summary: dict) -> dict[str, tuple[object, str]]:
    """``{name: (figure, caption)}`` for every figure the summary supports, in page order."""
    out = {
        "scores": (figures.per_label_scores(summary), "Per-label precision, recall and F1"),
        "confusion": (figures.confusion_matrices(summary), "Confusion matrices"),
        "thresholds": (figures.threshold_curve(summary), "Mean F1 against the global threshold"),
        "pr_curves": (figures.pr_curves(summary), "Precision-recall curves"),
        "calibration": (figures.reliability(summary), "Reliability diagrams"),
    }
    if summary["history"]:
        out["training"] = (figures.training_curves(summary["history"]), "Training curves")
    out["frequency"] = (figures.label_frequency(summary), "Label frequency")
    out["cooccurrence"] = (figures.cooccurrence(summary), "Label co-occurrence")
    out["modality"] = (figures.modality_share(summary), "How much each input carries")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Comparing models on the same rows


def compare(models: list[dict], truth_rows: list[list[str]]) -> dict:
    """Per-label F1 of each model, the deltas against the first, and the rows where their label sets differ.

    Args:
        models: per model ``{"name", "labels": L tokens, "names": L display names, "pred": (n, L) 0/1}``,
            all over the same ``n`` rows (each model with its own vocabulary).
        truth_rows: the given label tokens of each row.

    Returns:
        ``{"models": [{"name", "mean_f1", "averages", "labels"}], "per_label": [{"label", "name", "support",
        "f1": [per model or None], "delta": [model k - model 0, for k >= 1, or None]}], "disagree": [...],
        "disagree_count": int, "rows": n}``; a model's figures cover the labels it knows.
    """
    if len(models) < 2:
        raise ValueError("a comparison needs at least two models")
    n = len(truth_rows)
    scored, f1_of, pred_sets, row_scores = [], [], [], []
    for m in models:
        pred = np.asarray(m["pred"]).astype(np.uint8)
        if pred.shape != (n, len(m["labels"])):
            raise ValueError(f"{m['name']}: predictions {pred.shape} for {n} rows and {len(m['labels'])} labels")
        known = set(m["labels"])
        truth = labels_to_matrix([[t for t in row if t in known] for row in truth_rows], m["labels"])
        report = evaluate(truth, pred, m["labels"], dict(zip(m["labels"], m["names"])))
        scored.append(
            {
                "name": m["name"],
                "mean_f1": report["mean_f1"],
                "averages": _averages(truth, pred),
                "labels": len(m["labels"]),
            }
        )
        f1_of.append({r["label"]: r for r in report["per_label"]})
        pred_sets.append([frozenset(np.asarray(m["labels"])[np.flatnonzero(row)].tolist()) for row in pred])
        row_scores.append(row_f1(truth, pred))
    order = list(dict.fromkeys(t for m in models for t in m["labels"]))
    names = {}
    for m in reversed(models):
        names.update(zip(m["labels"], m["names"]))
    per_label = []
    for token in order:
        f1 = [by[token]["f1"] if token in by else None for by in f1_of]
        support = next(by[token]["support"] for by in f1_of if token in by)
        delta = [None if f is None or f1[0] is None else f - f1[0] for f in f1[1:]]
        per_label.append({"label": token, "name": names[token], "support": int(support), "f1": f1, "delta": delta})
    differ = [i for i in range(n) if len({sets[i] for sets in pred_sets}) > 1]
    spread = {i: max(s[i] for s in row_scores) - min(s[i] for s in row_scores) for i in differ}
    ranked = sorted(differ, key=lambda i: (-spread[i], i))
    disagree = [
        {
            "row": i,
            "true": sorted(truth_rows[i], key=str),
            "pred": [sorted(sets[i], key=str) for sets in pred_sets],
            "f1": [float(s[i]) for s in row_scores],
        }
        for i in ranked[:DISAGREEMENT_ROWS]
    ]
    return {
        "models": scored,
        "per_label": per_label,
        "disagree": disagree,
        "disagree_count": len(differ),
        "rows": n,
        "names": names,
    }


# ---------------------------------------------------------------------------------------------------------------
# The page

_STYLE = """
* { box-sizing: border-box; }
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0 auto;
       max-width: 1100px; padding: 0 20px 64px; overflow-wrap: anywhere; }
h1 { font-size: 1.6em; line-height: 1.25; margin: 1em 0 0.2em; }
h2 { font-size: 1.3em; margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-top: 1.6em; }
.subtitle { color: #555; margin: 0 0 1em; }
nav.toc { background: #f6f7f9; border: 1px solid #e2e4e8; border-radius: 6px; padding: 0.6em 1.2em; }
nav.toc h2 { margin: 0.3em 0; border: 0; font-size: 1.05em; }
nav.toc ol { margin: 0.2em 0 0.4em; padding-left: 1.4em; columns: 2 16em; }
a { color: #1a5fb4; }
.scroll { overflow-x: auto; max-width: 100%; -webkit-overflow-scrolling: touch; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #d4d4d4; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f4f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.avg th, tr.avg td { background: #fafafa; }
tr.avg th { white-space: nowrap; }
td.up { color: #1b7a32; } td.down { color: #b3261e; }
figure { margin: 1em 0; }
figure .scroll { margin: 0; }
img.figure { display: block; max-width: 100%; height: auto; }
img.thumb { display: block; width: auto; height: auto; max-width: 120px; max-height: 120px; }
.gallery td { max-width: 22em; }
.gallery td.pic { max-width: none; }
.caption { white-space: pre-wrap; color: #333; }
.note { color: #555; font-style: italic; }
.miss { color: #b3261e; } .extra { color: #a15c00; }
details { margin: 0.6em 0; } summary { cursor: pointer; }
.pair { display: flex; flex-wrap: wrap; gap: 0 2.5em; align-items: flex-start; }
.pair > div { min-width: 0; max-width: 100%; }
.pair h3 { margin-top: 0.8em; }
@media (max-width: 700px) {
  body { font-size: 15px; padding: 0 12px 48px; }
  nav.toc ol { columns: 1; }
  /* a wide figure keeps readable text on a phone: shown up to 640 px wide, scrolled inside its own box */
  img.figure { max-width: 640px; }
  img.thumb { max-width: 88px; max-height: 88px; }
}
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _names(summary: dict, columns) -> str:
    return ", ".join(_esc(summary["names"][j]) for j in columns) or "<i>none</i>"


def _scroll(inner: str) -> str:
    """A table in its own box, which scrolls sideways on a narrow screen instead of the page."""
    return f'<div class="scroll">{inner}</div>'


def figure_html(fig, caption: str) -> str:
    """A matplotlib figure as an embedded PNG at twice the screen's density, shown at its size in CSS px."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, facecolor="white")
    width, height = (round(v * FIGURE_DPI) // 2 for v in fig.get_size_inches())
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<figure><div class="scroll"><img class="figure" src="data:image/png;base64,{data}" width="{width}" '
        f'height="{height}" alt="{_esc(caption)}"></div></figure>'
    )


class _Thumbnails:
    """Each row's photo as a small embedded JPEG (made once, however often the row is shown)."""

    def __init__(self, rows: list[dict]):
        self.rows, self.made = rows, {}

    def __call__(self, row: int) -> str:
        if row not in self.made:
            self.made[row] = self._make(row)
        return self.made[row]

    def _make(self, row: int) -> str:
        info = self.rows[row]
        path = info.get("image")
        if path is None:
            return '<span class="note">no photo</span>'
        try:  # decoded at about the thumbnail's size: a large photo never costs its full size here
            img = load_rgb(path, size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        except ImageError as err:
            log.info("no thumbnail for row %d: %s", row, err)
            return '<span class="note">no usable photo</span>'
        img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=80)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return (
            f'<img class="thumb" src="data:image/jpeg;base64,{data}" width="{img.width}" height="{img.height}" '
            f'alt="photo of {_esc(info["image_id"])}">'
        )


def _row_cells(summary: dict, row: dict, rows: list[dict], thumbs: _Thumbnails) -> str:
    info = rows[row["row"]]
    true, pred = set(row["true"]), set(row["pred"])
    return (
        f'<td class="pic">{thumbs(row["row"])}</td><td>{_esc(info["image_id"])}<div class="caption">'
        f"{_esc(info.get('caption') or '')}</div></td><td>{_names(summary, sorted(true))}</td>"
        f"<td>{_names(summary, sorted(pred))}"
        f'<div class="miss">missed: {_names(summary, sorted(true - pred))}</div>'
        f'<div class="extra">extra: {_names(summary, sorted(pred - true))}</div></td>'
    )


def _averages_table(averages: dict) -> str:
    head = (
        '<tr><th></th><th class="num">precision</th><th class="num">recall</th><th class="num">F1</th>'
        '<th class="num">support</th></tr>'
    )
    body = "".join(
        f'<tr class="avg"><th>{_esc(name)}</th><td class="num">{a["precision"]:.4f}</td>'
        f'<td class="num">{a["recall"]:.4f}</td><td class="num">{a["f1-score"]:.4f}</td>'
        f'<td class="num">{int(a["support"])}</td></tr>'
        for name, a in averages.items()
    )
    return _scroll(f'<table class="averages">{head}{body}</table>')


_AVERAGES_NOTE = (
    '<p class="note">As scikit-learn\'s <code>classification_report</code>: micro pools every '
    "(row, label) decision, macro averages the labels equally, weighted averages them by support, "
    "samples averages the rows; a label never predicted counts 0. Mean F1 is samples F1 except that "
    "a row with neither given nor predicted labels counts 1.</p>"
)


def _headline(summary: dict) -> str:
    r = summary["report"]
    items = [
        ("rows", summary["rows"]),
        ("mean F1", f"{r['mean_f1']:.4f}"),
        ("micro F1", f"{r['micro_f1']:.4f}"),
        ("macro F1", f"{r['macro_f1']:.4f}"),
        ("exact match", f"{r['exact_match']:.4f}"),
    ]
    body = "".join(f'<tr><th>{_esc(k)}</th><td class="num">{_esc(v)}</td></tr>' for k, v in items)
    note = ""
    if summary["rows_without_input"]:
        note = (
            f'<p class="note">{summary["rows_without_input"]} of {summary["rows_given"]} rows had neither a '
            "usable photo nor a caption and are left out of every figure.</p>"
        )
    return (
        '<div class="pair"><div><h3>Headline</h3>'
        + _scroll(f'<table class="headline">{body}</table>')
        + "</div><div><h3>Averages over labels and rows</h3>"
        + _averages_table(summary["averages"])
        + "</div></div>"
        + note
        + _AVERAGES_NOTE
    )


def _label_table(summary: dict) -> str:
    head = (
        '<tr><th>label</th><th>name</th><th class="num">threshold</th><th class="num">precision</th>'
        '<th class="num">recall</th><th class="num">F1</th><th class="num">support</th>'
        '<th class="num">predicted</th></tr>'
    )
    body = "".join(
        f'<tr><td>{_esc(r["label"])}</td><td>{_esc(r["name"])}</td><td class="num">{t:.2f}</td>'
        f'<td class="num">{r["precision"]:.3f}</td><td class="num">{r["recall"]:.3f}</td>'
        f'<td class="num">{r["f1"]:.3f}</td><td class="num">{r["support"]}</td>'
        f'<td class="num">{r["predicted"]}</td></tr>'
        for r, t in zip(summary["report"]["per_label"], summary["thresholds"])
    )
    avg = "".join(
        f'<tr class="avg"><th colspan="3">{_esc(name)}</th><td class="num">{a["precision"]:.3f}</td>'
        f'<td class="num">{a["recall"]:.3f}</td><td class="num">{a["f1-score"]:.3f}</td>'
        f'<td class="num">{int(a["support"])}</td><td></td></tr>'
        for name, a in summary["averages"].items()
    )
    return _scroll(f"<table>{head}{body}{avg}</table>")


def _modality_table(summary: dict) -> str:
    cells = "".join(
        f'<tr><th>{_esc(k)}</th><td class="num">{"-" if v is None else f"{v:.4f}"}</td></tr>'
        for k, v in summary["modality"].items()
    )
    return (
        _scroll(f"<table>{cells}</table>") + '<p class="note">Photo removed: every row predicted from its '
        "caption alone; caption removed: from its photo alone ('-': the model does not read that input, so "
        "removing the other leaves it nothing).</p>"
    )


def _issues_table(summary: dict, rows: list[dict], thumbs: _Thumbnails) -> str:
    if not summary["label_issues"]:
        return f'<p class="note">{_esc(summary["label_issue_note"])}</p>'
    head = (
        "<tr><th>#</th><th>photo</th><th>row</th><th>given labels</th><th>predicted</th>"
        "<th>disputed (probability)</th><th>label quality</th></tr>"
    )
    body = []
    for rank, issue in enumerate(summary["label_issues"], 1):
        disputed = (
            "; ".join(
                f"{'given' if kind == 'given' else 'not given'}: {_esc(summary['names'][j])} ({p:.2f})"
                for j, p, kind in issue["disputed"]
            )
            or "-"
        )
        cells = _row_cells(summary, issue, rows, thumbs)
        row_id = _esc(rows[issue["row"]]["image_id"])
        body.append(
            f'<tr data-image-id="{row_id}"><td class="num">{rank}</td>{cells}<td>{disputed}</td>'
            f'<td class="num">{issue["quality"]:.3f}</td></tr>'
        )
    return (
        f"<p>{_esc(summary['label_issue_note'])}. The model has learnt the labels of the rows it trained on, "
        "so the ranking is sharpest on rows it did not (<code>--split val</code>).</p>"
        + _scroll(f'<table class="gallery" id="label-issues">{head}{"".join(body)}</table>')
    )


# ---- the run: which model, trained how, on which data, when ----


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _duration(seconds) -> str:
    if seconds is None:
        return "not recorded"
    seconds = float(seconds)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe_run(model_dir) -> dict:
    """What the model folder records about the model and its training: names and plain values only (no paths).

    ``{"name", "id", "written_by", "settings": {config.json}, "run": {run.json}, "facts": [(key, value)]}``;
    anything the folder lacks is "not recorded".
    """
    folder = Path(model_dir)
    config, run = _read_json(folder / "config.json"), _read_json(folder / "run.json")
    metrics, split = _read_json(folder / "metrics.json"), _read_json(folder / "split.json")
    weights = _read_json(folder / "sha256.json").get("model.safetensors")
    written = _read_json(folder / "fuselabel.json").get("fuselabel")
    timings = metrics.get("timings", {})
    validation = metrics.get("validation", {})
    missing = "not recorded"
    train_rows, val_rows = split.get("train_ids"), split.get("val_ids")
    facts = [
        ("model", folder.resolve().name),
        ("model id (weights sha256)", weights[:16] if weights else missing),
        ("written by", f"fuselabel {written}" if written else missing),
        (
            "kind",
            config.get("kind", missing)
            + (f", {config['late_combine']} fusion" if config.get("kind") == "late" else ""),
        ),
        ("image encoder", f"{config.get('image_model', missing)} at {config.get('image_size', '?')} px"),
        ("text encoder", f"{config.get('text_model', missing)}, {config.get('text_max_length', '?')} tokens"),
        ("regime", metrics.get("regime") or run.get("regime", missing)),
        ("thresholds", config.get("threshold_method", missing)),
        ("training rows", len(train_rows) if train_rows is not None else missing),
        ("validation rows", len(val_rows) if val_rows is not None else missing),
        ("epochs", f"{metrics.get('epochs_run', '?')} run of {run.get('epochs', '?')}"),
        ("training time", _duration(timings.get("total_s"))),
        ("validation mean F1", f"{validation['mean_f1']:.4f}" if "mean_f1" in validation else missing),
        ("seed", run.get("seed", missing)),
    ]
    return {
        "name": folder.resolve().name,
        "id": weights[:16] if weights else None,
        "written_by": written,
        "settings": config,
        "run": run,
        "facts": facts,
    }


def _settings_table(values: dict) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v))}</td></tr>" for k, v in values.items())
    return _scroll(f'<table class="settings">{body}</table>') if body else '<p class="note">not recorded</p>'


def _data_facts(data: dict) -> list[tuple[str, object]]:
    from . import __version__

    return [
        ("table", data.get("table") or "a table in memory"),
        ("rows in the table", data.get("rows_in_table", "?")),
        ("rows reported", f"{data.get('rows_reported', '?')} ({data.get('split', 'all')} rows)"),
        ("report written", data.get("date") or datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("by", f"fuselabel {__version__}"),
    ]


def _facts_table(facts) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts)
    return _scroll(f'<table class="facts">{rows}</table>')


def _run_section(run: dict | None, data: dict | None) -> str:
    parts = []
    if run:
        parts.append(_facts_table(run["facts"]))
        parts.append(
            f"<details><summary>Every model setting (config.json)</summary>{_settings_table(run['settings'])}</details>"
        )
        parts.append(
            f"<details><summary>Every training setting (run.json)</summary>{_settings_table(run['run'])}</details>"
        )
    parts.append("<h3>Data and this report</h3>" + _facts_table(_data_facts(data or {})))
    return "".join(parts)


def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The document: a contents list, then each ``(anchor, heading, body)`` section."""
    toc = "".join(f'<li><a href="#{a}">{_esc(h)}</a></li>' for a, h, _ in sections)
    body = "\n".join(f'<section id="{a}"><h2>{_esc(h)}</h2>\n{b}</section>' for a, h, b in sections)
    # The generator tag comes first in <head>: fuselabel.outputs recognises an earlier report by it.
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="generator" content="fuselabel report">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>\n<header><h1>{_esc(title)}</h1>"
        '<p class="subtitle">One file: every figure and photo is inside it.</p></header>\n'
        f'<nav class="toc" id="contents"><h2>Contents</h2><ol>{toc}</ol></nav>\n{body}\n</body></html>\n'
    )


def report_html(
    summary: dict,
    rows: list[dict],
    *,
    title: str = "fuselabel report",
    run: dict | None = None,
    data: dict | None = None,
) -> str:
    """The page for one model; ``rows[i]`` has ``image_id``, ``caption``, ``image`` (a path or None)."""
    thumbs = _Thumbnails(rows)
    fig = {name: figure_html(f, caption) for name, (f, caption) in draw(summary).items()}
    gallery = "".join(
        f'<tr><td class="num">{w["f1"]:.2f}</td>{_row_cells(summary, w, rows, thumbs)}</tr>' for w in summary["worst"]
    )
    no_history = '<p class="note">The model folder has no history.csv, so there are no training curves.</p>'
    sections = [
        ("summary", "Summary", _headline(summary)),
        ("run", "Model, run and data", _run_section(run, data)),
        ("per-label", "Per-label scores", fig["scores"] + _label_table(summary) + fig["confusion"]),
        ("thresholds", "Thresholds and ranking", fig["thresholds"] + fig["pr_curves"]),
        ("calibration", "Calibration", fig["calibration"]),
        ("training", "Training", fig.get("training") or no_history),
        ("labels", "Labels", fig["frequency"] + fig["cooccurrence"]),
        ("inputs", "How much each input carries", fig["modality"] + _modality_table(summary)),
        (
            "worst-rows",
            "Worst rows",
            _scroll(
                '<table class="gallery" id="worst-rows"><tr><th>row F1</th>'
                "<th>photo</th><th>row</th><th>given labels</th><th>predicted</th></tr>"
                f"{gallery}</table>"
            ),
        ),
        ("label-errors", "Likely label errors", _issues_table(summary, rows, thumbs)),
    ]
    return _page(title, sections)


def comparison_html(
    comparison: dict, rows: list[dict], *, title: str, runs: list[dict] | None = None, data: dict | None = None
) -> str:
    """The page comparing models on the same rows; ``rows[i]`` as for :func:`report_html`."""
    models = comparison["models"]
    base = models[0]["name"]
    thumbs = _Thumbnails(rows)

    def delta_cell(d):
        if d is None:
            return '<td class="num">-</td>'
        tone = "up" if d > 5e-4 else "down" if d < -5e-4 else ""
        return f'<td class="num {tone}">{d:+.4f}</td>'

    model_names = [_esc(m["name"]) for m in models]
    plain_heads = "".join(f"<th>{n}</th>" for n in model_names)
    heads = "".join(f'<th class="num">{n}</th>' for n in model_names)
    delta_heads = "".join(f'<th class="num">{_esc(m["name"])} &minus; {_esc(base)}</th>' for m in models[1:])
    lines = [("mean F1", [m["mean_f1"] for m in models])] + [
        (f"{name} {key}", [m["averages"][name][key] for m in models])
        for name in AVERAGES
        for key in ("precision", "recall", "f1-score")
    ]
    summary = "".join(
        f"<tr><th>{_esc(label.replace('f1-score', 'F1'))}</th>"
        + "".join(f'<td class="num">{v:.4f}</td>' for v in values)
        + "".join(delta_cell(v - values[0]) for v in values[1:])
        + "</tr>"
        for label, values in lines
    )
    summary_table = _scroll(f'<table id="compare-summary"><tr><th></th>{heads}{delta_heads}</tr>{summary}</table>')
    per_label = "".join(
        f'<tr data-label="{_esc(r["label"])}"><td>{_esc(r["label"])}</td><td>{_esc(r["name"])}</td>'
        f'<td class="num">{r["support"]}</td>'
        + "".join('<td class="num">-</td>' if f is None else f'<td class="num">{f:.4f}</td>' for f in r["f1"])
        + "".join(delta_cell(d) for d in r["delta"])
        + "</tr>"
        for r in comparison["per_label"]
    )
    label_table = _scroll(
        f'<table id="compare-labels"><tr><th>label</th><th>name</th><th class="num">support</th>'
        f"{heads}{delta_heads}</tr>{per_label}</table>"
    )
    names = comparison["names"]

    def label_list(tokens):
        return ", ".join(_esc(names.get(t, t)) for t in tokens) or "<i>none</i>"

    gallery = "".join(
        f'<tr data-image-id="{_esc(rows[d["row"]]["image_id"])}"><td class="pic">{thumbs(d["row"])}</td>'
        f'<td>{_esc(rows[d["row"]]["image_id"])}<div class="caption">{_esc(rows[d["row"]].get("caption") or "")}'
        f"</div></td><td>{label_list(d['true'])}</td>"
        + "".join(f'<td>{label_list(p)}<div class="note">row F1 {f:.2f}</div></td>' for p, f in zip(d["pred"], d["f1"]))
        + "</tr>"
        for d in comparison["disagree"]
    )
    shown = len(comparison["disagree"])
    disagree = (
        f"<p>{comparison['disagree_count']} of {comparison['rows']} rows get different label sets"
        + (f"; the {shown} with the largest difference in row F1 are shown" if shown else "")
        + ".</p>"
        + (
            _scroll(
                f'<table class="gallery" id="disagreements"><tr><th>photo</th><th>row</th>'
                f"<th>given labels</th>{plain_heads}</tr>{gallery}</table>"
            )
            if shown
            else ""
        )
    )
    runs = runs or []
    facts = [[k for k, _ in r["facts"]] for r in runs]
    run_table = ""
    if runs:
        keys = list(dict.fromkeys(k for f in facts for k in f))
        values = [dict(r["facts"]) for r in runs]
        body = "".join(
            f"<tr><th>{_esc(k)}</th>" + "".join(f"<td>{_esc(v.get(k, '-'))}</td>" for v in values) + "</tr>"
            for k in keys
        )
        setting_keys = list(dict.fromkeys(k for r in runs for k in (*r["settings"], *r["run"])))
        differ = []
        for k in setting_keys:
            seen = [json.dumps({**r["settings"], **r["run"]}.get(k)) for r in runs]
            if len(set(seen)) > 1:
                differ.append(f"<tr><th>{_esc(k)}</th>" + "".join(f"<td>{_esc(v)}</td>" for v in seen) + "</tr>")
        run_table = (
            _scroll(f"<table><tr><th></th>{plain_heads}</tr>{body}</table>")
            + "<h3>Settings that differ</h3>"
            + (
                _scroll(f"<table><tr><th></th>{plain_heads}</tr>{''.join(differ)}</table>")
                if differ
                else '<p class="note">none: the models were trained with the same settings</p>'
            )
        )
    sections = [
        (
            "summary",
            "Summary",
            summary_table + f'<p class="note">Deltas are each model minus {_esc(base)} '
            "(the first named). Each model is scored on the labels it knows.</p>" + _AVERAGES_NOTE,
        ),
        (
            "run",
            "Models, runs and data",
            run_table + "<h3>Data and this report</h3>" + _facts_table(_data_facts(data or {})),
        ),
        (
            "per-label",
            "Per-label F1",
            figure_html(figures.f1_deltas(comparison), "Per-label F1 differences") + label_table,
        ),
        ("disagreements", "Rows where the models disagree", disagree),
    ]
    return _page(title, sections)


# ---- writing it ----

# The files the earlier report (a folder with index.html) wrote beside its page: removed when it is rewritten.
_OLD_REPORT_FILES = (
    "scores.png",
    "confusion.png",
    "thresholds.png",
    "pr_curves.png",
    "calibration.png",
    "training.png",
    "frequency.png",
    "cooccurrence.png",
    "modality.png",
)


def report_target(out, inputs=()) -> Path:
    """The HTML file ``--out`` means, refusing any path whose writing would destroy something.

    ``out`` names the file to write (``report.html``). An existing file is replaced only if it is a fuselabel
    report. A folder written by an earlier fuselabel (``index.html`` with its figures beside it) gets the new
    page as its ``index.html``, and the figure and thumbnail files that report wrote are removed (nothing
    else in it is touched); any other folder is refused.
    """
    out = Path(out)
    kind = outputs.kind_of(out)
    if kind == outputs.REPORT:
        outputs.check_output(out, outputs.REPORT, inputs)
        return out / "index.html"
    if out.is_dir():
        raise outputs.OutputError(f"{out}: is a folder; --out names the HTML file to write, e.g. {out / 'report.html'}")
    outputs.check_output(out, outputs.FILE, inputs)
    if kind == outputs.FILE and not outputs.is_report_page(out):
        raise outputs.OutputError(
            f"{out}: already exists and is not a fuselabel report, which a report may not "
            "replace: choose a new path, or move the file away first"
        )
    return out


def _write_page(page: str, out) -> Path:
    """Write the page atomically (an interrupted write leaves the earlier file whole) to the file ``out``
    means (:func:`report_target`)."""
    target = report_target(out)
    if target.suffix.lower() not in (".html", ".htm"):
        log.warning(f"{out}: a report is an HTML file; a name ending in .html opens in a browser by a double click")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, [page])
    if target.name == "index.html" and target.parent == Path(out):  # an earlier report's folder, now one file
        for name in _OLD_REPORT_FILES:
            (target.parent / name).unlink(missing_ok=True)
        for thumb in target.parent.glob("thumb_*.jpg"):
            thumb.unlink(missing_ok=True)
    return target


def write_report(
    summary: dict,
    rows: list[dict],
    out,
    *,
    title: str = "fuselabel report",
    run: dict | None = None,
    data: dict | None = None,
) -> Path:
    """Write the one-file report to ``out`` (:func:`report_target` says what an existing ``out`` may be);
    returns the file written. Everything is drawn before anything is written."""
    return _write_page(report_html(summary, rows, title=title, run=run, data=data), out)


# ---------------------------------------------------------------------------------------------------------------
# From model folders and a table


def _labelled_rows(model, model_dir, table, columns, split: str):
    from .evaluation import split_rows
    from .tables import read_table, require_labels

    records = read_table(table, columns, trained=model.bundle_.table, need_labels=True)
    require_labels(records, "the report")
    return records, split_rows(model.bundle_, records.records, split)


def _data(records, table_rows: int, reported: int, split: str) -> dict:
    path = getattr(records, "path", None)
    return {
        "table": Path(path).name if path else None,
        "rows_in_table": table_rows,
        "rows_reported": reported,
        "split": split,
    }


def build_report(model_dir, data_dir, csv_path, out, *, split: str = "all", columns=None) -> Path:
    """Run the model over the labelled rows of a table (path, DataFrame or RecordSet) and write the report to
    ``out``. Labels the model never saw are left out of its figures, with a warning naming them."""
    from .estimator import FuseLabel

    model = FuseLabel.from_pretrained(model_dir)
    records, rows = _labelled_rows(model, model_dir, csv_path, columns, split)
    csv_path = records.path
    known = set(model.bundle_.labels)
    unseen = sorted({label for r in rows for label in r.labels} - known)
    if unseen:
        log.warning(f"{csv_path}: label(s) the model never saw are left out of the report: {', '.join(unseen[:10])}")
    config = model.bundle_.config
    images = [str(Path(data_dir) / r.image_id) if r.image_id else None for r in rows]
    captions = [r.caption for r in rows]
    full = model.predict_details(images=images, captions=captions)
    # Each head's figures cover only the rows that had its input.
    seen = {"image": full.image_present, "text": full.caption_present}
    parts = {
        head: np.where(seen.get(head, full.image_present | full.caption_present)[:, None], p, np.nan)
        for head, p in full.parts.items()
    }
    degraded = {}
    if config.kind == "late":
        # Late fusion answers a one-input row with that input's head: the heads already hold the answers.
        degraded["photo removed"] = parts["text"]
        degraded["caption removed"] = parts["image"]
    else:  # taking away the only input a model reads leaves nothing to score
        if config.uses_text:
            degraded["photo removed"] = model.predict_details(images=[None] * len(rows), captions=captions).probs
        if config.uses_image:
            degraded["caption removed"] = model.predict_details(images=images, captions=[None] * len(rows)).probs
    truth = labels_to_matrix([[label for label in r.labels if label in known] for r in rows], model.bundle_.labels)
    summary = summarize(
        truth,
        full.probs,
        model.thresholds_,
        model.label_names_,
        labels=model.bundle_.labels,
        parts=parts,
        degraded=degraded,
        ensure_nonempty=model.bundle_.thresholds.get("ensure_nonempty", True),
        history=read_history(Path(model_dir) / "history.csv"),
    )
    page_rows = [{"image_id": r.id, "caption": r.caption, "image": img} for r, img in zip(rows, images)]
    name = Path(csv_path).name if csv_path else "a table"
    title = f"fuselabel report: {Path(model_dir).resolve().name} on {name} ({split} rows)"
    return write_report(
        summary,
        page_rows,
        out,
        title=title,
        run=describe_run(model_dir),
        data=_data(records, len(records.records), summary["rows"], split),
    )


def build_comparison(model_dirs, data_dir, table, out, *, split: str = "all", columns=None) -> Path:
    """Run each model over the same labelled rows of a table and write one page comparing them to ``out``.

    With ``split`` other than ``all``, the rows are those on that side of every model's own split.
    """
    from .estimator import FuseLabel

    model_dirs = [Path(m) for m in model_dirs]
    names = [m.resolve().name for m in model_dirs]
    if len(set(names)) < len(names):  # the page names models by folder: two of one name would be unreadable
        names = [str(m) for m in model_dirs]
    models, chosen, records = [], None, None
    for model_dir in model_dirs:
        model = FuseLabel.from_pretrained(model_dir)
        records, rows = _labelled_rows(model, model_dir, table, columns, split)
        unseen = sorted({label for r in rows for label in r.labels} - set(model.bundle_.labels))
        if unseen:
            log.warning(
                f"{records.path}: label(s) {model_dir} never saw are left out of its scores: {', '.join(unseen[:10])}"
            )
        by_id = {r.id: r for r in rows}
        chosen = [r.id for r in rows] if chosen is None else [i for i in chosen if i in by_id]
        models.append((model, by_id))
    if not chosen:
        raise ValueError(f"the models' {split} sides share no row of the table: compare them with --split all")
    entries, page_rows = [], None
    for name, (model, by_id) in zip(names, models):
        rows = [by_id[i] for i in chosen]
        images = [str(Path(data_dir) / r.image_id) if r.image_id else None for r in rows]
        details = model.predict_details(images=images, captions=[r.caption for r in rows])
        pred = details.predicted  # the model's own decision rule, as it predicts
        entries.append(
            {"name": name, "labels": list(model.bundle_.labels), "names": list(model.label_names_), "pred": pred}
        )
        if page_rows is None:
            page_rows = [{"image_id": r.id, "caption": r.caption, "image": img} for r, img in zip(rows, images)]
            truth_rows = [list(r.labels) for r in rows]
    comparison = compare(entries, truth_rows)
    table_name = Path(records.path).name if getattr(records, "path", None) else "a table"
    title = f"fuselabel report: {' vs '.join(names)} on {table_name} ({split} rows)"
    page = comparison_html(
        comparison,
        page_rows,
        title=title,
        runs=[describe_run(m) for m in model_dirs],
        data=_data(records, len(records.records), len(chosen), split),
    )
    return _write_page(page, out)
