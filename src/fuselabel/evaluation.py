"""A model's metrics report on labelled rows: which rows (all, or one side of the model's own split), how a
label the model never saw counts, and what the report says besides the figures."""

from __future__ import annotations

import importlib
import logging
import threading

import numpy as np

from .labels import label_vocabulary, labels_to_matrix, sort_labels
from .metrics import evaluate as evaluate_sets
from .runtime import STATUSES, Prediction, Predictor

log = logging.getLogger(__name__)


def split_rows(bundle, records: list, split: str) -> list:
    """The rows of one side of the model's own train/validation split (``all`` keeps every row); ``bundle``
    is a loaded model's ``Bundle``, whose split (``split.json``) came with it."""
    if split == "all":
        return records
    recorded = bundle.extra.get("split.json")
    where = str(bundle.path) if bundle.path is not None else "the model"
    if recorded is None:
        raise ValueError(f"{where}: no record of the training split, so --split {split} cannot be applied")
    ids = set(recorded[f"{split}_ids"])
    chosen = [r for r in records if r.id in ids]
    if not chosen:
        raise ValueError(f"none of the table's rows are on the {split} side of {where}'s split")
    return chosen


def _import_quietly(name: str) -> None:
    """Import ``name`` ahead of its use; a failure is left for that use to raise, with its own traceback."""
    try:
        importlib.import_module(name)
    except ImportError:
        pass


def evaluate_records(predictor: Predictor, bundle, records, images, split: str = "all") -> dict:
    """The metrics report of ``predictor`` (the model of ``bundle``) on a labelled RecordSet's rows.

    A label the model never saw counts as missed on every row that holds it (and is named once in a
    warning), so the figure is what the model would score on these rows.
    """
    # scikit-learn's import (about a second) overlaps the prediction, whose encoders run outside the GIL.
    metrics_import = threading.Thread(target=_import_quietly, args=("sklearn.metrics",), daemon=True)
    metrics_import.start()
    rows = split_rows(bundle, records.records, split)
    names = (records.row_name(r) for r in rows)
    chunks = list(
        predictor.iter_predict(((r.image_id or None, r.caption) for r in rows), image_dir=images, names=names)
    )
    p = Prediction.concat(chunks)
    metrics_import.join()
    tokens = list(bundle.labels)
    unseen = sort_labels(set(label_vocabulary(r.labels for r in rows)) - set(tokens))
    predicted = p.predicted
    if unseen:
        held = sum(any(label in unseen for label in r.labels) for r in rows)
        log.warning(
            f"{records.path}: {len(unseen)} label(s) the model never saw ({', '.join(unseen[:10])}"
            f"{' ...' if len(unseen) > 10 else ''}) on {held} row(s): counted as missed on every row "
            "that holds them"
        )
        predicted = np.concatenate([predicted, np.zeros((len(rows), len(unseen)), bool)], axis=1)
    vocab = tokens + unseen
    truth = labels_to_matrix([r.labels for r in rows], vocab)
    report = evaluate_sets(truth, predicted, vocab, bundle.label_names)
    if bundle.config.task == "multiclass":
        report["accuracy"] = report["exact_match"]  # one label a row: every label right
    report.update(
        model_dir=str(bundle.path),
        csv=str(records.path),
        split=split,
        status_counts={s: p.status.count(s) for s in STATUSES},
        unseen_labels=unseen,
        texts_cut=p.texts_cut,
    )
    return report
