"""Turning per-label probabilities into label sets, and tuning the thresholds.

Conventions shared by every function here:

* A label is predicted when ``prob >= threshold`` (inclusive), so a threshold
  of 0 predicts everything and a threshold equal to a probability selects it.
* With ``ensure_nonempty=True`` a row with no label at or above its threshold
  still gets one label: the one with the largest ``prob / threshold`` ratio,
  i.e. the label that came *relatively* closest to its own cut-off. With a
  single global threshold this is simply the arg-max probability; with
  per-class thresholds it respects them, so a class whose threshold was tuned
  high (because it is noisy) does not win the fallback just because its raw
  probabilities run high. Every test row of the reference task has at least
  one label, so an empty prediction is always a guaranteed F1 of 0.
  Ties go to the lowest column index (``np.argmax``).
* Tuning maximises the Kaggle mean F1 (see :mod:`fuselabel.metrics`), computed
  *with* the same ``ensure_nonempty`` setting that will be used at inference.

The search is vectorised over rows and grid values; per-class coordinate ascent
keeps per-row true-positive / predicted counts and only swaps one class's
contribution in and out, so one class costs ``O(rows * grid)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fuselabel.config import THRESHOLD_METHODS
from fuselabel.metrics import _f1_from_counts, row_f1

__all__ = [
    "DEFAULT_GRID",
    "apply_thresholds",
    "tune_global",
    "tune_per_class",
    "tune_balanced",
    "tune",
    "METHODS",
    "ARGMAX",
    "apply_argmax",
    "argmax_rule",
]

#: 0.01, 0.02, ..., 0.99 (rounded so the values print and serialise cleanly).
DEFAULT_GRID = np.round(np.arange(1, 100) / 100.0, 2)

METHODS = THRESHOLD_METHODS  # the decision rules, as config declares them

#: The decision rule of single-label (``task="multiclass"``) models: the most probable class, nothing tuned.
ARGMAX = "argmax"

# Threshold floor for the prob/threshold ratio: a zero threshold predicts every
# label anyway (probs >= 0), so the fallback never fires there, but the ratio is
# still computed and must not divide by zero.
_RATIO_EPS = 1e-12

# Score improvements smaller than this are treated as float noise, so the
# coordinate ascent cannot cycle between equally good thresholds.
_IMPROVE_TOL = 1e-12

# Upper bound on elements per broadcast (rows x classes x grid chunk) so memory
# stays modest on large validation sets.
_CHUNK_ELEMS = 4_000_000


def _check_inputs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (n_rows, n_labels), got shape {probs.shape}")
    if y_true is None:
        return None, probs
    y = np.asarray(y_true)
    if y.shape != probs.shape:
        raise ValueError(f"shape mismatch: y_true {y.shape} vs probs {probs.shape}")
    return y.astype(bool), probs


def _check_grid(grid) -> np.ndarray:
    g = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64).ravel()
    if g.size == 0:
        raise ValueError("threshold grid is empty")
    return g


def _ratio(probs: np.ndarray, thresholds) -> np.ndarray:
    """``probs / thresholds`` with the threshold floored at a tiny positive value."""
    return probs / np.maximum(thresholds, _RATIO_EPS)


def apply_thresholds(probs, thresholds, ensure_nonempty: bool = True) -> np.ndarray:
    """Binarise probabilities with a scalar or per-class threshold.

    Args:
        probs: ``(n, c)`` probabilities.
        thresholds: a scalar, or a length-``c`` sequence of per-class thresholds.
        ensure_nonempty: give a row with no label at or above its threshold the
            single label with the largest ``prob / threshold`` ratio (see the
            module docstring for why the ratio and not the raw probability).

    Returns:
        Bool array of shape ``(n, c)``.
    """
    _, probs = _check_inputs(None, probs)
    c = probs.shape[1]
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.ndim == 0:
        thr = np.full(c, float(thr))
    if thr.shape != (c,):
        raise ValueError(f"thresholds must be a scalar or have shape ({c},), got {thr.shape}")

    pred = probs >= thr
    if ensure_nonempty and c > 0:
        empty = ~pred.any(axis=1)
        if empty.any():
            rows = np.flatnonzero(empty)
            top = _ratio(probs[rows], thr).argmax(axis=1)
            pred[rows, top] = True
    return pred


def apply_argmax(probs) -> np.ndarray:
    """Exactly one label a row: the most probable (ties go to the lowest column index)."""
    _, probs = _check_inputs(None, probs)
    pred = np.zeros(probs.shape, dtype=bool)
    if probs.shape[1]:
        pred[np.arange(len(probs)), probs.argmax(axis=1)] = True
    return pred


def argmax_rule(y_true, probs) -> dict[str, Any]:
    """The stored decision rule of a multiclass model, scored on the tuning rows, shaped like :func:`tune`'s.

    ``thresholds`` are 0.5 for readers that only know thresholds: on softmax probabilities at most
    one class reaches 0.5, and the non-empty fallback picks the arg-max otherwise, so they give the
    same label sets (``runtime.decide`` applies the arg-max itself).
    """
    y, probs = _check_inputs(y_true, probs)
    pred = apply_argmax(probs)
    return {
        "method": ARGMAX,
        "thresholds": [0.5] * probs.shape[1],
        "val_mean_f1": float(row_f1(y, pred).mean()) if len(y) else float("nan"),
        "val_accuracy": float((pred == y).all(axis=1).mean()) if len(y) else float("nan"),
    }


def _global_scores(y: np.ndarray, probs: np.ndarray, grid: np.ndarray, ensure_nonempty: bool) -> np.ndarray:
    """Mean F1 for every global threshold in ``grid`` (vectorised over the grid)."""
    n, c = probs.shape
    n_true = y.sum(axis=1)[:, None]
    scores = np.empty(grid.size, dtype=np.float64)
    step = max(1, _CHUNK_ELEMS // max(1, n * c))
    for start in range(0, grid.size, step):
        g = grid[start : start + step]
        pred = probs[:, :, None] >= g[None, None, :]  # (n, c, k)
        if ensure_nonempty:
            empty = ~pred.any(axis=1)  # (n, k)
            if empty.any():
                r, k = np.nonzero(empty)
                # Same elementwise division as apply_thresholds so ties resolve identically.
                top = _ratio(probs[r], g[k][:, None]).argmax(axis=1)
                pred[r, top, k] = True
        tp = (pred & y[:, :, None]).sum(axis=1)
        denom = n_true + pred.sum(axis=1)
        scores[start : start + step] = _f1_from_counts(tp, denom).mean(axis=0)
    return scores


def tune_global(y_true, probs, ensure_nonempty: bool = True, grid=None) -> tuple[float, float]:
    """Single threshold shared by all classes that maximises mean F1.

    Args:
        y_true: ``(n, c)`` 0/1 true labels of the tuning rows.
        probs: ``(n, c)`` predicted probabilities for the same rows.
        ensure_nonempty: passed through to :func:`apply_thresholds` semantics.
        grid: candidate thresholds (default 0.01..0.99 step 0.01).

    Returns:
        ``(threshold, mean_f1)``. Ties go to the first (lowest, for a sorted
        grid) candidate.
    """
    y, probs = _check_inputs(y_true, probs)
    grid = _check_grid(grid)
    if probs.shape[0] == 0:
        raise ValueError("cannot tune thresholds on zero rows")
    scores = _global_scores(y, probs, grid, ensure_nonempty)
    best = int(np.argmax(scores))
    return float(grid[best]), float(scores[best])


def _class_scores(
    j: int,
    cand: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    ratio: np.ndarray,
    pred: np.ndarray,
    tp: np.ndarray,
    npred: np.ndarray,
    n_true: np.ndarray,
    ensure_nonempty: bool,
) -> np.ndarray:
    """Mean F1 for each candidate threshold of class ``j``, others held fixed.

    ``pred``/``tp``/``npred`` describe the raw (pre-fallback) predictions under
    the current thresholds; ``ratio`` is ``probs / thresholds`` under them.
    """
    yj = y[:, j]
    pj = pred[:, j]
    # Counts from every class except j (raw, before any fallback).
    tp_o = tp - (pj & yj)
    npred_o = npred - pj

    pred_j = probs[:, j][:, None] >= cand[None, :]  # (n, k)
    add_tp = np.zeros(pred_j.shape, dtype=np.int64)
    add_pred = np.zeros(pred_j.shape, dtype=np.int64)

    if ensure_nonempty and probs.shape[1] > 0:
        # Only rows where no other class fires can need the fallback; for them,
        # the winner is j or the best other class, decided by the ratios.
        fb_rows = np.flatnonzero(npred_o == 0)
        if fb_rows.size:
            sub = ratio[fb_rows].copy()
            sub[:, j] = -np.inf
            k_o = sub.argmax(axis=1)
            r_o = sub[np.arange(fb_rows.size), k_o]
            r_j = _ratio(probs[fb_rows, j][:, None], cand[None, :])
            # np.argmax keeps the first maximum, so j wins a tie iff j < k_o.
            j_wins = (r_j > r_o[:, None]) | ((r_j == r_o[:, None]) & (j < k_o)[:, None])
            fires = ~pred_j[fb_rows]
            take_j = fires & j_wins
            take_o = fires & ~j_wins
            pred_j[fb_rows] |= take_j
            y_ko = y[fb_rows, k_o][:, None]
            add_tp[fb_rows] += take_o & y_ko
            add_pred[fb_rows] += take_o

    tp_all = tp_o[:, None] + (pred_j & yj[:, None]) + add_tp
    denom = n_true[:, None] + npred_o[:, None] + pred_j + add_pred
    return _f1_from_counts(tp_all, denom).mean(axis=0)


def _move_class(j, value, y, probs, thr, ratio, pred, tp, npred) -> None:
    """Set class ``j``'s threshold to ``value``, updating the per-row state (in place) by its change alone."""
    new_col = probs[:, j] >= value
    old_col = pred[:, j]
    tp += (new_col & y[:, j]).astype(np.int64) - (old_col & y[:, j])
    npred += new_col.astype(np.int64) - old_col
    pred[:, j] = new_col
    thr[j] = value
    ratio[:, j] = _ratio(probs[:, j], value)


