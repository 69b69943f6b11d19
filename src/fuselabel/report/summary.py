"""Every number a report shows, from arrays: :func:`summarize` (and the run's history, :func:`read_history`)."""

from __future__ import annotations

import csv
import functools
import logging
import warnings
from pathlib import Path

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, classification_report, precision_recall_curve

from ..metrics import evaluate, mean_f1, row_f1
from ..runtime import decide
from ..thresholds import DEFAULT_GRID, apply_thresholds

log = logging.getLogger(__name__)

CALIBRATION_BINS = 10
GALLERY_ROWS = 24  # worst rows shown
ISSUE_ROWS = 30  # likely label errors shown
MODALITY_CASES = ("both inputs", "photo removed", "caption removed")
AVERAGES = ("micro avg", "macro avg", "weighted avg", "samples avg")
# Per-label figures show at most this many labels (the table lists every one): beyond it, bars and panels
# shrink below reading size or the figure grows past what a screen shows.
FIGURE_LABELS = 30


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


def _label_issues(truth: np.ndarray, probs: np.ndarray, pred: np.ndarray, usable) -> tuple[list[dict], str]:
    """Rows whose given labels the model most confidently disputes (cleanlab, multi-label), best first; ``row``
    is the index among all rows given (``usable[i]`` for the i-th row scored)."""
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
        issues.append(
            {
                "row": int(usable[i]),
                "quality": float(quality[i]),
                "disputed": disputed,
                "true": np.flatnonzero(truth[i]).tolist(),
                "pred": np.flatnonzero(pred[i]).tolist(),
            }
        )
    if not issues:
        return [], "cleanlab flags no row: the model disputes none of the given label sets"
    return issues, f"{len(ranked)} rows flagged by cleanlab; the {len(issues)} most confident shown"


def averages(truth: np.ndarray, pred: np.ndarray) -> dict:
    """scikit-learn's classification_report averages: ``{"micro avg": {"precision", "recall", "f1-score",
    "support"}, ...}``. A label never predicted (or never given) counts 0, as sklearn does with zero_division=0."""
    full = classification_report(truth, pred.astype(np.uint8), output_dict=True, zero_division=0)
    return {name: {k: float(v) for k, v in full[name].items()} for name in AVERAGES}


def labels_that_matter(per_label: list[dict], limit: int = FIGURE_LABELS) -> list[int]:
    """Column indices of the labels a per-label figure shows: every label up to ``limit``; beyond it, in turn
    the most frequent, the worst F1 (of labels some row holds) and the most confused (false positives plus
    false negatives), until ``limit`` are chosen, most frequent first."""
    if len(per_label) <= limit:
        return list(range(len(per_label)))
    index = range(len(per_label))
    rankings = [
        sorted(index, key=lambda j: (-per_label[j]["support"], j)),
        sorted((j for j in index if per_label[j]["support"]), key=lambda j: (per_label[j]["f1"], j)),
        sorted(index, key=lambda j: (-(per_label[j]["fp"] + per_label[j]["fn"]), j)),
    ]
    chosen: dict[int, None] = {}
    for depth in range(len(per_label)):
        for ranking in rankings:
            if depth < len(ranking) and len(chosen) < limit:
                chosen.setdefault(ranking[depth])
    return sorted(chosen, key=lambda j: (-per_label[j]["support"], j))


def _worst_rows(y, p, pred, usable) -> list[dict]:
    """Lowest row F1 first, then the largest gap between the given labels and the probabilities."""
    f1 = row_f1(y, pred)
    gap = np.abs(y - p).sum(1)
    return [
        {
            "row": int(usable[i]),
            "f1": float(f1[i]),
            "true": np.flatnonzero(y[i]).tolist(),
            "pred": np.flatnonzero(pred[i]).tolist(),
        }
        for i in np.lexsort((-gap, f1))[:GALLERY_ROWS]
    ]


def _checked(truth, probs, thresholds, names, labels):
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
    usable = np.flatnonzero(np.isfinite(probs).all(1))  # the rows with a usable input
    if len(usable) == 0:
        raise ValueError("no row has a usable photo or caption, so there is nothing to report")
    return truth, probs, thresholds, names, labels, usable


