r"""Users' tables in: standard CSV (RFC 4180) with any common delimiter, TSV, JSON Lines, JSON arrays, Parquet,
``.xlsx`` workbooks, pandas DataFrames, and the course CSV; whole (:func:`read_table`) or a bounded batch of rows
at a time (:func:`iter_table`), through the same steps.

Every table becomes :class:`~fuselabel.records.RecordSet`\ s: one :class:`~fuselabel.records.Record` per row with
the photo's path (relative to the image folder, or absolute), the text (several text columns joined by a line
break), the label set (any strings) and, when the table has an id column other than the photo's, the row's id.
What was found (format, delimiter, columns, label separator) travels with it as ``RecordSet.table``, so
``inspect`` can show it, and a model can remember the spelling of its training table to write predictions in it.
Formats and delimiters are :mod:`fuselabel.table_formats`' job; this module chooses the columns and reads cells.

Which column is which: what the caller names (``image_col=``, ``text_col=``, ``label_col=``, ``id_col=``,
``split_col=``), else the columns of the model's training table, else the course names (``ImageID``,
``Caption``, ``Labels``), else a few common names (``image``, ``text``, ``labels``, ...).

Labels come as a list (JSON, Parquet, DataFrames) or in one field with a separator: ``|``, ``;``, ``,`` or
whitespace, found from the majority of the rows unless ``label_sep`` is given (``"none"``: one label per field);
rows written with another separator are named (a warning, and ``inspect``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .labels import LABEL_SEPS, find_label_sep, label_sep_minority
from .records import BadRow, Record, RecordSet, bad_rows_message, no_labels_error
from .table_columns import Columns, describe_course, describe_table
from .table_formats import FORMATS, RawBatch, is_list, raw_batches, table_format
from .textfile import NoIds, RecordsError, SeenIds

__all__ = [
    "BATCH_ROWS",
    "FORMATS",
    "SPLITS",
    "Columns",
    "find_label_sep",
    "image_root",
    "iter_table",
    "read_table",
    "require_labels",
    "table_format",
    "table_spelling",
]

log = logging.getLogger(__name__)

# Rows per batch of iter_table: a few MB of records, enough for a label separator to be found from the majority.
BATCH_ROWS = 10_000
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

# How many rows written with another label separator a table's description names.
_MAX_LISTED_MINORITY = 10

# ------------------------------------------------------------------ reading cells


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
        {k: _text(v)[:40] if not is_list(v) else list(map(str, v))[:5] for k, v in row.items()}, ensure_ascii=False
    )[:200]


def _split_labels(value, sep: str | None) -> tuple[str, ...]:
    if _missing(value):
        return ()
    if is_list(value):
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


def _split_value(value, path: Path, where: str) -> str:
    word = _cell_str(value).lower()
    if word not in _SPLIT_WORDS:
        raise RecordsError(f"{path}:{where}: split value {_cell_str(value)!r}: expected one of train, val, test")
    return _SPLIT_WORDS[word]


class _RowReader:
    """Turns batches of cells into records with one table description, remembering across batches which ids were
    seen (to name a duplicate with the line of its first row)."""

    def __init__(self, table: dict, path: Path, seen: SeenIds) -> None:
        self.table, self.path = table, path
        self.seen = seen

    def _bad(self, raw: RawBatch, n: int, reason: str, row) -> None:
        raw.bad_rows.append(BadRow(str(self.path), n, reason, _snippet(row)))

    def _note_minority(self, raw: RawBatch) -> None:
        label_col, sep = self.table["label_col"], self.table["label_sep"]
        fields = [row.get(label_col) for row in raw.rows]
        odd = label_sep_minority(fields, sep)
        named = self.table["label_sep_minority"]
        named += [f"{raw.unit} {raw.where[i]}: {fields[i]!r}" for i in odd[: _MAX_LISTED_MINORITY - len(named)]]
        self.table["label_sep_minority_count"] += len(odd)

    def records(self, raw: RawBatch) -> RecordSet:
        t = self.table
        image_col, id_col, label_col, split_col = t["image_col"], t["id_col"], t["label_col"], t["split_col"]
        text_cols, sep = t["text_cols"], t["label_sep"]
        if label_col and t["labels_as"] == "field":
            self._note_minority(raw)
        records = []
        for row, n in zip(raw.rows, raw.where):
            row_id = _cell_str(row.get(id_col))
            if not row_id:
                what = "photo" if id_col == image_col else f"id ({id_col})"
                self._bad(
                    raw, n, f"empty {what}: every row needs an id; name a column of unique ids with --id-col", row
                )
                continue
            first = self.seen.line_of(row_id)
            if first is not None:
                reason = (
                    f"duplicate {id_col} {row_id}, first at {raw.unit} {first} "
                    "(keep one of the two rows, or name a column of unique ids with --id-col)"
                )
                self._bad(raw, n, reason, row)
                continue
            try:
                labels = _split_labels(row.get(label_col), sep) if label_col else None
                split = _split_value(row.get(split_col), self.path, f"{n}") if split_col else None
            except RecordsError as err:
                self._bad(raw, n, str(err).split(": ", 1)[-1], row)
                continue
            self.seen.add(row_id, n)
            texts = [_text(row.get(c)) for c in text_cols]
            caption = "\n".join(x for x in texts if x.strip()) if len(texts) > 1 else texts[0]
            row_id_kept = row_id if id_col != image_col else None
            records.append(Record(_cell_str(row.get(image_col)), caption, labels, n, row_id=row_id_kept, split=split))
        return RecordSet(self.path, records, raw.bad_rows, labelled=label_col is not None, table=t)


def _course_sets(batches: Iterator[RecordSet], columns: Columns, need_labels: bool) -> Iterator[RecordSet]:
    """The course parser's batches, with one description."""
    table = None
    for batch in batches:
        table = table or describe_course(batch, columns, need_labels)
        batch.table = table
        yield batch


