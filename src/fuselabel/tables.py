"""Users' tables in: standard CSV (RFC 4180) and TSV, JSON Lines, Parquet, pandas DataFrames, and the course CSV.

Every table becomes the same :class:`~fuselabel.records.RecordSet`: one :class:`~fuselabel.records.Record`
per row with the photo's path (relative to the image folder, or absolute), the text (several text columns
joined by a line break), the label set (any strings) and, when the table has an id column other than the
photo's, the row's id. What was found (format, columns, label separator) travels with it as
``RecordSet.table``, so ``inspect`` can show it, and a model can remember the spelling of its training table
to write predictions in it.

Which column is which: what the caller names (``image_col=``, ``text_col=``, ``label_col=``, ``id_col=``,
``split_col=``), else the columns of the model's training table, else the course names (``ImageID``,
``Caption``, ``Labels``), else a few common names (``image``, ``text``, ``labels``, ...).

Labels come as a list (JSON Lines, Parquet, DataFrames) or in one field with a separator: ``|``, ``;``,
``,`` or whitespace, found from the data unless ``label_sep`` is given (``"none"``: one label per field).

The course file (``ImageID,Labels,Caption`` with quotes inside captions left unescaped) is recognised by its
header and by not being valid RFC 4180; it is read by :mod:`fuselabel.records` exactly as released.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import (
    BadRow,
    Record,
    RecordsError,
    RecordSet,
    bad_rows_message,
    decode_text,
    no_labels_error,
    parse_records,
)

__all__ = [
    "FORMATS",
    "SPLITS",
    "Columns",
    "find_label_sep",
    "image_root",
    "read_table",
    "require_labels",
    "table_format",
    "table_spelling",
]

FORMATS = ("course", "csv", "tsv", "jsonl", "parquet", "dataframe")
SPLITS = ("train", "val", "test")
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "holdout": "test",
}

# Column names tried when the caller names none: the course's first, then common spellings.
_IMAGE_NAMES = (
    "ImageID",
    "image",
    "image_path",
    "image_file",
    "imagepath",
    "photo",
    "img",
    "picture",
    "filename",
    "file",
    "path",
)
_TEXT_NAMES = (
    "Caption",
    "caption",
    "text",
    "title",
    "description",
    "body",
    "report",
    "sentence",
    "content",
    "name",
    "post",
    "message",
    "summary",
)
_LABEL_NAMES = (
    "Labels",
    "labels",
    "label",
    "tags",
    "tag",
    "categories",
    "category",
    "classes",
    "class",
    "hashtags",
    "target",
    "targets",
)
_COURSE_LABELLED = ("imageid", "labels", "caption")
_COURSE_UNLABELLED = ("imageid", "caption")
_LABEL_SEPS = ("|", ";", ",")
_SEP_WORDS = {"none": None, "space": " ", "whitespace": " ", "tab": "\t", "pipe": "|", "comma": ",", "semicolon": ";"}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class Columns:
    """Which column holds what; ``None`` means "find it". ``text`` may name several columns."""

    image: str | None = None
    text: tuple[str, ...] | None = None
    label: str | None = None
    id: str | None = None
    split: str | None = None
    label_sep: str | None = None  # None: found from the data; "none": one label per field

    @classmethod
    def of(cls, image_col=None, text_col=None, label_col=None, id_col=None, split_col=None, label_sep=None) -> Columns:
        if isinstance(text_col, str):
            text_col = (text_col,)
        return cls(image_col, tuple(text_col) if text_col else None, label_col, id_col, split_col, label_sep)

    def keywords(self) -> dict:
        """The same, as the Python API's keywords (image_col=, text_col=, ...)."""
        return {
            "image_col": self.image,
            "text_col": self.text,
            "label_col": self.label,
            "id_col": self.id,
            "label_sep": self.label_sep,
        }


@dataclass
class _Raw:
    """A table before its columns are chosen: column names and rows of cells, each with where it came from."""

    format: str
    columns: list[str]
    rows: list[Mapping[str, Any]]
    where: list[int]  # line (text formats) or row number (Parquet, DataFrame), 1-based
    unit: str  # "line" or "row"
    bad_rows: list[BadRow] = field(default_factory=list)


