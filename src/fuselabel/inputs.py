"""What ``FuseLabel`` accepts, turned into rows: tables, lists of dicts, photos and captions in memory, and the
targets scikit-learn passes (label lists or an indicator matrix).

    X: a table's path or a DataFrame (columns found or named), a list of dicts (one a row), or photos
    y: one list of labels per row, or an (n, classes) indicator matrix (``MultiLabelBinarizer``'s)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import Record, RecordSet

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".jsonl", ".ndjson", ".json", ".parquet", ".pq")
COLUMN_KEYWORDS = ("image_col", "text_col", "label_col", "id_col", "label_sep", "split_col")
# The keys a list of dicts names its photo and caption by, when image_col= and text_col= do not say.
PHOTO_KEYS = ("image", "photo", "img", "ImageID", "image_id", "path", "file")
CAPTION_KEYS = ("caption", "text", "Caption", "title", "description")


@dataclass
class Target:
    """The form the training labels were given in, which ``predict`` answers in: ``matrix`` (an indicator
    matrix; ``columns`` are its columns' labels, as tokens, in order) or ``lists`` (one label list a row)."""

    form: str
    columns: list[str]

    def lay_out(self, matrix: np.ndarray, tokens: Sequence[str], fill) -> np.ndarray:
        """A (rows, tokens) matrix laid out over ``columns`` (a column the training rows never held: ``fill``)."""
        if self.form != "matrix":
            return matrix
        out = np.full((len(matrix), len(self.columns)), fill, dtype=matrix.dtype)
        index = {t: j for j, t in enumerate(self.columns)}
        for k, token in enumerate(tokens):
            out[:, index[token]] = matrix[:, k]
        return out


def is_table(data) -> bool:
    """A table: a DataFrame, or the path of a table file (a single photo's path is a row, not a table)."""
    if type(data).__name__ in ("DataFrame", "RecordSet"):
        return True
    return isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() in TABLE_SUFFIXES


def is_dict_rows(data) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(row, dict) for row in data)


def column_keywords(given: dict, split: bool = False) -> dict:
    """The column keywords of a call, every one present (None: found); unknown ones are refused by name."""
    unknown = sorted(set(given) - set(COLUMN_KEYWORDS))
    if unknown:
        raise TypeError(
            f"unexpected keyword(s) {', '.join(unknown)}; a table's columns are named with {', '.join(COLUMN_KEYWORDS)}"
        )
    given = {k: given.get(k) for k in COLUMN_KEYWORDS}
    if not split:
        given.pop("split_col")  # prediction and evaluation read every row; the split is the model's own
    return given


def dict_rows(rows: Sequence[dict], image_col=None, text_col=None, images=None) -> tuple[list, list]:
    """(photos, captions) of a list of dicts; the keys are ``image_col``/``text_col`` or found by their names.
    A relative photo path is under ``images`` when given."""
    keys = set().union(*(row.keys() for row in rows))
    photo = image_col or next((k for k in PHOTO_KEYS if k in keys), None)
    texts = [text_col] if isinstance(text_col, str) else list(text_col or [])
    texts = texts or [k for k in CAPTION_KEYS if k in keys][:1]
    if photo is None and not texts:
        raise ValueError(
            f"rows given as dicts with keys {', '.join(sorted(map(str, keys)))}: no photo key ({', '.join(PHOTO_KEYS)}) "
            f"and no caption key ({', '.join(CAPTION_KEYS)}); name them with image_col= and text_col="
        )
    photos = [row.get(photo) if photo is not None else None for row in rows]
    if images is not None:
        photos = [Path(images) / p if isinstance(p, str) and p and not Path(p).is_absolute() else p for p in photos]
    captions = ["\n".join(str(row[c]) for c in texts if row.get(c)) or None for row in rows]
    return photos, captions


def one_row_or_many(values, what: str):
    """A list of rows. One photo (a path, bytes, a PIL image, an HxWxC array) or one caption given bare is one
    row, never a sequence of characters, bytes or pixel rows."""
    from PIL import Image

    if values is None:
        return None
    if isinstance(values, (str, bytes, bytearray, os.PathLike, Image.Image)):
        return [values]
    if isinstance(values, np.ndarray):
        if what == "images" and values.ndim in (2, 3) and values.dtype == np.uint8:
            return [values]
        if what == "images" and values.ndim == 4:
            return list(values)
        if what == "captions" and values.ndim == 1:
            return values.tolist()
        raise ValueError(
            f"{what}: an array of shape {values.shape} and type {values.dtype}; give photos as HxWx3 "
            "uint8 arrays (one, or a list), and captions as a list of strings"
        )
    if isinstance(values, dict) or not hasattr(values, "__len__"):
        raise ValueError(f"{what}: expected a list with one entry per row, got {type(values).__name__}")
    return list(values)