def tune_per_class(y_true, probs, ensure_nonempty: bool = True, grid=None, passes: int = 3) -> tuple[np.ndarray, float]:
    """Per-class thresholds by coordinate ascent on mean F1.

    Starts from the tuned global threshold. Each pass visits the classes in
    column order and moves a class to the grid value that maximises mean F1
    given all other thresholds, but only when that strictly improves the
    score (so the search cannot cycle and the result never scores below the
    global threshold). Stops after a pass that changes nothing, or after
    ``passes`` passes. Mean F1 couples the classes through each row's
    denominator (and through the non-empty fallback), which is why a single
    sweep is not enough and why the result is only a local optimum.

    Args:
        y_true: ``(n, c)`` 0/1 true labels of the tuning rows.
        probs: ``(n, c)`` predicted probabilities.
        ensure_nonempty: score with the non-empty fallback, as at inference.
        grid: candidate thresholds (default 0.01..0.99 step 0.01).
        passes: maximum number of sweeps over the classes.

    Returns:
        ``(thresholds of shape (c,), mean_f1 on the tuning rows)``.
    """
    y, probs = _check_inputs(y_true, probs)
    grid = _check_grid(grid)
    if passes < 1:
        raise ValueError("passes must be >= 1")
    t0, _ = tune_global(y, probs, ensure_nonempty, grid)
    n, c = probs.shape
    thr = np.full(c, t0)

    # Per-row state, updated incrementally as one class's threshold moves.
    pred = probs >= thr
    tp = np.count_nonzero(pred & y, axis=1)
    npred = np.count_nonzero(pred, axis=1)
    n_true = np.count_nonzero(y, axis=1)
    ratio = _ratio(probs, thr)

    for _ in range(passes):
        changed = False
        for j in range(c):
            # Score the current value through the same code path as the grid so
            # that "improvement" compares like with like.
            cand = np.append(grid, thr[j])
            scores = _class_scores(j, cand, y, probs, ratio, pred, tp, npred, n_true, ensure_nonempty)
            current = scores[-1]
            best = int(np.argmax(scores[:-1]))
            if scores[best] > current + _IMPROVE_TOL:
                _move_class(j, grid[best], y, probs, thr, ratio, pred, tp, npred)
                changed = True
        if not changed:
            break
    # Recompute from scratch: the reported figure should not carry any drift
    # from the per-class bookkeeping.
    final = float(row_f1(y, apply_thresholds(probs, thr, ensure_nonempty)).mean())
    return thr, final


