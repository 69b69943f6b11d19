"""Fusion weight and decision thresholds tuned on validation rows: one scoring path for every validation figure.

The figure that picks the checkpoint and stops training early, and the figure the model folder records, are
both :func:`score_validation` over per-head validation probabilities: the late-fusion weight tuned by
``runtime.fuse``, thresholds tuned by ``thresholds``, label sets by ``runtime.decide``. At the end of training
:func:`calibrate` feeds it what the stored model predicts through ``runtime.Predictor``, so ``evaluate --split
val`` on the folder gives back the recorded mean F1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import THRESHOLD_METHODS, Config
from .engines import engine_for_bundle
from .metrics import mean_f1
from .runtime import Prediction, Predictor, caption_given, decide, fuse
from .thresholds import argmax_rule, tune, tune_global


@dataclass
class Calibration:
    """What validation rows tuned: fused probabilities, the fusion rule's settings, the decision rule and its
    label sets, and the rows' mean F1 (rows with neither input count, with no labels)."""

    probs: np.ndarray  # (n, L) fused probabilities; NaN where a row had no usable input
    known: np.ndarray  # (n,) bool: rows with probabilities, the ones thresholds are tuned on
    fusion: dict  # {"late_weight": w[, "late_weight_scores": {w: F1}]}
    thresholds: dict  # thresholds.tune's result (all three rules under "alternatives" when asked)
    predicted: np.ndarray  # (n, L) bool
    mean_f1: float
    parts: dict = field(default_factory=dict)  # per-head probabilities


def _weight_candidates() -> list[float]:
    # The weight is stored in fp16 like every weight, so the candidates are fp16 values too.
    return [float(np.float16(w)) for w in np.round(np.arange(0.0, 1.0001, 0.05), 2)]


def tune_fusion(config: Config, labels, parts: dict, image_present, caption_present) -> tuple[np.ndarray, dict]:
    """(fused probabilities, fusion info): the late weight tuned for mean F1 at a tuned global threshold when
    the model is ``late``/``weighted`` with ``late_weight`` unset; the set weight (or 0.5) otherwise."""
    known = None

    def fused(weight: float) -> np.ndarray:
        return fuse(parts, config.late_combine, weight, image_present, caption_present)

    def score(probs: np.ndarray) -> float:
        if config.task == "multiclass":
            return argmax_rule(labels[known], probs[known])["val_mean_f1"]
        return tune_global(labels[known], probs[known], config.ensure_nonempty)[1]

    if config.kind == "late" and config.late_combine == "weighted" and config.late_weight is None and len(parts) > 1:
        known = np.asarray(image_present, bool) | np.asarray(caption_present, bool)
        scores = {w: score(fused(w)) for w in _weight_candidates()}
        weight = max(scores, key=scores.get)
        return fused(weight), {"late_weight": weight, "late_weight_scores": {str(k): v for k, v in scores.items()}}
    weight = float(np.float16(config.late_weight if config.late_weight is not None else 0.5))
    return fused(weight), {"late_weight": weight}


def tune_thresholds(config: Config, labels: np.ndarray, probs: np.ndarray, alternatives: bool = True) -> dict:
    """The configured rule tuned on validation rows (with ``alternatives``, all three, kept for reports).

    A multiclass model tunes nothing: its rule is the arg-max label (``method: "argmax"``).
    """
    if config.task == "multiclass":
        return {**argmax_rule(labels, probs), "ensure_nonempty": True, "alternatives": {}}
    methods = THRESHOLD_METHODS if alternatives else (config.threshold_method,)
    results = {m: tune(m, labels, probs, config.ensure_nonempty) for m in methods}
    chosen = dict(results[config.threshold_method])
    chosen["ensure_nonempty"] = config.ensure_nonempty
    chosen["alternatives"] = {
        m: {"val_mean_f1": r["val_mean_f1"], "thresholds": r["thresholds"]} for m, r in results.items()
    }
    return chosen


def score_validation(
    config: Config, labels, parts: dict, image_present, caption_present, *, alternatives: bool = False
) -> Calibration:
    """Fusion and thresholds tuned on these rows, and the mean F1 of the label sets they give."""
    labels = np.asarray(labels, np.uint8)
    probs, fusion = tune_fusion(config, labels, parts, image_present, caption_present)
    known = ~np.isnan(probs).any(axis=1)  # rows with neither input get no labels, whatever is tuned
    thresholds = tune_thresholds(config, labels[known], probs[known], alternatives)
    thresholds.update(fusion)
    predicted = decide(probs, np.asarray(thresholds["thresholds"], np.float32), config.ensure_nonempty, config.task)
    return Calibration(probs, known, fusion, thresholds, predicted, mean_f1(labels, predicted), parts)


def calibrate(bundle, config: Config, rows, val_labels, device, *, features=None, image_present=None, image_dir=None):
    """:func:`score_validation` on what the stored model predicts for the validation rows, all rules tuned.

    ``bundle`` holds the weights as they will be stored (rounded to ``save_dtype``), and the rows go through
    ``runtime.Predictor``, the one prediction path. Frozen rows come with their cached ``features`` (the frozen
    encoders were rounded before those were computed); other rows run through the encoders.
    Returns (the Calibration, the Prediction).
    """
    engine = engine_for_bundle(
        bundle,
        engine="torch" if features is not None else config.feature_engine,
        device=device,
        cache_dir=config.cache_dir,
    )
    unused = np.full(len(bundle.labels), 0.5, np.float32)  # label sets are decided after tuning
    predictor = Predictor(engine, bundle.labels, unused, config.ensure_nonempty, workers=config.num_workers)
    if features is not None:
        p = predictor.predict_features(
            {f"{k}_feat": v for k, v in features.items()},
            np.asarray(image_present) > 0.5,
            [caption_given(r.caption) for r in rows],
        )
    else:
        chunks = list(predictor.iter_predict(((r.image_id or None, r.caption) for r in rows), image_dir=image_dir))
        p = Prediction.concat(chunks)
    result = score_validation(config, val_labels, p.parts, p.image_present, p.caption_present, alternatives=True)
    return result, p
