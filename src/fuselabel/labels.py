"""Label vocabulary: reading label names and turning label sets into matrices and back.

A vocabulary is the sorted list of distinct label tokens (numerically when all
are integers), and a label matrix is its multi-hot ``(rows, labels)`` encoding.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .records import RecordsError

__all__ = [
    "label_vocabulary",
    "labels_to_matrix",
    "matrix_to_labels",
    "read_label_names",
    "sort_labels",
    "vocab_index",
]

_INTEGER = re.compile(r"[+-]?[0-9]+")


def read_label_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a ``Label,Name`` table (e.g. ``label_names.csv``) into ``{label: name}``.

    Raises:
        RecordsError: if the file is missing or unreadable, the header is not
            ``Label,Name``, or a row is malformed or repeats a label.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read label names: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RecordsError(f"{path}: not valid UTF-8: {exc.reason}") from exc
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None or [h.strip().lower() for h in header] != ["label", "name"]:
        raise RecordsError(f"{path}:1: bad header {header!r}: expected 'Label,Name'")
    names: dict[str, str] = {}
    for row in rows:
        line = rows.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip():
            raise RecordsError(f"{path}:{line}: expected 'Label,Name', got {row!r}")
        label, name = row[0].strip(), row[1].strip()
        if label in names:
            raise RecordsError(f"{path}:{line}: duplicate label {label!r}")
        names[label] = name
    return names


def sort_labels(tokens: Iterable[str]) -> list[str]:
    """Label tokens in vocabulary order: numerically when all are integers, else lexicographically."""
    tokens = list(tokens)
    if tokens and all(_INTEGER.fullmatch(t) for t in tokens):
        # Numeric ids must sort 1, 2, ..., 10 rather than 1, 10, 11, 2; the
        # string tie-break keeps "01" and "1" in a stable order.
        return sorted(tokens, key=lambda t: (int(t), t))
    return sorted(tokens)


def label_vocabulary(label_sets: Iterable[Iterable[str]]) -> list[str]:
    """All distinct labels of ``label_sets``.

    Sorted numerically when every token is an integer (``1, 2, ..., 19``),
    lexicographically otherwise.
    """
    seen: set[str] = set()
    for labels in label_sets:
        seen.update(labels)
    return sort_labels(seen)


def vocab_index(vocab: Sequence[str]) -> dict[str, int]:
    """``{label: column}`` for a vocabulary; ValueError if it repeats a label."""
    index = {label: j for j, label in enumerate(vocab)}
    if len(index) != len(vocab):
        dupes = sorted(label for label, c in Counter(vocab).items() if c > 1)
        raise ValueError(f"vocabulary has duplicate labels: {dupes}")
    return index


def labels_to_matrix(label_sets: Sequence[Iterable[str]], vocab: Sequence[str], *,
                     row_names: Sequence[str] | None = None) -> np.ndarray:
    """Multi-hot encode label sets as an ``(n, len(vocab))`` uint8 matrix.

    ``row_names`` (e.g. ``"test.csv:12"`` per row) name the rows in errors instead of their index.

    Raises:
        RecordsError: if a label is not in ``vocab`` (the message names the
            label and the row).
    """
    index = vocab_index(vocab)
    matrix = np.zeros((len(label_sets), len(vocab)), dtype=np.uint8)
    for i, labels in enumerate(label_sets):
        for label in labels:
            j = index.get(label)
            if j is None:
                where = row_names[i] if row_names is not None else f"row {i}"
                raise RecordsError(f"unknown label {label!r} in {where} (vocabulary: {list(vocab)}); "
                                   "the model was trained without it: remove it, or retrain with it")
            matrix[i, j] = 1
    return matrix


def matrix_to_labels(matrix_bool: np.ndarray | Sequence[Sequence[object]], vocab: Sequence[str]) -> list[tuple[str, ...]]:
    """Inverse of :func:`labels_to_matrix`: each row's nonzero columns as labels in vocab order."""
    matrix = np.asarray(matrix_bool)
    if matrix.ndim != 2 or matrix.shape[1] != len(vocab):
        raise ValueError(f"matrix shape {matrix.shape} does not match a vocabulary of {len(vocab)} labels")
    vocab = list(vocab)
    return [tuple(vocab[j] for j in np.flatnonzero(row)) for row in matrix.astype(bool)]