def row_count(images, captions) -> int:
    if images is None and captions is None:
        raise ValueError("give images=, captions= or both")
    if images is not None and captions is not None and len(images) != len(captions):
        raise ValueError(f"images and captions differ in length ({len(images)} and {len(captions)})")
    return len(images) if images is not None else len(captions)


def target_of(y) -> tuple[list[tuple[str, ...]], Target]:
    """(one tuple of label tokens a row, the form ``y`` came in) from label lists or an indicator matrix (a
    numpy array, a scipy sparse matrix or a DataFrame of 0/1: its column names, else positions, are the labels)."""
    if hasattr(y, "toarray"):  # scipy sparse
        y = y.toarray()
    columns = [str(c) for c in y.columns] if type(y).__name__ == "DataFrame" else None
    if columns is not None or (isinstance(y, np.ndarray) and y.ndim == 2):
        matrix = np.asarray(y)
        if matrix.ndim != 2 or not np.isin(matrix, (0, 1)).all():
            raise ValueError(
                f"labels: a matrix must be an (rows, labels) indicator of 0 and 1, got shape {matrix.shape}; "
                "or give one list of labels per row"
            )
        columns = columns or [str(j) for j in range(matrix.shape[1])]
        return [tuple(columns[j] for j in np.flatnonzero(row)) for row in matrix], Target("matrix", columns)
    if isinstance(y, (str, bytes)) or not hasattr(y, "__len__"):
        raise ValueError(f"labels: expected one list of labels per row or an indicator matrix, got {type(y).__name__}")
    rows = []
    for i, row in enumerate(y):
        if isinstance(row, (str, int, np.integer)):
            row = [row]  # one label a row (multiclass targets)
        if not hasattr(row, "__iter__"):
            raise ValueError(f"labels: row {i} is {type(row).__name__}, not a list of labels")
        rows.append(tuple(dict.fromkeys(str(label) for label in row)))
    return rows, Target("lists", [])


def with_labels(records: RecordSet, labels: Sequence[tuple[str, ...]]) -> RecordSet:
    """A table's rows with the labels given beside it (``fit(X, y)``) in place of any label column."""
    if len(labels) != len(records.records):
        raise ValueError(f"{records.path}: {len(records.records)} rows but {len(labels)} label rows in y")
    rows = [dataclasses.replace(r, labels=tuple(row)) for r, row in zip(records.records, labels)]
    return RecordSet(path=records.path, records=rows, labelled=True, table=records.table)


def records_in_memory(images, captions, labels, folder: Path) -> RecordSet:
    """Rows in memory as a RecordSet over files: photos given as PIL images, HxWx3 uint8 arrays or bytes are
    written to ``folder`` (PNG: lossless, and the frozen-feature cache keys on the file's bytes)."""
    from PIL import Image

    if labels is None or captions is None:
        raise ValueError("fit in memory needs captions= and labels= (and images=) lists of the same length")
    n = len(labels)
    images = list(images) if images is not None else [None] * n
    if not (len(images) == len(captions) == n):
        raise ValueError(f"images, captions and labels differ in length ({len(images)}, {len(captions)}, {n})")
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (img, caption, row_labels) in enumerate(zip(images, captions, labels)):
        if isinstance(img, np.ndarray):
            img = Image.fromarray(_uint8_photo(img, i))
        if isinstance(img, Image.Image):
            name = f"row{i}.png"
            img.save(folder / name)
        elif isinstance(img, (bytes, bytearray)):
            name = f"row{i}.img"
            (folder / name).write_bytes(img)
        elif img is None:
            name = f"row{i}.missing"
        else:
            name = str(Path(img).resolve())
        tokens = tuple(dict.fromkeys(str(label) for label in row_labels))
        records.append(Record(image_id=name, caption=caption or "", labels=tokens, line=i + 1))
    return RecordSet(path=folder / "rows", records=records, labelled=True)


