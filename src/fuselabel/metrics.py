"""Evaluation metrics for multi-label classification.

The headline figure is the Kaggle "mean F1": for every row, the F1 between the
predicted and the true label set, averaged over rows. A row whose true and
predicted sets are both empty scores 1 (nothing to find, nothing wrongly
claimed); a row where exactly one of them is empty scores 0.

The definitions are delegated to scikit-learn so there is a single, trusted
source of truth. :func:`row_f1` is a small numpy re-implementation of the
per-row score; it exists because threshold tuning evaluates it thousands of
times and sklearn's input validation would dominate the run time. The tests
check that the two agree.

All functions take ``(n_rows, n_labels)`` indicator arrays (0/1 ints or bools).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# scikit-learn is imported where it is used: the prediction path needs only the F1 arithmetic below, and
# importing scikit-learn costs over a second at start-up.

__all__ = ["mean_f1", "row_f1", "evaluate", "format_report"]


def _as_indicator_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a pair of label matrices to int ``(n, c)`` arrays."""
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if yt.ndim != 2 or yp.ndim != 2:
        raise ValueError(f"expected 2-D (n_rows, n_labels) arrays, got shapes {yt.shape} and {yp.shape}")
    if yt.shape != yp.shape:
        raise ValueError(f"shape mismatch: y_true {yt.shape} vs y_pred {yp.shape}")
    for name, arr in (("y_true", yt), ("y_pred", yp)):
        # Probabilities passed by mistake would otherwise be silently truncated.
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return yt.astype(np.int64), yp.astype(np.int64)


def mean_f1(y_true, y_pred) -> float:
    """Mean over rows of the per-row F1 between predicted and true label sets.

    This is scikit-learn's ``f1_score(average="samples")`` with
    ``zero_division=1.0``, so a row with both sets empty scores 1.

    Args:
        y_true: ``(n, c)`` 0/1 matrix of true labels.
        y_pred: ``(n, c)`` 0/1 matrix of predicted labels.

    Returns:
        The mean F1 as a Python float (0.0 for zero rows).
    """
    yt, yp = _as_indicator_pair(y_true, y_pred)
    if yt.shape[0] == 0:
        return 0.0
    if yt.shape[1] < 2:
        # sklearn treats a single column as a binary (not multilabel) target and
        # rejects average="samples"; the per-row definition still applies.
        return float(row_f1(yt, yp).mean())
    from sklearn.metrics import f1_score

    return float(f1_score(yt, yp, average="samples", zero_division=1.0))


def row_f1(y_true, y_pred) -> np.ndarray:
    """Per-row F1 vector, ``2*tp / (|true| + |pred|)``, 1.0 where both are empty.

    Pure numpy, for hot loops (threshold tuning). ``row_f1(...).mean()`` equals
    :func:`mean_f1` (checked by the tests).

    Args:
        y_true: ``(n, c)`` 0/1 or bool matrix of true labels.
        y_pred: ``(n, c)`` 0/1 or bool matrix of predicted labels.

    Returns:
        Float64 array of shape ``(n,)``.
    """
    yt = np.asarray(y_true, dtype=bool)
    yp = np.asarray(y_pred, dtype=bool)
    if yt.shape != yp.shape or yt.ndim != 2:
        raise ValueError(f"expected two (n, c) arrays of equal shape, got {yt.shape} and {yp.shape}")
    tp = np.count_nonzero(yt & yp, axis=1)
    denom = np.count_nonzero(yt, axis=1) + np.count_nonzero(yp, axis=1)
    return _f1_from_counts(tp, denom)


