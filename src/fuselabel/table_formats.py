"""Which format a table file is, how its fields are delimited, and its rows as cells, a bounded batch at a time.

Formats: CSV (RFC 4180) with ``,`` ``;`` tab or ``|`` between fields (sniffed from the first lines, or given),
JSON Lines, a JSON array of objects, Parquet, the first sheet of an ``.xlsx`` workbook (or a named one), pandas
DataFrames, and the course CSV (quotes inside captions left unescaped), which :mod:`fuselabel.records` parses.
CSV, TSV, JSON Lines, Parquet and the course CSV are read in batches of rows, so memory does not grow with the
file; a JSON array and a workbook are read whole (their formats are not made to be read in parts).

Every batch of the general formats is a :class:`RawBatch`: column names and rows of cells, each row with the line
(text formats) or row (the others) it came from. Choosing the columns is :mod:`fuselabel.tables`' job.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import BadRow, RecordSet, course_row_starts, parse_records
from .textfile import RecordsError, SeenIds, iter_lines

__all__ = [
    "DELIMITERS",
    "FORMATS",
    "RawBatch",
    "course_batches",
    "delimiter_of",
    "is_list",
    "raw_batches",
    "table_format",
]

FORMATS = ("course", "csv", "tsv", "jsonl", "json", "parquet", "xlsx", "dataframe")
DELIMITERS = (",", ";", "\t", "|")
_DELIMITER_WORDS = {"comma": ",", "semicolon": ";", "tab": "\t", "\\t": "\t", "pipe": "|"}
_COURSE_HEADERS = (("imageid", "labels", "caption"), ("imageid", "caption"))
_PARQUET_MAGIC = b"PAR1"
_ZIP_MAGIC = b"PK\x03\x04"
# How many bytes of a file decide its field delimiter.
_SNIFF_BYTES = 65536


@dataclass
class RawBatch:
    """Rows of a table before its columns are chosen: the column names and each row's cells by column, with
    where each row came from, and the rows that could not be read."""

    format: str
    columns: list[str]
    rows: list[Mapping[str, Any]]
    where: list[int]  # line (text formats) or row number (Parquet, JSON array, workbook, DataFrame), 1-based
    unit: str  # "line" or "row"
    bad_rows: list[BadRow] = field(default_factory=list)
    delimiter: str | None = None


def is_list(value) -> bool:
    """Whether a cell holds a list (JSON, Parquet, a DataFrame), not one field."""
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray"


def table_format(path: str | os.PathLike[str]) -> str:
    """The format a file's name and first bytes say: jsonl, json, parquet, xlsx, tsv or csv (course or standard:
    see :func:`raw_batches`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES if suffix == ".json" else 4)
    except OSError:
        head = b""
    if head[:4] == _PARQUET_MAGIC or suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".xlsx", ".xlsm") or (head[:4] == _ZIP_MAGIC and suffix not in (".csv", ".tsv", ".txt")):
        return "xlsx"
    if suffix == ".json":
        return "json" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[") else "jsonl"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    return "csv"


def delimiter_of(given: str | None) -> str | None:
    """A ``delimiter=`` setting as the character: the character itself or its name (``semicolon``, ``tab``...)."""
    if given is None or given == "":
        return None
    value = _DELIMITER_WORDS.get(given.strip().lower(), given)
    if len(value) != 1 or value in '"\r\n':
        raise RecordsError(
            f"delimiter {given!r}: expected one character, such as ',', ';', '|' or tab (or comma, semicolon, "
            "pipe, tab)"
        )
    return value


def _sniff(sample: str) -> str:
    """The delimiter of a CSV from its first lines: of ``,`` ``;`` tab ``|``, the one that splits the header into
    the most columns, the rows most often into as many (a delimiter inside quoted text does not count)."""
    lines = sample.split("\n")
    if len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut short
    best, best_score = ",", (0.0, 1)
    for delimiter in DELIMITERS:
        try:
            rows = [r for r in csv.reader(io.StringIO("\n".join(lines[:100])), delimiter=delimiter) if r]
        except csv.Error:
            continue
        width = len(rows[0]) if rows else 0
        if width < 2:
            continue
        score = (sum(len(r) == width for r in rows) / len(rows), width)
        if score > best_score:
            best, best_score = delimiter, score
    return best


def _sample(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(_SNIFF_BYTES).decode("utf-8-sig", errors="replace")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _is_course(path: Path, header: str) -> bool:
    """Whether a comma-separated file is the course dialect: its header, and not readable as RFC 4180 (read
    through once, a line at a time)."""
    fields = tuple(f.strip().strip('"').strip().lower() for f in header.strip().split(","))
    if fields not in _COURSE_HEADERS:
        return False
    try:
        for cells in csv.reader(iter_lines(path), strict=True):
            if cells and len(cells) != len(fields) and any(c.strip() for c in cells):
                return True
    except csv.Error:
        return True
    # Valid RFC 4180 too: read it as such, so a caption written with "" escapes gets its quote back. A course
    # file whose captions hold no quotes reads the same either way.
    return False


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


def _delimited_batches(path: Path, delimiter: str, fmt: str, size: int) -> Iterator[RawBatch]:
    """RFC 4180: quoted fields, ``""`` for a quote inside one, line breaks inside quotes. Strict: a malformed
    field is an error naming its line, never a silently different value."""
    reader = csv.reader(iter_lines(path), delimiter=delimiter, strict=True)
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
    batch = RawBatch(fmt, columns, [], [], "line", delimiter=delimiter)
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
            reason = f"{len(cells)} fields where the header has {len(columns)}"
            batch.bad_rows.append(BadRow(str(path), line, reason, delimiter.join(cells)[:200]))
            continue
        batch.rows.append(dict(zip(columns, cells)))
        batch.where.append(line)
        if len(batch.rows) >= size:
            yield batch
            batch = RawBatch(fmt, columns, [], [], "line", delimiter=delimiter)
    yield batch


def _object_row(row, where: int, text: str, path: Path, batch: RawBatch, what: str) -> None:
    if isinstance(row, dict):
        batch.rows.append(row)
        batch.where.append(where)
        for key in row:
            if key not in batch.columns:
                batch.columns.append(key)
    else:
        reason = f"expected a JSON object per {what}, got {type(row).__name__}"
        batch.bad_rows.append(BadRow(str(path), where, reason, text[:200]))


def _jsonl_batches(path: Path, size: int) -> Iterator[RawBatch]:
    # Columns are the keys met so far: a key that first appears in a later batch joins them there.
    columns: list[str] = []
    batch, seen = RawBatch("jsonl", columns, [], [], "line"), False
    for number, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            continue
        seen = True
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            reason = f"not valid JSON ({err.msg} at column {err.colno})"
            batch.bad_rows.append(BadRow(str(path), number, reason, line.rstrip("\r\n")[:200]))
            continue
        _object_row(row, number, line.rstrip("\r\n"), path, batch, "line")
        if len(batch.rows) >= size:
            yield batch
            batch = RawBatch("jsonl", columns, [], [], "line")
    if not seen:
        raise RecordsError(f"{path}: no rows: expected one JSON object per line")
    yield batch


def _json_array_batches(path: Path, size: int) -> Iterator[RawBatch]:
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RecordsError(f"{path}: not valid UTF-8 ({exc.reason}); save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise RecordsError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(items, list) or not items:
        raise RecordsError(f"{path}: expected a JSON array of objects, one a row ([{{...}}, {{...}}])")
    columns: list[str] = []
    for start in range(0, len(items), size):
        batch = RawBatch("json", columns, [], [], "row")
        for number, row in enumerate(items[start : start + size], start=start + 1):
            _object_row(row, number, json.dumps(row, ensure_ascii=False, default=str), path, batch, "array item")
        yield batch


def _frame_batches(df, name: str, fmt: str, size: int, first_row: int = 1) -> Iterator[RawBatch]:
    columns = list(df.columns)
    if not all(isinstance(c, str) for c in columns):
        raise ValueError(
            f"{name}: the table's columns have no names ({columns[:5]}); give them names "
            "(df.columns = [...]) and say which is which with image_col=, text_col=, label_col="
        )
    _check_column_names(columns, Path(name))
    for start in range(0, max(len(df), 1), size):
        rows = df.iloc[start : start + size].to_dict(orient="records")
        yield RawBatch(fmt, columns, rows, list(range(start + first_row, start + first_row + len(rows))), "row")


def _parquet_batches(path: Path, size: int) -> Iterator[RawBatch]:
    import pyarrow.parquet as pq

    try:
        # pyarrow raises its own types for every kind of broken file
        reader = pq.ParquetFile(path)
        columns = list(reader.schema_arrow.names)
        _check_column_names(columns, path)
        row = 1
        for part in reader.iter_batches(batch_size=size):
            rows = part.to_pylist()
            yield RawBatch("parquet", columns, rows, list(range(row, row + len(rows))), "row")
            row += len(rows)
        if row == 1:  # no rows: still one (empty) batch, as every format gives
            yield RawBatch("parquet", columns, [], [], "row")
    except (RecordsError, GeneratorExit):
        raise
    except Exception as err:
        raise RecordsError(f"{path}: cannot read as Parquet ({type(err).__name__}: {err})") from None


def _xlsx_batches(path: Path, sheet: str | int | None, size: int) -> Iterator[RawBatch]:
    import pandas as pd

    try:
        book = pd.ExcelFile(path, engine="openpyxl")
    except Exception as err:  # openpyxl and zipfile raise their own types for a broken workbook
        raise RecordsError(f"{path}: cannot read as an .xlsx workbook ({type(err).__name__}: {err})") from None
    with book:
        names = book.sheet_names
        chosen: str | int = 0
        if sheet is not None and str(sheet) in names:
            chosen = str(sheet)
        elif sheet is not None:
            index = int(sheet) if str(sheet).strip().lstrip("-").isdigit() else None
            if index is None or not -len(names) <= index < len(names):
                raise RecordsError(
                    f"{path}: no sheet {sheet!r}; the workbook's sheets are {', '.join(map(repr, names))} "
                    "(name one, or give its index from 0)"
                )
            chosen = index
        df = pd.read_excel(book, sheet_name=chosen, dtype=object)
    # A spreadsheet numbers its rows from the header's 1: the first row of data is row 2.
    yield from _frame_batches(df, str(path), "xlsx", size, first_row=2)


def course_batches(path: Path, size: int, seen: SeenIds | None = None) -> Iterator[RecordSet]:
    """A course-dialect file as record sets of about ``size`` rows, cut only where a row starts (by the
    parser's own rule), each parsed by :func:`fuselabel.records.parse_records` with its true line numbers, a
    duplicate of a row in an earlier batch named as one within a batch."""
    lines = iter_lines(path)
    header = next(lines, "")
    crlf = header.endswith("\r\n")

    def bare(line: str) -> str:
        return line[:-2] if crlf and line.endswith("\r\n") else line.rstrip("\n")

    block: list[str] = []
    first_line, starts, seen = 2, None, SeenIds() if seen is None else seen
    for line in itertools.chain(lines, [None]):
        if line is not None and len(block) < size:
            block.append(line)
            continue
        if line is not None:
            starts = starts or course_row_starts(bare(header), [bare(b) for b in block])
            if not starts(bare(line)):
                block.append(line)
                continue
        body = "".join(block)
        if line is not None:  # the block's last line end is not the file's: nothing follows it in this block
            body = body.removesuffix("\n")
            body = body.removesuffix("\r") if crlf else body
        yield parse_records(header + body, path, strict=False, first_line=first_line, ends_file=line is None, seen=seen)
        first_line += len(block)
        block = [] if line is None else [line]
        if line is None:
            break


def raw_batches(
    source,
    name: str | None,
    *,
    size: int,
    seen: SeenIds | None = None,
    delimiter: str | None = None,
    sheet: str | int | None = None,
) -> tuple[str, Path, Iterator[RawBatch] | Iterator[RecordSet]]:
    """(format, path, batches): :class:`RawBatch` es for the general formats, record sets for the course CSV."""
    # A DataFrame can only come from a pandas that is loaded already: reading a file does not import pandas
    # (over half a second at start-up) unless the file needs it.
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(source, pd.DataFrame):
        label = name or "DataFrame"
        return "dataframe", Path(label), _frame_batches(source, label, "dataframe", size)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"expected a table's path or a pandas DataFrame, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        raise RecordsError(f"{path}: a folder, not a table; pass the CSV, TSV, JSON, Parquet or .xlsx file")
    if not path.exists():
        raise RecordsError(f"{path}: cannot read: No such file or directory")
    fmt = table_format(path)
    if fmt == "parquet":
        return fmt, path, _parquet_batches(path, size)
    if fmt == "xlsx":
        return fmt, path, _xlsx_batches(path, sheet, size)
    if fmt == "json":
        return fmt, path, _json_array_batches(path, size)
    if fmt == "jsonl":
        return fmt, path, _jsonl_batches(path, size)
    sample = _sample(path)
    chosen = delimiter_of(delimiter) or ("\t" if fmt == "tsv" else _sniff(sample))
    fmt = "tsv" if chosen == "\t" else "csv"
    if chosen == "," and _is_course(path, sample.split("\n", 1)[0]):
        return "course", path, course_batches(path, size, seen)
    return fmt, path, _delimited_batches(path, chosen, fmt, size)