def table_format(path: str | os.PathLike[str]) -> str:
    """The format a file's name and first bytes say: jsonl, parquet, tsv or csv (course or standard: see read)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head == _PARQUET_MAGIC or suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    return "csv"


# --------------------------------------------------------------------------- reading each format


def _read_delimited(text: str, path: Path, delimiter: str, fmt: str) -> _Raw:
    """RFC 4180: quoted fields, ``""`` for a quote inside one, line breaks inside quotes. Strict: a malformed
    field is an error naming its line, never a silently different value."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise RecordsError(f"{path}:1: {err}") from None
    if not header or not any(h.strip() for h in header):
        raise RecordsError(
            f"{path}:1: empty file or blank header: expected a header naming the columns, such as "
            "'ImageID,Labels,Caption'"
        )
    columns = [h.strip() for h in header]
    _check_column_names(columns, path)
    rows, where, bad = [], [], []
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise RecordsError(
                f"{path}:{start}: not valid {fmt.upper()} ({err}); quote fields that hold the "
                f'delimiter, a quote or a line break, and write a quote inside one as ""'
            ) from None
        line, start = start, reader.line_num + 1
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if len(cells) != len(columns):
            bad.append(
                BadRow(
                    str(path),
                    line,
                    f"{len(cells)} fields where the header has {len(columns)}",
                    delimiter.join(cells)[:200],
                )
            )
            continue
        rows.append(dict(zip(columns, cells)))
        where.append(line)
    return _Raw(fmt, columns, rows, where, "line", bad)


def _read_jsonl(text: str, path: Path) -> _Raw:
    columns: dict[str, None] = {}
    rows, where, bad = [], [], []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append(BadRow(str(path), i, f"not valid JSON ({err.msg} at column {err.colno})", line[:200]))
            continue
        if not isinstance(row, dict):
            bad.append(BadRow(str(path), i, f"expected a JSON object per line, got {type(row).__name__}", line[:200]))
            continue
        columns.update(dict.fromkeys(row))
        rows.append(row)
        where.append(i)
    if not rows and not bad:
        raise RecordsError(f"{path}: no rows: expected one JSON object per line")
    return _Raw("jsonl", list(columns), rows, where, "line", bad)


def _read_dataframe(df, name: str, fmt: str) -> _Raw:
    columns = list(df.columns)
    if not all(isinstance(c, str) for c in columns):
        raise ValueError(
            f"{name}: the DataFrame's columns have no names ({columns[:5]}); give them names "
            "(df.columns = [...]) and say which is which with image_col=, text_col=, label_col="
        )
    _check_column_names(columns, Path(name))
    rows = df.to_dict(orient="records")
    return _Raw(fmt, columns, rows, list(range(1, len(rows) + 1)), "row")


def _read_parquet(path: Path) -> _Raw:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises its own types for every kind of broken file
        raise RecordsError(f"{path}: cannot read as Parquet ({type(err).__name__}: {err})") from None
    return _read_dataframe(df, str(path), "parquet")