def _f1_from_counts(tp: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """``2*tp/denom`` with 1.0 where ``denom == 0`` (both sets empty).

    ``denom`` is ``|true| + |pred|`` (= ``2tp + fp + fn``). Shared with the
    threshold search so that both paths produce bit-identical per-row values.
    """
    tp = np.asarray(tp, dtype=np.float64)
    denom = np.asarray(denom, dtype=np.float64)
    out = np.ones(np.broadcast(tp, denom).shape, dtype=np.float64)
    np.divide(2.0 * tp, denom, out=out, where=denom > 0)
    return out


def evaluate(y_true, y_pred, labels: list[str], label_names: dict[str, str] | None = None) -> dict[str, Any]:
    """Full evaluation report as a JSON-serialisable dict.

    Per-label and micro/macro figures use ``zero_division=0.0``: a label that is
    never predicted gets precision 0 rather than an optimistic 1, which is what
    you want when scanning a report for labels the model has given up on.
    (``mean_f1`` keeps the Kaggle convention of 1 for an empty/empty row.)

    Args:
        y_true: ``(n, c)`` 0/1 matrix of true labels.
        y_pred: ``(n, c)`` 0/1 matrix of predicted labels.
        labels: the ``c`` label identifiers, in column order.
        label_names: optional mapping from label identifier to a readable
            name; labels missing from it are named by their identifier.

    Returns:
        ``{"rows", "mean_f1", "micro_f1", "macro_f1", "micro_precision",
        "micro_recall", "exact_match", "per_label": [...]}`` where each
        ``per_label`` entry has ``label, name, precision, recall, f1, support,
        predicted, tp, fp, fn, tn``. All values are plain Python types.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    yt, yp = _as_indicator_pair(y_true, y_pred)
    n, c = yt.shape
    labels = [str(lab) for lab in labels]
    if len(labels) != c:
        raise ValueError(f"got {len(labels)} label identifiers for {c} columns")
    names = label_names or {}

    if n == 0:
        raise ValueError("cannot evaluate zero rows")

    per_label = _per_label(yt, yp, labels, names)
    micro_p, micro_r, micro_f, _ = precision_recall_fscore_support(yt, yp, average="micro", zero_division=0.0)
    return {
        "rows": int(n),
        "mean_f1": mean_f1(yt, yp),
        "micro_f1": float(micro_f),
        "macro_f1": float(np.mean([r["f1"] for r in per_label])) if c else 0.0,
        "micro_precision": float(micro_p),
        "micro_recall": float(micro_r),
        # sklearn's accuracy on indicator matrices is subset accuracy.
        "exact_match": float(accuracy_score(yt, yp)),
        "per_label": per_label,
    }


def _per_label(yt: np.ndarray, yp: np.ndarray, labels: list[str], names: dict) -> list[dict[str, Any]]:
    """One entry per label: its scores at ``zero_division=0``, support, predictions and confusion counts."""
    from sklearn.metrics import multilabel_confusion_matrix, precision_recall_fscore_support

    prec, rec, f1, support = precision_recall_fscore_support(yt, yp, average=None, zero_division=0.0)
    mcm = multilabel_confusion_matrix(yt, yp)  # [[tn, fp], [fn, tp]] per label
    predicted = yp.sum(axis=0)
    out = []
    for j, lab in enumerate(labels):
        (tn, fp), (fn, tp) = mcm[j]
        out.append(
            {
                "label": lab,
                "name": str(names.get(lab, lab)),
                "precision": float(prec[j]),
                "recall": float(rec[j]),
                "f1": float(f1[j]),
                "support": int(support[j]),
                "predicted": int(predicted[j]),
                "tp": int(tp),
                "fp": int(fp),
                "fn": int(fn),
                "tn": int(tn),
            }
        )
    return out


def format_report(report: dict[str, Any]) -> str:
    """Render an :func:`evaluate` report as a fixed-width text table.

    Headline figures first, then one line per label.
    """
    headline = [
        ("rows", f"{report['rows']:d}"),
        ("mean F1 (samples)", f"{report['mean_f1']:.4f}"),
        ("micro F1", f"{report['micro_f1']:.4f}"),
        ("macro F1", f"{report['macro_f1']:.4f}"),
        ("micro precision", f"{report['micro_precision']:.4f}"),
        ("micro recall", f"{report['micro_recall']:.4f}"),
        ("exact match", f"{report['exact_match']:.4f}"),
    ]
    key_w = max(len(k) for k, _ in headline)
    lines = [f"{k:<{key_w}}  {v}" for k, v in headline]

    rows = report.get("per_label", [])
    label_w = max([len("label")] + [len(str(r["label"])) for r in rows])
    name_w = max([len("name")] + [len(str(r["name"])) for r in rows])
    header = (
        f"{'label':<{label_w}}  {'name':<{name_w}}  {'prec':>6} {'recall':>6} {'f1':>6}"
        f"  {'support':>7} {'pred':>7} {'tp':>7} {'fp':>7} {'fn':>7} {'tn':>7}"
    )
    lines += ["", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{str(r['label']):<{label_w}}  {str(r['name']):<{name_w}}"
            f"  {r['precision']:>6.3f} {r['recall']:>6.3f} {r['f1']:>6.3f}"
            f"  {r['support']:>7d} {r['predicted']:>7d} {r['tp']:>7d} {r['fp']:>7d}"
            f" {r['fn']:>7d} {r['tn']:>7d}"
        )
    return "\n".join(lines)