def _uint8_photo(array: np.ndarray, row: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"images[{row}]: an array of shape {array.shape} and type {array.dtype}; a photo is an HxWx3 "
            "(or HxW grey) uint8 array"
        )
    return array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array


def as_matrix(rows: Sequence[Sequence[str]], columns: Sequence[str]) -> np.ndarray:
    """(rows, columns) 0/1 int matrix of label-token rows over ``columns`` (tokens not among them are dropped)."""
    index = {c: j for j, c in enumerate(columns)}
    out = np.zeros((len(rows), len(columns)), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, [index[t] for t in row if t in index]] = 1
    return out


def warn_missing_inputs(p, photos) -> None:
    """One warning with the count of rows predicted without their photo (or with nothing): in Python as on the
    command line, a wrong image folder must not pass for caption-only predictions unnoticed."""
    missing = [
        i
        for i, (s, photo) in enumerate(zip(p.status, photos))
        if s in ("caption_only", "no_input") and photo is not None
    ]
    if missing:
        first = p.image_errors[missing[0]] if p.image_errors else None
        log.warning(
            f"{len(missing)} of {len(p)} rows were predicted without their photo"
            + (f" (first: {first})" if first else "")
            + "; strict=True makes this an error"
        )


def training_rows(X, y, images, captions, labels, columns: dict, work: Path):
    """(rows: a table or a RecordSet, image folder, target form) of ``fit``'s arguments."""
    from .tables import Columns, read_table

    if y is not None and labels is not None:
        raise ValueError("labels given twice: as y and as labels=")
    given = y if y is not None else labels
    tokens, target = target_of(given) if given is not None else (None, Target("lists", []))
    if X is not None and captions is not None:
        raise ValueError("give either X (a table or rows) or captions= lists, not both")
    if X is not None and is_table(X):
        # photo paths are relative to ``images``; without it, absolute or relative to where this runs
        image_dir = Path(images) if images is not None else Path(".")
        if tokens is None:
            return X, image_dir, target
        records = read_table(X, Columns.of(**{**columns, "label_col": None}), need_labels=False)
        return with_labels(records, tokens), image_dir, target
    if X is not None and not is_dict_rows(X):
        raise ValueError(
            f"fit(X): expected a table's path (.csv, .tsv, .jsonl, .parquet), a pandas DataFrame or a "
            f"list of dicts, got {type(X).__name__}"
        )
    if X is not None:
        images, captions = dict_rows(X, columns["image_col"], columns["text_col"], images)
    elif images is not None and isinstance(images, (str, os.PathLike)):
        raise ValueError("images= is a folder only beside a table; in memory it is a list of photos")
    return records_in_memory(images, captions, tokens, work / "photos"), work / "photos", target


def prediction_rows(X, images, captions, columns: dict, trained: dict):
    """(photos, captions, image folder, row names) from a table (path or DataFrame), dicts or lists."""
    if X is not None and is_table(X):
        from .tables import Columns, read_table

        if captions is not None:
            raise ValueError("give either a table (X) or captions=, not both")
        if images is not None and not isinstance(images, (str, os.PathLike)):
            raise ValueError("with a table, images= is the folder its photo paths are relative to")
        records = read_table(X, Columns.of(**columns), trained=trained)
        rows = records.records
        return (
            [r.image_id or None for r in rows],
            [r.caption for r in rows],
            images,
            list(map(records.row_name, rows)),
        )
    if X is not None and is_dict_rows(X):
        photos, texts = dict_rows(X, columns["image_col"], columns["text_col"], images)
        return photos, texts, None, None
    if any(v is not None for v in columns.values()):
        raise ValueError(
            f"{', '.join(k for k, v in columns.items() if v is not None)}: only for a table given "
            "as X (a path or a DataFrame) or rows given as dicts"
        )
    if X is not None:  # the photos, given first as in predict(photos, captions)
        if images is not None and captions is None:
            captions = images
        elif images is not None:
            raise ValueError("photos given twice: as the first argument and as images=")
        images = X
    images, captions = one_row_or_many(images, "images"), one_row_or_many(captions, "captions")
    n = row_count(images, captions)
    photos = list(images) if images is not None else [None] * n
    return photos, list(captions) if captions is not None else [None] * n, None, None