def _check_column_names(columns: Sequence[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for c in columns:
        seen[c] = seen.get(c, 0) + 1
    dupes = sorted(c for c, n in seen.items() if n > 1)
    if dupes:
        raise RecordsError(
            f"{path}:1: column name(s) {', '.join(map(repr, dupes))} appear more than once; "
            "rename them so each column has its own name"
        )


def _is_course(text: str) -> bool:
    """Whether a comma-separated text is the course dialect: its header, and not readable as RFC 4180."""
    first = text.split("\n", 1)[0].replace("\ufeff", "").strip().rstrip("\r")
    fields = tuple(f.strip().strip('"').strip().lower() for f in first.split(","))
    if fields not in (_COURSE_LABELLED, _COURSE_UNLABELLED):
        return False
    try:
        for cells in csv.reader(io.StringIO(text, newline=""), strict=True):
            if cells and len(cells) != len(fields) and any(c.strip() for c in cells):
                return True
    except csv.Error:
        return True
    # Valid RFC 4180 too: read it as such, so a caption written with "" escapes gets its quote back. A course
    # file whose captions hold no quotes reads the same either way.
    return False


def _load(source, name: str | None) -> tuple[_Raw | None, RecordSet | None, Path]:
    """(raw table, None) for the general formats, or (None, RecordSet) for a course-dialect file."""
    # A DataFrame can only come from a pandas that is loaded already: reading a file does not import pandas
    # (over half a second at start-up) unless the file is Parquet.
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(source, pd.DataFrame):
        label = name or "DataFrame"
        return _read_dataframe(source, label, "dataframe"), None, Path(label)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"expected a table's path or a pandas DataFrame, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        raise RecordsError(f"{path}: a folder, not a table; pass the CSV, TSV, JSON Lines or Parquet file")
    fmt = table_format(path)
    if fmt == "parquet":
        if not path.exists():
            raise RecordsError(f"{path}: cannot read: No such file or directory")
        return _read_parquet(path), None, path
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    text = decode_text(raw, path)
    if fmt == "jsonl":
        return _read_jsonl(text, path), None, path
    if fmt == "csv":
        header = text.split("\n", 1)[0]
        if header.count("\t") > header.count(","):
            fmt = "tsv"
        elif _is_course(text):
            return None, parse_records(text, path, strict=False), path
    return _read_delimited(text, path, "\t" if fmt == "tsv" else ",", fmt), None, path


# --------------------------------------------------------------------------- choosing the columns


def _pick(
    role: str,
    given,
    columns: Sequence[str],
    preferred: Sequence[str],
    names: Sequence[str],
    path: Path,
    flag: str,
    required: bool,
) -> str | None:
    if given is not None:
        if given not in columns:
            raise RecordsError(
                f"{path}:1: no column {given!r} for the {role} ({flag}); the table has {', '.join(map(repr, columns))}"
            )
        return given
    for candidate in list(preferred) + list(names):
        if candidate and candidate in columns:
            return candidate
    lower = {c.lower(): c for c in columns}
    for candidate in names:
        if candidate.lower() in lower:
            return lower[candidate.lower()]
    if required:
        raise RecordsError(
            f"{path}:1: found no column for the {role}: the table has {', '.join(map(repr, columns))}; "
            f"name it with {flag} COLUMN"
        )
    return None


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    pd = sys.modules.get("pandas")
    return pd is not None and (value is pd.NA or value is pd.NaT)


def _text(value) -> str:
    if _missing(value):
        return ""
    return value if isinstance(value, str) else str(value)


def _cell_str(value) -> str:
    """An id or path cell as text: 3.0 read by pandas from an integer column is "3", not "3.0"."""
    if _missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value.strip() if isinstance(value, str) else str(value)


def _snippet(row: dict) -> str:
    """A bad row as its error shows it (built only for bad rows: most rows are good)."""
    return json.dumps(
        {k: _text(v)[:40] if not _is_list(v) else list(map(str, v))[:5] for k, v in row.items()}, ensure_ascii=False
    )[:200]


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray"


def find_label_sep(fields: Iterable[str]) -> str | None:
    """The separator of label fields: the first of ``|``, ``;``, ``,`` that occurs, else whitespace when the
    whitespace-separated words are ids or each a label seen alone elsewhere, else None (one label per field)."""
    fields = [f.strip() for f in fields if isinstance(f, str) and f.strip()]
    for sep in _LABEL_SEPS:
        if any(sep in f for f in fields):
            return sep
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


def _split_labels(value, sep: str | None) -> tuple[str, ...]:
    if _missing(value):
        return ()
    if _is_list(value):
        parts = [_cell_str(v) for v in value if not _missing(v)]
    else:
        text = _cell_str(value)
        if sep is None:
            parts = [text]
        elif sep == " ":
            parts = text.split()
        else:
            parts = text.split(sep)
    # dict.fromkeys de-duplicates while keeping the table's order
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _label_sep(raw: _Raw, label_col: str, given: str | None, preferred: str | None) -> str | None:
    if given is not None:
        # a word ("none", "space", "pipe"...) or the separator itself; blank means whitespace
        return _SEP_WORDS.get(given.strip().lower(), given) if given.strip() else " "
    values = [row.get(label_col) for row in raw.rows]
    if any(_is_list(v) for v in values):
        return None
    strings = [v for v in values if isinstance(v, str)]
    if preferred is not None and preferred != "none" and any(preferred in v for v in strings):
        return preferred
    return find_label_sep(strings)


def _split_value(value, path: Path, where: str) -> str:
    word = _cell_str(value).lower()
    if word not in _SPLIT_WORDS:
        raise RecordsError(f"{path}:{where}: split value {_cell_str(value)!r}: expected one of train, val, test")
    return _SPLIT_WORDS[word]


# --------------------------------------------------------------------------- the door


def read_table(
    source,
    columns: Columns | None = None,
    *,
    trained: Mapping | None = None,
    need_labels: bool = False,
    strict: bool = True,
    name: str | None = None,
) -> RecordSet:
    """Read a table of photos, texts and (optionally) labels into a :class:`RecordSet`.

    Args:
        source: a path (CSV, TSV, JSON Lines, Parquet; the course CSV is recognised) or a pandas DataFrame.
        columns: which column is which (:class:`Columns`); anything not named is found.
        trained: the ``table`` of the model's training data: its column names are tried first.
        need_labels: a label column is required (training, evaluation).
        strict: a bad row raises :class:`RecordsError`; otherwise it is kept in ``bad_rows``.
        name: what to call a DataFrame in messages.

    Raises:
        RecordsError: unreadable file, missing column, malformed or duplicate row (named by file and line).
        ValueError: a DataFrame without column names, or a source of another type.
    """
    if isinstance(source, RecordSet):  # already read
        return source
    columns = columns or Columns()
    trained = trained or {}
    raw, course, path = _load(source, name)
    if course is not None:
        return _course_table(course, columns, need_labels, strict)
    assert raw is not None
    if not raw.rows and raw.bad_rows and strict:
        raise RecordsError(bad_rows_message(path, raw.bad_rows))
    image_col = _pick(
        "photo",
        columns.image,
        raw.columns,
        [trained.get("image_col")],
        _IMAGE_NAMES,
        path,
        "--image-col",
        required=True,
    )
    if columns.text:
        text_cols = tuple(_pick("text", c, raw.columns, [], (), path, "--text-col", True) for c in columns.text)
    else:
        trained_text = [c for c in trained.get("text_cols") or () if c in raw.columns]
        found = _pick("text", None, raw.columns, [], _TEXT_NAMES, path, "--text-col", required=False)
        text_cols = tuple(trained_text) or ((found,) if found else ())
        if not text_cols:
            raise RecordsError(
                f"{path}:1: found no text column: the table has {', '.join(map(repr, raw.columns))}; "
                "name it with --text-col COLUMN (repeat it for several)"
            )
    label_col = _pick(
        "labels",
        columns.label,
        raw.columns,
        [trained.get("label_col")],
        _LABEL_NAMES,
        path,
        "--label-col",
        required=need_labels,
    )
    # A model trained with an id column of its own names rows by it again wherever the table has it.
    trained_id = trained.get("id_col") if trained.get("id_col") != trained.get("image_col") else None
    id_col = _pick("row id", columns.id, raw.columns, [trained_id], (), path, "--id-col", False) or image_col
    split_col = _pick("split", columns.split, raw.columns, [], (), path, "--split-col", True) if columns.split else None
    sep = _label_sep(raw, label_col, columns.label_sep, trained.get("label_sep")) if label_col else None

    records, bad = [], list(raw.bad_rows)
    first: dict[str, int] = {}
    for row, n in zip(raw.rows, raw.where):
        where = f"{n}"
        image = _cell_str(row.get(image_col))
        row_id = _cell_str(row.get(id_col))
        texts = [_text(row.get(c)) for c in text_cols]
        caption = "\n".join(t for t in texts if t.strip()) if len(texts) > 1 else texts[0]
        if not row_id:
            what = "photo" if id_col == image_col else f"id ({id_col})"
            bad.append(
                BadRow(
                    str(path),
                    n,
                    f"empty {what}: every row needs an id; name a column of unique ids with --id-col",
                    _snippet(row),
                )
            )
            continue
        if row_id in first:
            bad.append(
                BadRow(
                    str(path),
                    n,
                    f"duplicate {id_col} {row_id}, first at {raw.unit} {first[row_id]} "
                    "(keep one of the two rows, or name a column of unique ids with --id-col)",
                    _snippet(row),
                )
            )
            continue
        try:
            labels = _split_labels(row.get(label_col), sep) if label_col else None
            split = _split_value(row.get(split_col), path, where) if split_col else None
        except RecordsError as err:
            bad.append(BadRow(str(path), n, str(err).split(": ", 1)[-1], _snippet(row)))
            continue
        first[row_id] = n
        records.append(Record(image, caption, labels, n, row_id=row_id if id_col != image_col else None, split=split))
    if strict and bad:
        raise RecordsError(bad_rows_message(path, bad, raw.unit))
    table = {
        "format": raw.format,
        "columns": raw.columns,
        "image_col": image_col,
        "text_cols": list(text_cols),
        "label_col": label_col,
        "id_col": id_col,
        "split_col": split_col,
        "label_sep": sep,
        "labels_as": (
            "list"
            if label_col and any(_is_list(r.get(label_col)) for r in raw.rows[:1000])
            else "field"
            if label_col
            else None
        ),
        "unit": raw.unit,
    }
    return RecordSet(path=path, records=records, bad_rows=bad, labelled=label_col is not None, table=table)


def require_labels(records: RecordSet, what: str = "this") -> RecordSet:
    """The one check that a table has labels, for every command that needs them (train, evaluate, report)."""
    if not records.labelled:
        raise no_labels_error(records.path, what)
    return records


def _course_table(course: RecordSet, columns: Columns, need_labels: bool, strict: bool) -> RecordSet:
    """The course file as read by records, with the same ``table`` description as any other."""
    for given, course_name, flag in (
        (columns.image, "ImageID", "--image-col"),
        (columns.label, "Labels", "--label-col"),
        (columns.id, "ImageID", "--id-col"),
    ):
        if given is not None and given != course_name:
            raise RecordsError(
                f"{course.path}: {flag} {given!r}: this course-format file's columns are "
                f"{'ImageID,Labels,Caption' if course.labelled else 'ImageID,Caption'}"
            )
    if columns.text and tuple(columns.text) != ("Caption",):
        raise RecordsError(
            f"{course.path}: --text-col {','.join(columns.text)!r}: this course-format file's text column is Caption"
        )
    if columns.split:
        raise RecordsError(
            f"{course.path}: --split-col {columns.split!r}: the course format has no split column; "
            "give the validation rows as their own file with --val-csv"
        )
    if need_labels:
        require_labels(course)
    if strict and course.bad_rows:
        raise RecordsError(bad_rows_message(course.path, course.bad_rows))
    course.table = {
        "format": "course",
        "columns": ["ImageID", "Labels", "Caption"] if course.labelled else ["ImageID", "Caption"],
        "image_col": "ImageID",
        "text_cols": ["Caption"],
        "label_col": "Labels" if course.labelled else None,
        "id_col": "ImageID",
        "split_col": None,
        "label_sep": " " if course.labelled else None,
        "labels_as": "field" if course.labelled else None,
        "unit": "line",
    }
    return course


def table_spelling(table: Mapping, vocab: Sequence[str]) -> dict:
    """What a model keeps of its training table, to read later tables by default and write predictions in the
    same spelling: the column names and the separator its label column is written with."""
    sep = table.get("label_sep")
    if sep is None:  # labels came as lists, or one per field: pick a separator no label contains
        sep = next((s for s in (*_LABEL_SEPS, " ") if not any(s in label for label in vocab)), "|")
    return {
        "format": table.get("format"),
        "image_col": table.get("image_col"),
        "text_cols": list(table.get("text_cols") or []),
        "label_col": table.get("label_col"),
        "id_col": table.get("id_col"),
        "label_sep": sep,
    }


def image_root(data: Path, images: Path, records: RecordSet, sample: int = 50) -> Path:
    """The folder a table's relative photo paths start from: ``images`` (DATA/data when it exists), unless the
    first rows' photos are found under ``data`` itself and not under ``images`` (paths like data/1.jpg)."""
    paths = [r.image_id for r in records.records[:sample] if r.image_id and not Path(r.image_id).is_absolute()]
    if images == data or not paths:
        return images
    under_images = sum((images / p).is_file() for p in paths)
    under_data = sum((data / p).is_file() for p in paths)
    return data if under_data > under_images else images