def tune_balanced(y_true, probs, grid=None) -> np.ndarray:
    """Per-class thresholds where false positives roughly equal false negatives.

    The "seed" rule: for each class pick the grid value minimising
    ``|FP - FN|`` on the tuning rows, so the predicted count matches the true
    count. It ignores the other classes and the non-empty fallback, which makes
    it a robust, cheap baseline (and a sane starting point) rather than an F1
    optimiser. Ties go to the value closest to 0.5, then to the lower value; a
    class with no positives gets 0.5.

    Args:
        y_true: ``(n, c)`` 0/1 true labels of the tuning rows.
        probs: ``(n, c)`` predicted probabilities.
        grid: candidate thresholds (default 0.01..0.99 step 0.01).

    Returns:
        Thresholds of shape ``(c,)``.
    """
    y, probs = _check_inputs(y_true, probs)
    grid = _check_grid(grid)
    c = probs.shape[1]
    thr = np.full(c, 0.5)
    # Tie-break order: distance to 0.5, then the threshold itself.
    order = np.lexsort((grid, np.abs(grid - 0.5)))
    for j in range(c):
        pos = np.sort(probs[y[:, j], j])
        if pos.size == 0:
            continue
        neg = np.sort(probs[~y[:, j], j])
        # Counts under the inclusive rule (prob >= t is predicted).
        fn = np.searchsorted(pos, grid, side="left")
        fp = neg.size - np.searchsorted(neg, grid, side="left")
        gap = np.abs(fp - fn)[order]
        thr[j] = grid[order[int(np.argmin(gap))]]
    return thr


