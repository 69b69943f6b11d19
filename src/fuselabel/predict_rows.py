"""A table's rows for ``predict``, streamed: one pass that checks, counts and hashes them without keeping any, then
the rows again in chunks, in table order. So prediction holds one batch of the reader and one chunk at a time,
however many rows the table has.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .records import RecordSet
from .tables import Columns, iter_table
from .textfile import RecordsError, bad_rows_message

# How many leading rows :func:`first_rows` reads: what ``tables.image_root`` looks at to find where photo paths start.
SAMPLE_ROWS = 50


@dataclass
class TableScan:
    """What the checking pass over a table found.

    Attributes:
        path: the file read.
        table: the table's description (format, columns), as ``fuselabel.tables`` gives it.
        rows: how many rows the table has.
        digest: a hash of every row's photo and text, in order: the same rows give the same digest.
    """

    path: Path
    table: dict
    rows: int
    digest: str


def _nothing_read(source) -> RecordsError:
    return RecordsError(f"{source}: nothing could be read from this table")


def first_rows(source, columns: Columns | None = None, **reader) -> RecordSet:
    """The table's first rows (at most ``SAMPLE_ROWS``), read alone; bad rows are kept aside, not raised."""
    batches = iter_table(source, columns, strict=False, batch_rows=SAMPLE_ROWS, **reader)
    with closing(batches):
        first = next(batches, None)
    if first is None:  # the readers give at least one batch, even of no rows
        raise _nothing_read(source)
    return first


def scan_table(source, columns: Columns | None = None, **reader) -> TableScan:
    """Read a table once, keeping no rows: its bad rows raise :class:`RecordsError` naming each by its line (or
    row), as a whole read does, before anything is predicted. ``reader``: ``iter_table``'s keywords."""
    digest, rows, bad, batch = hashlib.sha256(), 0, [], None
    for batch in iter_table(source, columns, strict=False, **reader):
        bad.extend(batch.bad_rows)
        for r in batch.records:
            digest.update(json.dumps([r.image_id, r.caption]).encode())
        rows += len(batch.records)
    if batch is None:
        raise _nothing_read(source)
    if bad:
        raise RecordsError(bad_rows_message(batch.path, bad, batch.table.get("unit", "line")))
    return TableScan(batch.path, batch.table, rows, digest.hexdigest())


def iter_chunks(source, chunk_size: int, columns: Columns | None = None, **reader) -> Iterator[RecordSet]:
    """The table's rows in chunks of ``chunk_size`` (the last one shorter), in order; a table :func:`scan_table`
    has accepted, so bad rows are not looked at again, nor ids remembered to find duplicates."""
    pending: list = []
    batch = None
    for batch in iter_table(source, columns, strict=False, check_ids=False, **reader):
        pending.extend(batch.records)
        while len(pending) >= chunk_size:
            yield RecordSet(batch.path, pending[:chunk_size], labelled=batch.labelled, table=batch.table)
            del pending[:chunk_size]
    if pending and batch is not None:
        yield RecordSet(batch.path, pending, labelled=batch.labelled, table=batch.table)


class ChunkCursor:
    """Chunks by number for a process handed increasing numbers (a rank's share): the table is read forward once,
    and only a number behind the last one (a repeat) starts the reading again."""

    def __init__(self, source, chunk_size: int, columns: Columns | None = None, **reader) -> None:
        self.open = lambda: enumerate(iter_chunks(source, chunk_size, columns, **reader))
        self.chunks, self.at = self.open(), -1

    def read(self) -> Iterator[RecordSet]:
        """Every chunk, in order, read once (for a process that predicts them all)."""
        return (chunk for _, chunk in self.open())

    def get(self, index: int) -> RecordSet:
        if index <= self.at:
            self.chunks, self.at = self.open(), -1
        for at, chunk in self.chunks:
            self.at = at
            if at == index:
                return chunk
        raise IndexError(f"chunk {index} is past the table's end (was the table changed while predicting?)")