def _modality(y, usable, degraded, decided_f1, rule) -> dict:
    out = {MODALITY_CASES[0]: decided_f1}
    for case in MODALITY_CASES[1:]:
        other = (degraded or {}).get(case)
        out[case] = None if other is None else mean_f1(y, rule(np.asarray(other, dtype=np.float64)[usable]))
    return out


def _calibrations(y, p, parts, usable) -> dict:
    out = {}
    for head, values in (parts or {}).items():
        values = np.asarray(values, dtype=np.float64)[usable]
        rows = np.isfinite(values).all(1)
        if rows.any():
            out[head] = _calibration(y[rows], values[rows])
    out["fused"] = _calibration(y, p)
    return out


def _threshold_curve(y, p, thresholds, ensure_nonempty: bool, task: str, model_f1: float) -> dict:
    """Mean F1 at each global threshold, with the model's own rule: its one threshold, or None (per-label
    thresholds, or a multiclass model's arg-max)."""
    uniform = task != "multiclass" and bool(np.all(thresholds == thresholds[0]))
    return {
        "grid": DEFAULT_GRID,
        "mean_f1": np.array([row_f1(y, apply_thresholds(p, t, ensure_nonempty)).mean() for t in DEFAULT_GRID]),
        "chosen": float(thresholds[0]) if uniform else None,
        "rule": "argmax" if task == "multiclass" else "thresholds",
        "model_mean_f1": model_f1,
    }


def _label_counts(y: np.ndarray, per_label: list[dict]) -> dict:
    """Rows per label and per pair of labels, the labels per-label figures show (``shown``) and the most
    frequent ones the frequency and co-occurrence figures show (``frequent``)."""
    frequency = y.sum(0).astype(int)
    return {
        "frequency": frequency,
        "cooccurrence": (y.T.astype(np.int64) @ y.astype(np.int64)),
        "shown": labels_that_matter(per_label),
        "frequent": np.argsort(-frequency, kind="stable")[:FIGURE_LABELS].tolist(),
    }


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
    task: str = "multilabel",
    inputs: dict | None = None,
) -> dict:
    """Every number the report shows, from arrays.

    Args:
        truth: ``(n, L)`` 0/1 given labels.
        probs: ``(n, L)`` fused probabilities; rows with NaN (no usable input) are left out and counted.
        thresholds, names, labels: ``L`` each: the model's thresholds, label names and tokens (default: names).
        parts: ``{head: (n, L)}`` per-head probabilities, each with NaN where that head had no input.
        degraded: ``{"photo removed": (n, L), "caption removed": (n, L)}`` fused probabilities with one
            input taken away (a case the model cannot be scored on is absent or None).
        ensure_nonempty: the model's fallback when no label reaches its threshold.
        history: per-epoch ``{"epoch", "train_loss", "val_loss", "val_f1"}`` of the run, if known.
        task: the model's task: ``"multiclass"`` decides the most probable label alone, as the model does.
        inputs: how the model combines its inputs (:func:`fuselabel.report.provenance.fusion`), if known.

    Returns:
        A dict of plain values and numpy arrays; row indices in it refer to the rows given.
    """
    truth, probs, thresholds, names, labels, usable = _checked(truth, probs, thresholds, names, labels)
    y, p = truth[usable], probs[usable]
    rule = functools.partial(decide, thresholds=thresholds, ensure_nonempty=ensure_nonempty, task=task)
    pred = rule(p)
    report = evaluate(y, pred, labels, dict(zip(labels, names)))
    issues, issue_note = _label_issues(y, p, pred, usable)
    return {
        "labels": labels,
        "names": names,
        "task": task,
        "inputs": inputs,
        "rows": len(usable),
        "rows_given": len(truth),
        "rows_without_input": len(truth) - len(usable),
        "thresholds": thresholds,
        "ensure_nonempty": ensure_nonempty,
        "report": report,
        "averages": averages(y, pred),
        "threshold_curve": _threshold_curve(y, p, thresholds, ensure_nonempty, task, report["mean_f1"]),
        "pr": _pr_curves(y, p, report["per_label"]),
        "calibration": _calibrations(y, p, parts, usable),
        **_label_counts(y, report["per_label"]),
        "modality": _modality(y, usable, degraded, report["mean_f1"], rule),
        "history": history,
        "worst": _worst_rows(y, p, pred, usable),
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
