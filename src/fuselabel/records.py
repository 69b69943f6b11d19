"""Reading the course CSV exactly: the image/caption/label tables of the COMP5329 data.

The course CSV (``ImageID,Labels,Caption``) is *not* valid CSV: captions are
wrapped in double quotes, but quotes inside a caption are not escaped, and a
few captions contain a raw line break::

    9508.jpg,1,"A cow in street with writing that reads "oh no, not beef on the menu again!""
    6751.jpg,4,"Red motor
    scooter parked on the sand with a sunset in background."

``csv`` and pandas mis-split such rows (or silently merge neighbouring rows),
so :func:`read_records` uses a small line-oriented parser instead:

* a row starts on a physical line ``<id>,<labels>,<caption>`` (``<id>,<caption>``
  for the unlabelled ``ImageID,Caption`` layout);
* a quoted caption runs to the last ``"`` of its logical row; while a physical
  line does not end with ``"`` the caption continues on the next line, joined
  with ``"\\n"``, unless that next line is clearly the start of a new row, in
  which case the open row is reported as an unterminated caption;
* anything that cannot be read is reported as a :class:`BadRow` with its file
  line number. In strict mode (the default) bad rows raise
  :class:`RecordsError`; rows are never silently dropped or merged.

Label vocabularies live in :mod:`fuselabel.labels`, the writers in
:mod:`fuselabel.writers` and the CSV overview in :mod:`fuselabel.inspection`.
It depends only on the standard library and :mod:`fuselabel.textfile`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .textfile import BadRow, RecordsError, SeenIds, bad_rows_message, decode_text

__all__ = [
    "BadRow",
    "LABEL_TOKEN",
    "LABEL_TOKEN_RE",
    "Record",
    "RecordSet",
    "RecordsError",
    "course_row_starts",
    "parse_records",
    "read_records",
]

# The course file's two headers, compared in lower case; the column names as the course spells them.
LABELLED_HEADER, UNLABELLED_HEADER = ("imageid", "labels", "caption"), ("imageid", "caption")
_COLUMN_NAMES = {"imageid": "ImageID", "labels": "Labels", "caption": "Caption"}

# Ids and label fields may not contain a comma or a quote, otherwise the first
# two commas of a line would no longer delimit them unambiguously.
_LABELLED_ROW = re.compile(r'([^,"]*),([^,"]*),(.*)', re.DOTALL)
_UNLABELLED_ROW = re.compile(r'([^,"]*),(.*)', re.DOTALL)
# One label token; shared with the label helpers and the writers so that what
# is written can always be read back.
LABEL_TOKEN = r"[A-Za-z0-9_.\-]+"
_LABELS_FIELD = re.compile(rf"(?:{LABEL_TOKEN}(?: +{LABEL_TOKEN})*)?")
LABEL_TOKEN_RE = re.compile(LABEL_TOKEN)
_WHITESPACE = re.compile(r"\s")
# A caption line like '"a dog",web': a quoted field and then more, comma-separated.
_TEXT_AFTER_QUOTE = re.compile(r'".*",[^"]*')


@dataclass(frozen=True)
class Record:
    """One logical row of an image/caption table.

    Attributes:
        image_id: the ``ImageID`` field, e.g. ``"9508.jpg"``.
        caption: the caption exactly as written, without its enclosing quotes;
            inner quotes and line breaks are kept (line breaks as ``"\\n"``).
        labels: label tokens as strings, in file order, de-duplicated; ``()``
            for an empty Labels field and ``None`` when the file has no
            Labels column.
        line: 1-based physical line of the file where the row starts (the row number in a Parquet
            file or a DataFrame).
        row_id: the row's id, when the table has an id column other than the photo's (None: the photo's
            path is the id, as in the course files).
        split: ``train``, ``val`` or ``test`` from a table's split column; None without one.
    """

    image_id: str
    caption: str
    labels: tuple[str, ...] | None
    line: int
    row_id: str | None = None
    split: str | None = None

    @property
    def id(self) -> str:
        """The id that names the row in outputs: its own id, else its photo's path."""
        return self.row_id if self.row_id is not None else self.image_id


