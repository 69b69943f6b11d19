"""A user's table file as text, and what every table reader says about what it cannot read.

Text: UTF-8 with or without a byte-order mark, whole or line by line, with a file of another kind passed by
mistake (a photo, a zip, a PDF) named rather than misread. :class:`RecordsError` is the one error of every
table reader, its message naming the file, the line (or row) and what to do; a row that cannot be read is a
:class:`BadRow`, and :func:`bad_rows_message` lists a table's bad rows.
"""

from __future__ import annotations

import codecs
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_LISTED_BAD_ROWS", "BadRow", "RecordsError", "SeenIds", "bad_rows_message", "decode_text", "iter_lines"]

# How many bad rows an error message or a summary spells out.
MAX_LISTED_BAD_ROWS = 10


class RecordsError(ValueError):
    """Raised for unreadable input; message names file, line and reason."""


@dataclass(frozen=True)
class BadRow:
    """A logical row that could not be read.

    Attributes:
        path: file the row comes from.
        line: 1-based physical line where the row starts.
        reason: why it was rejected, e.g. ``"unterminated quoted caption"``.
        text: the raw text of the row (all its physical lines, joined by ``"\\n"``).
    """

    path: str
    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{Path(self.path).name}:{self.line}: {self.reason}: {self.text[:80]!r}"


def bad_rows_message(path, bad_rows: Sequence[BadRow], unit: str = "line") -> str:
    """The error for a table's bad rows, the first few listed; ``unit``: what the table counts (CSV lines, or
    rows of a DataFrame or Parquet file)."""
    shown = "\n".join(
        f"  {b}" if unit == "line" else f"  {Path(b.path).name} row {b.line}: {b.reason}: {b.text[:80]!r}"
        for b in bad_rows[:MAX_LISTED_BAD_ROWS]
    )
    more = len(bad_rows) - MAX_LISTED_BAD_ROWS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return (
        f"{path}: {len(bad_rows)} bad row(s):\n{shown}{tail}\n"
        "fix or remove these rows (`fuselabel inspect` lists every one)"
    )


class SeenIds:
    """The ids of a table's rows read so far, each with the line (or row) it was first on, to name a duplicate.

    A slot holds a 64-bit digest of an id and its line in 12 bytes (open addressing, at most two thirds full),
    not the id in a dict (about 100 bytes), so a table read a batch at a time hardly grows with its rows. Two
    different ids of one digest would be taken for a duplicate: about one chance in 40 million for a million rows.
    """

    def __init__(self, slots: int = 1024) -> None:
        self._keys = array("q", [0]) * slots  # 0: an empty slot
        self._lines = array("i", [0]) * slots
        self._used = 0

    @staticmethod
    def _key(row_id: str) -> int:
        return hash(row_id) or 1

    def _slot(self, key: int) -> int:
        keys, mask = self._keys, len(self._keys) - 1
        i = key & mask
        while keys[i] and keys[i] != key:
            i = (i + 1) & mask
        return i

    def line_of(self, row_id: str) -> int | None:
        """The line ``row_id`` was first seen on, None when it was not."""
        i = self._slot(self._key(row_id))
        return self._lines[i] if self._keys[i] else None

    def add(self, row_id: str, line: int) -> None:
        key = self._key(row_id)
        i = self._slot(key)
        if not self._keys[i]:
            self._keys[i], self._lines[i] = key, line
            self._used += 1
            if 3 * self._used > 2 * len(self._keys):
                self._grow()

    def _grow(self) -> None:
        old = zip(self._keys, self._lines)
        size = 2 * len(self._keys)
        self._keys, self._lines = array("q", [0]) * size, array("i", [0]) * size
        for key, line in old:
            if key:
                i = self._slot(key)
                self._keys[i], self._lines[i] = key, line


class NoIds(SeenIds):
    """Remembers no ids: for reading again a table whose ids a first pass has checked (``predict``'s chunks), so
    the second pass holds nothing a row."""

    def __init__(self) -> None:
        pass

    def line_of(self, row_id: str) -> int | None:
        return None

    def add(self, row_id: str, line: int) -> None:
        pass


# File signatures of what is most often passed by mistake where a CSV belongs.
_BINARY_SIGNATURES = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"RIFF": "a RIFF file (WebP?)",
    b"PK\x03\x04": "a zip archive (an .xlsx workbook?)",
    b"%PDF": "a PDF document",
    b"\xd0\xcf\x11\xe0": "an old Office document (.xls?)",
    b"\x1f\x8b": "a gzip archive",
}


def _not_text(kind: str, path: Path) -> RecordsError:
    return RecordsError(
        f"{path}:1: not a CSV text file (it looks like {kind}); pass the table (CSV, TSV, JSON, JSON Lines, "
        "Parquet or .xlsx)"
    )


def _kind(head: bytes) -> str | None:
    return next((what for magic, what in _BINARY_SIGNATURES.items() if head.startswith(magic)), None)


def decode_text(raw: bytes, path: Path) -> str:
    """A table file's text: UTF-8 with or without BOM; a binary file passed by mistake is named."""
    kind = _kind(raw)
    try:
        # utf-8-sig strips a leading BOM and is identical to utf-8 otherwise.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if kind is None and b"\x00" in raw[:4096]:
            kind = "binary data"
        if kind is None:
            line = raw[: exc.start].count(b"\n") + 1
            raise RecordsError(
                f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8"
            ) from exc
    if kind is not None:
        raise _not_text(kind, path)
    return text


def iter_lines(path: Path) -> Iterator[str]:
    """The file's lines, each with its own line end, read a block at a time so memory does not grow with the
    file. Only ``\\n`` ends a line (``\\r`` inside a caption stays text); a leading BOM is dropped."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with f:
        head = f.read(4096)
        kind = _kind(head) or ("binary data" if b"\x00" in head else None)
        if kind is not None:
            raise _not_text(kind, path)
        f.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8-sig")()
        offset = 0
        for number, raw in enumerate(f, start=1):
            try:
                yield decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise RecordsError(
                    f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {offset + exc.start}); save the file as "
                    "UTF-8"
                ) from None
            offset += len(raw)