def tune(method: str, y_true, probs, ensure_nonempty: bool = True) -> dict[str, Any]:
    """Tune thresholds with the named method and score them on the same rows.

    Args:
        method: one of ``"global"``, ``"per_class"``, ``"balanced"``.
        y_true: ``(n, c)`` 0/1 true labels of the tuning rows.
        probs: ``(n, c)`` predicted probabilities.
        ensure_nonempty: the inference-time fallback, used when scoring (and,
            for the F1-optimising methods, when searching).

    Returns:
        JSON-able ``{"method", "thresholds": [c floats], "val_mean_f1"}``;
        ``thresholds`` is per class even for ``"global"`` (value repeated), so
        consumers never need to special-case the method.
    """
    y, probs = _check_inputs(y_true, probs)
    c = probs.shape[1]
    if method == "global":
        t, _ = tune_global(y, probs, ensure_nonempty)
        thr = np.full(c, t)
    elif method == "per_class":
        thr, _ = tune_per_class(y, probs, ensure_nonempty)
    elif method == "balanced":
        thr = tune_balanced(y, probs)
    else:
        raise ValueError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")
    score = float(row_f1(y, apply_thresholds(probs, thr, ensure_nonempty)).mean())
    return {"method": method, "thresholds": [float(t) for t in thr], "val_mean_f1": score}