@dataclass
class RecordSet:
    """The parsed content of one table.

    Attributes:
        path: the file that was read.
        records: the good rows, in file order.
        bad_rows: rows that could not be read (always empty after a strict read).
        labelled: whether the file has a Labels column.
        table: what was read (format, column names, label separator), as ``fuselabel.tables`` describes it.
    """

    path: Path
    records: list[Record]
    bad_rows: list[BadRow] = field(default_factory=list)
    labelled: bool = True
    table: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        """ImageIDs of the good rows, in file order."""
        return [r.image_id for r in self.records]

    def row_name(self, record: Record) -> str:
        """How messages name a row: its id and where it is in the file."""
        where = {"course": "CSV line", "csv": "CSV line", "tsv": "TSV line", "jsonl": "line"}.get(
            self.table.get("format", "course"), "row"
        )
        return f"row {record.id} ({where} {record.line} of {Path(self.path).name})"

    @property
    def captions(self) -> list[str]:
        """Captions of the good rows, in file order."""
        return [r.caption for r in self.records]

    @property
    def label_sets(self) -> list[tuple[str, ...]]:
        """Label tuples of the good rows, in file order.

        Raises:
            RecordsError: if the file has no Labels column.
        """
        if not self.labelled:
            raise no_labels_error(self.path)
        return [r.labels for r in self.records]  # type: ignore[misc]


def no_labels_error(path, what: str = "this") -> RecordsError:
    """The one wording of "this table has no labels", for every reader and command that needs them."""
    return RecordsError(
        f"{path}: {what} needs labels, and the table has no Labels column (name its label column "
        "with --label-col; course files have the header ImageID,Labels,Caption)"
    )


# ---------------------------------------------------------------------------
# Reading


def _id_shape(image_id: str) -> tuple[str, bool]:
    """Coarse shape of an id: (lower-case extension, stem is all digits).

    Used to tell whether a line inside an open caption is really the start of
    the next row: ``"12.jpg"`` looks like ``"9508.jpg"``, ``"a"`` does not.
    """
    stem, dot, ext = image_id.rpartition(".")
    if not dot:
        stem, ext = image_id, ""
    return ext.lower(), stem.isdigit()


def _check_header(line: str, path: Path) -> bool:
    """Return True for the labelled layout, False for the unlabelled one."""
    fields = tuple(f.strip().strip('"').strip().lower() for f in line.replace("\ufeff", "").strip().split(","))
    if fields == LABELLED_HEADER:
        return True
    if fields == UNLABELLED_HEADER:
        return False
    problem = ""
    expected = LABELLED_HEADER if "labels" in fields else UNLABELLED_HEADER
    if sorted(fields) == sorted(expected):
        problem = "columns in another order; the caption must come last, as it may hold commas: "
    elif set(fields) > set(expected):
        extra = [name for name, f in zip(line.strip().split(","), fields) if f not in expected]
        problem = f"unexpected column(s) {', '.join(extra)}; remove them: "
    elif set(fields) < set(expected):
        absent = [_COLUMN_NAMES[f] for f in expected if f not in fields]
        problem = f"missing column(s) {', '.join(absent)}: "
    raise RecordsError(
        f"{path}:1: bad header {line.strip()[:80]!r}: {problem}expected 'ImageID,Labels,Caption' or 'ImageID,Caption'"
    )


