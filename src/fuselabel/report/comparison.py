"""Comparing models on the same rows: :func:`compare` from each model's label sets."""

from __future__ import annotations

import numpy as np

from ..labels import labels_to_matrix
from ..metrics import evaluate, row_f1
from .summary import averages

DISAGREEMENT_ROWS = 30  # rows where compared models disagree, shown


def _score(model: dict, truth_rows: list[list[str]]) -> tuple[dict, dict, list, np.ndarray]:
    """One model's headline figures, its per-label report by token, its label set per row and its row F1."""
    n = len(truth_rows)
    pred = np.asarray(model["pred"]).astype(np.uint8)
    if pred.shape != (n, len(model["labels"])):
        raise ValueError(f"{model['name']}: predictions {pred.shape} for {n} rows and {len(model['labels'])} labels")
    known = set(model["labels"])
    truth = labels_to_matrix([[t for t in row if t in known] for row in truth_rows], model["labels"])
    report = evaluate(truth, pred, model["labels"], dict(zip(model["labels"], model["names"])))
    scored = {
        "name": model["name"],
        "mean_f1": report["mean_f1"],
        "macro_f1": report["macro_f1"],
        "averages": averages(truth, pred),
        "labels": len(model["labels"]),
    }
    sets = [frozenset(np.asarray(model["labels"])[np.flatnonzero(row)].tolist()) for row in pred]
    return scored, {r["label"]: r for r in report["per_label"]}, sets, row_f1(truth, pred)


def _per_label(models: list[dict], f1_of: list[dict]) -> tuple[list[dict], dict]:
    order = list(dict.fromkeys(t for m in models for t in m["labels"]))
    names = {}
    for m in reversed(models):
        names.update(zip(m["labels"], m["names"]))
    rows = []
    for token in order:
        f1 = [by[token]["f1"] if token in by else None for by in f1_of]
        support = next(by[token]["support"] for by in f1_of if token in by)
        delta = [None if f is None or f1[0] is None else f - f1[0] for f in f1[1:]]
        rows.append({"label": token, "name": names[token], "support": int(support), "f1": f1, "delta": delta})
    return rows, names


def compare(models: list[dict], truth_rows: list[list[str]]) -> dict:
    """Per-label F1 of each model, the deltas against the first, and the rows where their label sets differ.

    Args:
        models: per model ``{"name", "labels": L tokens, "names": L display names, "pred": (n, L) 0/1}``,
            all over the same ``n`` rows (each model with its own vocabulary).
        truth_rows: the given label tokens of each row.

    Returns:
        ``{"models": [{"name", "mean_f1", "macro_f1", "averages", "labels"}], "per_label": [{"label", "name",
        "support", "f1": [per model or None], "delta": [model k - model 0, for k >= 1, or None]}], "disagree":
        [...], "disagree_count": int, "rows": n, "names": {token: name}}``; a model's figures cover the labels
        it knows.
    """
    if len(models) < 2:
        raise ValueError("a comparison needs at least two models")
    n = len(truth_rows)
    scored, f1_of, pred_sets, row_scores = zip(*(_score(m, truth_rows) for m in models))
    per_label, names = _per_label(models, list(f1_of))
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
        "models": list(scored),
        "per_label": per_label,
        "disagree": disagree,
        "disagree_count": len(differ),
        "rows": n,
        "names": names,
    }
