"""Label vocabulary: reading label names, finding how a table's label field separates its labels, and turning
label sets into matrices and back.

A vocabulary is the sorted list of distinct label tokens (numerically when all
are integers), and a label matrix is its multi-hot ``(rows, labels)`` encoding.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .records import RecordsError

__all__ = [
    "LABEL_SEPS",
    "LABEL_NAME_FILES",
    "find_label_names",
    "find_label_sep",
    "label_vocabulary",
    "label_sep_minority",
    "labels_to_matrix",
    "matrix_to_labels",
    "read_label_names",
    "sort_labels",
    "vocab_index",
]

_INTEGER = re.compile(r"[+-]?[0-9]+")


# Names of the two columns of a names file, as people spell them; a file without a header is (id, name).
_ID_HEADERS = (
    "label",
    "labels",
    "id",
    "label_id",
    "labelid",
    "class",
    "class_id",
    "classid",
    "code",
    "index",
    "key",
    "tag",
    "category_id",
    "imageid",
)
_NAME_HEADERS = (
    "name",
    "names",
    "label_name",
    "labelname",
    "class_name",
    "classname",
    "category",
    "category_name",
    "title",
    "description",
    "display_name",
    "text",
    "value",
)
# Files looked for beside the table and in the data folder when no names file is given.
LABEL_NAME_FILES = ("label_names.csv", "label_names.tsv", "label_names.json", "class_names.csv", "class_names.tsv")


def read_label_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a names file into ``{label: name}``: two columns (id, name) of a CSV or TSV, with or without a
    header (``Label,Name``, ``id,name``, ``class_id,class_name``, ...), or a JSON object ``{"1": "person"}``.

    Raises:
        RecordsError: the file is missing or unreadable, has fewer than two columns, or repeats a label.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read label names: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RecordsError(f"{path}: not valid UTF-8: {exc.reason}") from exc
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise RecordsError(f"{path}: expected a JSON object of label: name")
        return {str(k).strip(): str(v).strip() for k, v in data.items()}
    first = text.split("\n", 1)[0]
    delimiter = max(("\t", ",", ";"), key=first.count) if any(d in first for d in "\t,;") else ","
    rows = [
        (n, row)
        for n, row in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), 1)
        if row and "".join(row).strip()
    ]
    if not rows:
        raise RecordsError(f"{path}: no label names: expected rows of label{delimiter}name")
    header = [h.strip().lower() for h in rows[0][1]]
    id_col, name_col = 0, 1
    known = any(h in _ID_HEADERS for h in header) or any(h in _NAME_HEADERS for h in header)
    # A first row of unknown words above rows of numeric ids is a header too (``code,meaning``).
    numeric_ids = len(rows) > 1 and all(_INTEGER.fullmatch(row[0].strip()) for _, row in rows[1:] if row)
    if known or (numeric_ids and not _INTEGER.fullmatch(rows[0][1][0].strip())):
        id_col = next((i for i, h in enumerate(header) if h in _ID_HEADERS), 0)
        name_col = next(
            (i for i, h in enumerate(header) if h in _NAME_HEADERS and i != id_col), 1 if id_col == 0 else 0
        )
        rows = rows[1:]
    names: dict[str, str] = {}
    for line, row in rows:
        if len(row) < 2 or not row[id_col].strip():
            raise RecordsError(f"{path}:{line}: expected label{delimiter}name, got {delimiter.join(row)!r}")
        label, name = row[id_col].strip(), row[name_col].strip()
        if label in names:
            raise RecordsError(f"{path}:{line}: label {label!r} named twice")
        names[label] = name
    return names


def find_label_names(
    explicit: str | os.PathLike[str] | Mapping | None, folders: Iterable[str | os.PathLike[str] | None]
) -> tuple[dict[str, str], Path | None]:
    """({label: name}, the file read): ``explicit`` (a path or a mapping), else the first of
    ``LABEL_NAME_FILES`` in ``folders`` (beside the table, the data folder); ({}, None) when there is none."""
    if isinstance(explicit, Mapping):
        return {str(k): str(v) for k, v in explicit.items()}, None
    if explicit:
        return read_label_names(explicit), Path(explicit)
    seen = set()
    for folder in folders:
        if folder is None or Path(folder) in seen:
            continue
        seen.add(Path(folder))
        for name in LABEL_NAME_FILES:
            candidate = Path(folder) / name
            if candidate.is_file():
                return read_label_names(candidate), candidate
    return {}, None


# The characters that may separate labels in one field, in order of preference.
LABEL_SEPS = ("|", ";", ",")


def find_label_sep(fields: Iterable[str]) -> str | None:
    """The separator of label fields: of ``|``, ``;``, ``,``, the first (in that order) found in at least half as
    many fields as the most frequent one, so that a stray character in a few rows does not decide; else
    whitespace when the whitespace-separated words are ids or each a label seen alone elsewhere, else None (one
    label per field)."""
    fields = [f.strip() for f in fields if isinstance(f, str) and f.strip()]
    support = {sep: sum(sep in f for f in fields) for sep in LABEL_SEPS}
    most = max(support.values())
    if most:
        return next(sep for sep in LABEL_SEPS if 2 * support[sep] >= most)
    spaced = [f for f in fields if len(f.split()) > 1]
    if not spaced:
        return None
    words = [w for f in spaced for w in f.split()]
    if all(_INTEGER.fullmatch(w) for w in words):
        return " "
    alone = {f for f in fields if len(f.split()) == 1}
    if all(w in alone for w in words):
        return " "
    return None


def label_sep_minority(fields: Sequence[str | None], sep: str | None) -> list[int]:
    """Indexes of the fields that look written with another separator than ``sep``: they hold none of it but
    another of ``|``, ``;``, ``,``, and are not one label that other rows hold (``"café, au lait"``)."""
    if sep not in LABEL_SEPS:
        return []
    others = [s for s in LABEL_SEPS if s != sep]
    known = {part.strip() for f in fields if isinstance(f, str) and sep in f for part in f.split(sep)}
    return [
        i
        for i, f in enumerate(fields)
        if isinstance(f, str) and sep not in f and any(s in f for s in others) and f.strip() not in known
    ]


def as_user_labels(tokens: Sequence[str]) -> list:
    """Label tokens as the user's labels: ints when every one is an integer."""
    return [int(t) for t in tokens] if all(t.lstrip("-").isdigit() for t in tokens) else list(tokens)


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


def labels_to_matrix(
    label_sets: Sequence[Iterable[str]], vocab: Sequence[str], *, row_names: Sequence[str] | None = None
) -> np.ndarray:
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
                raise RecordsError(
                    f"unknown label {label!r} in {where} (vocabulary: {list(vocab)}); "
                    "the model was trained without it: remove it, or retrain with it"
                )
            matrix[i, j] = 1
    return matrix


def matrix_to_labels(
    matrix_bool: np.ndarray | Sequence[Sequence[object]], vocab: Sequence[str]
) -> list[tuple[str, ...]]:
    """Inverse of :func:`labels_to_matrix`: each row's nonzero columns as labels in vocab order."""
    matrix = np.asarray(matrix_bool)
    if matrix.ndim != 2 or matrix.shape[1] != len(vocab):
        raise ValueError(f"matrix shape {matrix.shape} does not match a vocabulary of {len(vocab)} labels")
    vocab = list(vocab)
    return [tuple(vocab[j] for j in np.flatnonzero(row)) for row in matrix.astype(bool)]