class _Parser:
    """Line-oriented parser for one file; see the module docstring for the rules."""

    def __init__(self, path: Path, lines: list[str], labelled: bool, first_line: int, ends_file: bool, seen) -> None:
        self.path = path
        self.lines = lines
        self.labelled = labelled
        # lines[1] is physical line first_line; the text may be one block of a file read a block at a time
        self.offset = first_line - 2
        self.ends_file = ends_file
        self.row_re = _LABELLED_ROW if labelled else _UNLABELLED_ROW
        self.expected = "expected ImageID,Labels,Caption" if labelled else "expected ImageID,Caption"
        self.records: list[Record] = []
        self.bad_rows: list[BadRow] = []
        self.seen = SeenIds() if seen is None else seen  # shared by the blocks of one file
        self.shapes: set[tuple[str, bool]] = set()
        self._fallback_shapes: set[tuple[str, bool]] | None = None

    # -- helpers ----------------------------------------------------------

    def _split(self, line: str) -> tuple[str, str | None, str] | None:
        m = self.row_re.fullmatch(line)
        if m is None:
            return None
        if self.labelled:
            return m.group(1), m.group(2), m.group(3)
        return m.group(1), None, m.group(2)

    def _reference_shapes(self) -> set[tuple[str, bool]]:
        if self.shapes:
            return self.shapes
        # No good row yet (the very first row is open): fall back to the most
        # common id shape among all lines that could start a row.
        if self._fallback_shapes is None:
            counts: Counter[tuple[str, bool]] = Counter()
            for line in self.lines[1:]:
                parts = self._split(line)
                if parts and parts[0] and not _WHITESPACE.search(parts[0]):
                    counts[_id_shape(parts[0])] += 1
            self._fallback_shapes = {counts.most_common(1)[0][0]} if counts else set()
        return self._fallback_shapes

    def _starts_new_row(self, line: str) -> bool:
        """Whether a line met inside an open caption is really the next row."""
        parts = self._split(line)
        if parts is None:
            return False
        image_id, labels, _ = parts
        if not image_id or _WHITESPACE.search(image_id):
            return False
        if labels is not None and not _LABELS_FIELD.fullmatch(labels):
            return False
        return _id_shape(image_id) in self._reference_shapes()

    def _bad(self, line_no: int, reason: str, text: str) -> None:
        self.bad_rows.append(BadRow(str(self.path), line_no, reason, text))

    # -- main loop ----------------------------------------------------------

    def run(self) -> None:
        lines = self.lines
        n = len(lines)
        i = 1  # index 0 is the header
        while i < n:
            line = lines[i]
            line_no = i + 1 + self.offset
            i += 1
            if not line.strip():
                continue
            parts = self._split(line)
            if parts is None:
                self._bad(line_no, self.expected, line)
                continue
            image_id, labels_field, caption = parts
            text = line
            if caption.startswith('"'):
                # Collect the physical lines of the quoted caption.
                chunk = [caption]
                closed = self._closes(caption, first=True, next_index=i)
                while not closed and i < n and not self._starts_new_row(lines[i]):
                    chunk.append(lines[i])
                    i += 1
                    closed = self._closes(lines[i - 1], first=False, next_index=i)
                text = "\n".join([line, *chunk[1:]])
                if not closed:
                    self._bad(line_no, self._unterminated(chunk[0], at_end=i >= n and self.ends_file), text)
                    continue
                logical = "\n".join(chunk)
                caption = logical[1 : logical.rstrip(" \t\r").rindex('"')]
            else:
                caption = caption.rstrip("\r")  # a CRLF row in an LF file
            self._add(line_no, image_id, labels_field, caption, text)

    @staticmethod
    def _unterminated(first_line: str, *, at_end: bool) -> str:
        """The reason for a caption that never closes, with the likeliest cause."""
        if _TEXT_AFTER_QUOTE.fullmatch(first_line):
            return "unterminated quoted caption (text follows its closing quote: an extra column?)"
        if at_end:
            return "unterminated quoted caption (the file ends inside it: truncated file?)"
        return "unterminated quoted caption (no closing quote before the next row)"

    def _closes(self, physical: str, *, first: bool, next_index: int) -> bool:
        """Whether a physical line ends its quoted caption (``next_index``: the line after it)."""
        # Trailing blanks after the closing quote are tolerated; blanks before
        # a line break inside the caption are caption text and are kept.
        stripped = physical.rstrip(" \t")
        if not stripped.endswith('"'):
            # In a file of LF line ends a "\r" is caption text, except after the
            # closing quote of a row that ends on this line (a CRLF row among LF ones).
            if not stripped.endswith("\r") or not self._row_ends(next_index):
                return False
            stripped = stripped.rstrip(" \t\r")
            if not stripped.endswith('"'):
                return False
        # On the first line the opening quote itself does not close the caption.
        return not first or len(stripped) >= 2

    def _row_ends(self, index: int) -> bool:
        """Whether line ``index`` cannot continue a caption: end of file, a blank line or the next row."""
        return index >= len(self.lines) or not self.lines[index].strip() or self._starts_new_row(self.lines[index])

    def _add(self, line_no: int, image_id: str, labels_field: str | None, caption: str, text: str) -> None:
        if not image_id.strip():
            self._bad(line_no, "empty ImageID", text)
            return
        if _WHITESPACE.search(image_id):
            self._bad(line_no, f"ImageID {image_id!r} contains whitespace", text)
            return
        labels: tuple[str, ...] | None = None
        if labels_field is not None:
            if not _LABELS_FIELD.fullmatch(labels_field):
                self._bad(
                    line_no, f"malformed labels {labels_field!r} (expected label tokens separated by spaces)", text
                )
                return
            # dict.fromkeys de-duplicates while keeping file order.
            labels = tuple(dict.fromkeys(LABEL_TOKEN_RE.findall(labels_field)))
        first = self.seen.line_of(image_id)
        if first is not None:
            self._bad(line_no, f"duplicate ImageID {image_id}, first at line {first} (keep one of the two rows)", text)
            return
        self.seen.add(image_id, line_no)
        self.shapes.add(_id_shape(image_id))
        self.records.append(Record(image_id, caption, labels, line_no))