def _record_sets(
    source, columns: Columns, size: int, *, trained=None, need_labels=False, check_ids=True, name=None, **raw
) -> Iterator[RecordSet]:
    """``iter_table``'s batches; ``raw``: how the file is read (``delimiter``, ``sheet``), as ``raw_batches`` takes it."""
    seen = SeenIds() if check_ids else NoIds()
    fmt, path, batches = raw_batches(source, name, size=size, seen=seen, **raw)
    trained = trained or {}
    if fmt == "course":
        yield from _course_sets(batches, columns, need_labels)  # type: ignore[arg-type]
        return
    reader = None
    for raw in batches:
        if reader is None:
            if not raw.rows and raw.bad_rows:
                # nothing readable to choose columns from: the bad rows are the news
                raise RecordsError(bad_rows_message(path, raw.bad_rows, raw.unit))
            reader = _RowReader(describe_table(raw, columns, trained, need_labels, path), path, seen)
        yield reader.records(raw)  # type: ignore[arg-type]
    if reader is not None:
        _warn_minority(path, reader.table)


def _warn_minority(path: Path, table: Mapping) -> None:
    count = table.get("label_sep_minority_count")
    if count:
        sep = table["label_sep"]
        log.warning(
            "%s: %d row(s) hold no %r between labels but another separator, and are read as one label each "
            "(%s); write them with %r, or name the separator with --label-sep",
            path,
            count,
            sep,
            "; ".join(table["label_sep_minority"]),
            sep,
        )


# ------------------------------------------------------------------ the doors


def iter_table(
    source, columns: Columns | None = None, *, strict: bool = True, batch_rows: int = BATCH_ROWS, **reader
) -> Iterator[RecordSet]:
    """A table a batch of about ``batch_rows`` rows at a time, as :class:`RecordSet`\\ s that share one ``table``
    description: memory does not grow with the table's rows for CSV, TSV, JSON Lines, Parquet and the course
    CSV (a JSON array and a workbook are read whole, then handed out in batches). The columns and the label
    separator are chosen from the first batch. Arguments as :func:`read_table` (``reader``: ``trained``,
    ``need_labels``, ``name``, ``delimiter``, ``sheet``); with ``strict`` the first batch holding a bad row raises
    :class:`RecordsError` naming its bad rows (by file and line, or row). ``check_ids=False`` (a second read of a
    table already checked) remembers no ids, so a duplicate is not found, and memory holds nothing a row."""
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    if isinstance(source, RecordSet):  # already read
        yield source
        return
    for batch in _record_sets(source, columns or Columns(), batch_rows, **reader):
        if strict and batch.bad_rows:
            raise RecordsError(bad_rows_message(batch.path, batch.bad_rows, batch.table.get("unit", "line")))
        yield batch


def read_table(
    source,
    columns: Columns | None = None,
    *,
    trained: Mapping | None = None,
    need_labels: bool = False,
    strict: bool = True,
    name: str | None = None,
    delimiter: str | None = None,
    sheet: str | int | None = None,
) -> RecordSet:
    """Read a table of photos, texts and (optionally) labels into a :class:`RecordSet`.

    Args:
        source: a path (CSV with ``,`` ``;`` tab or ``|`` between fields, TSV, JSON Lines, a JSON array,
            Parquet, ``.xlsx``; the course CSV is recognised) or a pandas DataFrame.
        columns: which column is which (:class:`Columns`); anything not named is found.
        trained: the ``table`` of the model's training data: its column names are tried first.
        need_labels: a label column is required (training, evaluation).
        strict: a bad row raises :class:`RecordsError`; otherwise it is kept in ``bad_rows``.
        name: what to call a DataFrame in messages.
        delimiter: the character between a CSV's fields (or ``comma``, ``semicolon``, ``tab``, ``pipe``);
            None: sniffed from the first lines.
        sheet: the sheet of an ``.xlsx`` workbook, by name or index from 0; None: the first.

    Raises:
        RecordsError: unreadable file, missing column, malformed or duplicate row (named by file and line).
        ValueError: a DataFrame without column names, or a source of another type.
    """
    if isinstance(source, RecordSet):  # already read
        return source
    whole = sys.maxsize  # one batch: the label separator is chosen from every row
    batches = list(
        iter_table(source, columns, trained=trained, need_labels=need_labels, strict=False, name=name,
                   delimiter=delimiter, sheet=sheet, batch_rows=whole)
    )  # fmt: skip
    records = [r for b in batches for r in b.records]
    bad = [r for b in batches for r in b.bad_rows]
    first = batches[0]
    if strict and bad:
        raise RecordsError(bad_rows_message(first.path, bad, first.table.get("unit", "line")))
    return RecordSet(first.path, records, bad, labelled=first.labelled, table=first.table)


def require_labels(records: RecordSet, what: str = "this") -> RecordSet:
    """The one check that a table has labels, for every command that needs them (train, evaluate, report)."""
    if not records.labelled:
        raise no_labels_error(records.path, what)
    return records


def table_spelling(table: Mapping, vocab: Sequence[str]) -> dict:
    """What a model keeps of its training table, to read later tables by default and write predictions in the
    same spelling: the column names and the separator its label column is written with."""
    sep = table.get("label_sep")
    if sep is None:  # labels came as lists, or one per field: pick a separator no label contains
        sep = next((s for s in (*LABEL_SEPS, " ") if not any(s in label for label in vocab)), "|")
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