def course_row_starts(header: str, sample: Sequence[str]) -> Callable[[str], bool]:
    """Whether a line (without its line end) starts a row, by the rule the parser follows inside an open caption,
    with the id shapes of ``sample``: where a course file read a block at a time may be cut."""
    labelled = _check_header(header, Path("<header>"))
    return _Parser(Path("<sample>"), [header, *sample], labelled, 2, False, None)._starts_new_row


def read_records(path: str | os.PathLike[str], *, strict: bool = True) -> RecordSet:
    """Read an ``ImageID,Labels,Caption`` or ``ImageID,Caption`` table.

    Handles the quirks of the course files (unescaped inner quotes, captions
    with line breaks), UTF-8 with or without BOM, and CRLF line endings.
    Blank lines outside captions are ignored.

    Args:
        path: the CSV file.
        strict: if True (default), any bad row raises :class:`RecordsError`;
            if False, bad rows are collected in ``RecordSet.bad_rows`` and the
            good rows are returned.

    Returns:
        A :class:`RecordSet` with the rows in file order.

    Raises:
        RecordsError: the file is missing/unreadable, is not UTF-8, has an
            unexpected header, or (strict mode) contains bad rows. The message
            names the file, the line and the reason.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_records(decode_text(raw, path), path, strict=strict)


def parse_records(
    text: str,
    path: str | os.PathLike[str] = "<text>",
    *,
    strict: bool = True,
    first_line: int = 2,
    seen: SeenIds | None = None,
    ends_file: bool = True,
) -> RecordSet:
    """:func:`read_records` on text already in memory (``path`` only names it in messages).

    ``text`` may be the header and one block of a file's rows: ``first_line`` is the line its first row is on, and
    ``ends_file`` False says the file goes on (a caption left open is then not blamed on a truncated file);
    ``seen`` carries the ids of earlier blocks, to name a duplicate of one."""
    path = Path(path)
    # The header's line end decides: in a CRLF file every CRLF is a line break
    # (one inside a caption is read as "\n"); in an LF file a "\r" is text.
    # Only these are line breaks: str.splitlines() would also split on
    # characters such as \x1c or \u2028 that may legitimately occur inside captions.
    if text.split("\n", 1)[0].endswith("\r"):
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if not lines[0].strip():
        raise RecordsError(
            f"{path}:1: empty file or blank header: expected 'ImageID,Labels,Caption' or 'ImageID,Caption'"
        )
    labelled = _check_header(lines[0], path)
    parser = _Parser(path, lines, labelled, first_line, ends_file, seen)
    parser.run()
    if strict and parser.bad_rows:
        raise RecordsError(bad_rows_message(path, parser.bad_rows))
    return RecordSet(path=path, records=parser.records, bad_rows=parser.bad_rows, labelled=labelled)


# ---------------------------------------------------------------------------
# Finding the files


def resolve_data(data: str | None, csv: str | None, default_csv: str = "train.csv") -> tuple[Path, Path]:
    """(image folder, CSV). ``data`` is the image folder, or a data-set folder holding ``data/`` and the CSV."""
    if not data:
        raise ValueError(
            "no data folder given; pass --data IMAGE_DIR (a folder of images, or one holding data/ and the CSV)"
        )
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"data folder {root} not found; pass --data IMAGE_DIR --csv FILE")
    images = root / "data" if (root / "data").is_dir() else root
    csv_path = Path(csv) if csv else root / default_csv
    if not csv_path.exists():
        raise ValueError(f"CSV {csv_path} not found; pass --csv FILE")
    return images, csv_path
