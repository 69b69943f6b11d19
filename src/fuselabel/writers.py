"""Writing tables atomically: submissions, probabilities, labelled course CSVs and row subsets of one.

Every writer goes through :func:`atomic_write_text`, so a failure at any point
leaves an existing file as it was: nothing already written is lost.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .labels import vocab_index
from .records import LABEL_TOKEN_RE, Record, RecordSet, parse_records

__all__ = [
    "atomic_path",
    "remove_abandoned",
    "temporary_beside",
    "fsync_dir",
    "file_lock",
    "LockHeld",
    "atomic_write_text",
    "write_atomic",
    "ordinary_permissions",
    "reached",
    "output_format",
    "table_prediction_lines",
    "table_probability_lines",
    "write_table_lines",
    "write_labelled_csv",
    "write_probabilities",
    "write_rows",
    "write_submission",
]


def reached(stage: str) -> None:
    """A named point of a long write or run where a kill must leave everything usable (``bundle-swap``,
    ``cache-chunk-write``, ``predict-publish``, ``train-batch``, ...). It does nothing: the robustness tests
    put their own function here (``tests/pausing.py``) to stop a process at such a point and kill it."""


def _check_id(image_id: str) -> None:
    if not isinstance(image_id, str) or not image_id or any(c in image_id for c in ',"\r\n'):
        raise ValueError(f'cannot write ImageID {image_id!r}: must be a non-empty string without , " or line breaks')


def temporary_beside(path: str | os.PathLike[str]) -> Path:
    """The one name of every temporary file or folder: ``.NAME.<random>.tmp`` beside ``path``, on its file system
    (so a rename puts it in place at once) and hidden. :func:`remove_abandoned` knows it by this name."""
    path = Path(path)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}"


TEMPORARY_SUFFIX = ".tmp"


def _writer_lock(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The one way anything is written in place of something: a temporary path beside ``path`` (nothing there
    yet); whatever the block writes there, a file or a folder, is synced and renamed onto ``path`` when the
    block succeeds, and removed when it fails.

    Beside the target, so the rename stays on one file system: readers see either the old thing or the
    complete new one, and an error at any point leaves the old one untouched. A file gets the permissions of
    the file it replaces, or ordinary ones (:func:`ordinary_permissions`), never a temporary's 0600. The
    temporary's lock is held while it exists, so :func:`remove_abandoned` removes it only once its writer died.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    lock = _writer_lock(tmp)
    with file_lock(lock):
        try:
            yield tmp
            if tmp.is_file():
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                try:
                    os.chmod(tmp, path.stat().st_mode & 0o7777)
                except FileNotFoundError:
                    ordinary_permissions(tmp)
            os.replace(tmp, path)
            fsync_dir(directory)
        finally:
            _remove(tmp)
            lock.unlink(missing_ok=True)  # while held: a cleaner that waited on it finds nothing to do


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def remove_abandoned(folder: str | os.PathLike[str]) -> None:
    """The temporaries :func:`atomic_path` left in ``folder`` when its writer died: their lock is free. A live
    writer's are left alone, whatever their age. (Only for folders whose temporaries all come from it.)"""
    folder = Path(folder)
    found = [*folder.glob(f".*{TEMPORARY_SUFFIX}"), *folder.glob(f".*{TEMPORARY_SUFFIX}.lock")]
    for tmp in {folder / p.name.removesuffix(".lock") for p in found}:
        lock = _writer_lock(tmp)
        try:
            with file_lock(lock, wait=False):
                _remove(tmp)
                lock.unlink(missing_ok=True)
        except LockHeld:
            pass


class LockHeld(OSError):
    """Another process holds the lock at ``filename`` (asked for with ``wait=False``)."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, wait: bool = True) -> Iterator[Path]:
    """The one lock between processes: ``filelock.FileLock`` on ``path`` (created if absent; ``flock`` on POSIX,
    ``LockFileEx`` on Windows), held while the block runs. The system drops it when its process dies, whatever
    the clocks or host names say, so a killed holder never leaves it taken.

    ``wait=False``: :class:`LockHeld` at once when another process holds it. A process that takes a lock it
    already holds through this function waits for itself: callers that nest keep count (``outputs``).
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        raise LockHeld(errno.EAGAIN, "held by another process", str(path)) from None
    try:
        yield path
    finally:
        lock.release()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a file, or a folder's entries after a rename, to disk (where the system allows opening it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ordinary_permissions(path: str | os.PathLike[str]) -> None:
    """Give a file, or a folder and everything in it, the permissions any file the user writes gets (0666 and
    0777 less the umask), not the 0600/0700 of temporaries: others in the group can read a model or a report."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], lines: Iterable[str]) -> None:
    """Write ``lines`` to ``path`` atomically (:func:`atomic_path`), as UTF-8 with the line ends given."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        for line in lines:
            fh.write(line)


def write_rows(records: RecordSet, indices: Iterable[int], out: str | os.PathLike[str]) -> int:
    """Copy the header and the chosen rows of ``records`` from its file into ``out``, byte for byte.

    ``indices`` are positions in ``records.records``; rows are written in file order, each with
    every physical line it spans (captions with line breaks, CRLF endings and a BOM are kept).
    Lines are split on ``\\n`` exactly as :func:`read_records` counts them. Returns the rows written.
    """
    # Decoded only to reuse the atomic writer: UTF-8 round-trips byte for byte, BOM included.
    lines = Path(records.path).read_bytes().decode("utf-8").split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    starts = [r.line for r in records.records] + [len(lines) + 1]
    chosen = sorted(set(indices))

    def rows() -> Iterator[str]:
        yield lines[0]
        for i in chosen:
            yield from lines[starts[i] - 1 : starts[i + 1] - 1]

    atomic_write_text(out, rows())
    return len(chosen)


def write_labelled_csv(path: str | os.PathLike[str], rows: Iterable) -> int:
    """Write ``ImageID,Labels,Caption`` rows in the course format; returns the rows written.

    ``rows`` holds :class:`~fuselabel.records.Record` objects or ``(image_id, labels, caption)``
    tuples. Captions are quoted and written as they are (inner quotes unescaped, line breaks kept),
    so :func:`~fuselabel.records.read_records` reads back exactly what was given. The course format
    cannot hold every caption: one with a line that ends in a double quote before a line break, or
    with a line that reads like the start of a row, would read back differently. So the text is read
    back in memory first, and such a row raises ValueError naming it; nothing is written then.
    The write is atomic, like :func:`write_submission`.
    """
    lines = ["ImageID,Labels,Caption\n"]
    wanted = []
    for row in rows:
        image_id, labels, caption = (row.image_id, row.labels, row.caption) if isinstance(row, Record) else row
        _check_id(image_id)
        labels = tuple(dict.fromkeys(labels or ()))
        for label in labels:
            if not isinstance(label, str) or not LABEL_TOKEN_RE.fullmatch(label):
                raise ValueError(f"cannot write label {label!r} for {image_id}: expected a token of [A-Za-z0-9_.-]")
        if not isinstance(caption, str):
            raise ValueError(f"cannot write caption {caption!r} for {image_id}: expected a string")
        lines.append(f'{image_id},{" ".join(labels)},"{caption}"\n')
        wanted.append(Record(image_id, caption, labels, 0))
    back = parse_records("".join(lines), path, strict=False)
    got = [(r.image_id, r.caption, r.labels) for r in back.records]
    for k, want in enumerate(wanted):
        if k >= len(got) or got[k] != (want.image_id, want.caption, want.labels):
            why = f" ({back.bad_rows[0].reason})" if back.bad_rows else ""
            raise ValueError(
                f"cannot write row {k + 1} (ImageID {want.image_id}) so that it reads back as given{why}: "
                f"caption {want.caption[:80]!r}; the course format cannot hold a caption line that "
                "ends in a double quote or reads like the start of a row"
            )
    atomic_write_text(path, iter(lines))
    return len(wanted)


def submission_lines(image_ids: Sequence[str], label_sets: Iterable[Iterable[str]]) -> Iterator[str]:
    """Lines of a Kaggle-style ``ImageID,Labels`` file; ``label_sets`` may be a stream (one per id, in order)."""
    yield "ImageID,Labels\n"
    count = 0
    for image_id, labels in zip(image_ids, label_sets):
        count += 1
        _check_id(image_id)
        labels = list(labels)
        for label in labels:
            if not isinstance(label, str) or not LABEL_TOKEN_RE.fullmatch(label):
                raise ValueError(f"cannot write label {label!r} for {image_id}: expected a token of [A-Za-z0-9_.-]")
        yield f"{image_id},{' '.join(labels)}\n"
    if count != len(image_ids):
        raise ValueError(f"{len(image_ids)} image ids but {count} label sets")


def write_submission(
    path: str | os.PathLike[str], image_ids: Sequence[str], label_sets: Sequence[Iterable[str]]
) -> None:
    """Write a Kaggle-style ``ImageID,Labels`` file, labels space-separated.

    Rows are written in the given order. The write is atomic: on any failure
    an existing file at ``path`` is left as it was and no partial file remains.

    Raises:
        ValueError: lengths differ, or an id/label cannot be written unambiguously.
    """
    if len(image_ids) != len(label_sets):
        raise ValueError(f"{len(image_ids)} image ids but {len(label_sets)} label sets")
    atomic_write_text(path, submission_lines(image_ids, label_sets))


def _check_columns(vocab: Sequence[str]) -> None:
    vocab_index(vocab)
    for label in vocab:
        if not isinstance(label, str) or not LABEL_TOKEN_RE.fullmatch(label):
            raise ValueError(f"cannot write label {label!r} as a column name")


def probability_lines(image_ids: Sequence[str], vocab: Sequence[str], rows: Iterable) -> Iterator[str]:
    """Lines of ``ImageID,<label1>,...,input``: 6 decimals, and which inputs each row was predicted from.

    ``rows`` streams ``(probabilities, status)`` pairs; a row predicted from nothing (NaN) has
    empty probability cells.
    """
    _check_columns(vocab)
    yield "ImageID," + ",".join(vocab) + ",input\n"
    for image_id, (row, status) in zip(image_ids, rows):
        _check_id(image_id)
        cells = ["" if p != p else f"{p:.6f}" for p in np.asarray(row, dtype=np.float64).tolist()]
        yield image_id + "," + ",".join(cells) + f",{status}\n"


def write_probabilities(
    path: str | os.PathLike[str],
    image_ids: Sequence[str],
    vocab: Sequence[str],
    probs: np.ndarray | Sequence[Sequence[float]],
) -> None:
    """Write per-label probabilities: header ``ImageID,<label1>,<label2>,...``, 6 decimals.

    Atomic like :func:`write_submission`.

    Raises:
        ValueError: ``probs`` is not ``(len(image_ids), len(vocab))`` or has
            non-finite values, or an id/label cannot be written.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(image_ids), len(vocab)):
        raise ValueError(f"probs has shape {probs.shape}, expected {(len(image_ids), len(vocab))}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    _check_columns(vocab)

    def lines() -> Iterator[str]:
        yield "ImageID," + ",".join(vocab) + "\n"
        for image_id, row in zip(image_ids, probs):
            _check_id(image_id)
            yield image_id + "," + ",".join(f"{p:.6f}" for p in row.tolist()) + "\n"

    atomic_write_text(path, lines())


# --------------------------------------------------------------------------- users' own tables

OUTPUT_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def output_format(path: str | os.PathLike[str]) -> str:
    """The format an output file's name asks for: csv (the default), tsv, jsonl or parquet."""
    return OUTPUT_FORMATS.get(Path(path).suffix.lower(), "csv")


def _delimited(rows: Iterable[Sequence[str]], delimiter: str) -> Iterator[str]:
    """RFC 4180 lines: a field holding the delimiter, a quote or a line break is quoted, its quotes doubled."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    for row in rows:
        writer.writerow(row)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


def _join_labels(labels: Sequence[str], sep: str, row_id: str) -> str:
    clash = [label for label in labels if sep in label or (sep == " " and any(c.isspace() for c in label))]
    if clash:
        raise ValueError(
            f"cannot write label {clash[0]!r} for {row_id}: it holds the separator {sep!r}; "
            "write the predictions as JSON Lines or Parquet (--out FILE.jsonl), which keep lists"
        )
    return sep.join(labels)


def table_prediction_lines(
    fmt: str, ids: Sequence[str], label_sets: Iterable[Sequence[str]], *, id_col: str, label_col: str, label_sep: str
) -> Iterator[str]:
    """Lines of a predictions table in the user's spelling: the id column and the label column, labels joined
    by the training separator (CSV, TSV) or as a list (JSON Lines)."""
    if fmt in ("jsonl", "parquet"):  # a Parquet file is written from the JSON lines
        for row_id, labels in zip(ids, label_sets):
            yield json.dumps({id_col: row_id, label_col: list(labels)}, ensure_ascii=False) + "\n"
        return
    rows = ((row_id, _join_labels(list(labels), label_sep, row_id)) for row_id, labels in zip(ids, label_sets))
    yield from _delimited(itertools.chain([(id_col, label_col)], rows), "\t" if fmt == "tsv" else ",")


def table_probability_lines(
    fmt: str, ids: Sequence[str], vocab: Sequence[str], rows: Iterable, *, id_col: str
) -> Iterator[str]:
    """Per-label probabilities (6 decimals; empty for a row predicted from nothing) and each row's inputs."""
    vocab_index(vocab)
    if id_col in vocab or "input" in vocab:
        raise ValueError(
            f"a label is called {id_col!r} or 'input', like another column of the probabilities "
            "file; name the id column otherwise with --id-col"
        )

    def cells(row):
        return [None if p != p else round(p, 6) for p in np.asarray(row, dtype=np.float64).tolist()]

    if fmt in ("jsonl", "parquet"):  # a Parquet file is written from the JSON lines
        for row_id, (row, status) in zip(ids, rows):
            yield (
                json.dumps({id_col: row_id, **dict(zip(vocab, cells(row))), "input": status}, ensure_ascii=False) + "\n"
            )
        return
    body = (
        (row_id, *("" if p is None else f"{p:.6f}" for p in cells(row)), status)
        for row_id, (row, status) in zip(ids, rows)
    )
    yield from _delimited(itertools.chain([(id_col, *vocab, "input")], body), "\t" if fmt == "tsv" else ",")


def write_table_lines(path: str | os.PathLike[str], fmt: str, lines: Iterator[str]) -> None:
    """Write lines made by the table writers, atomically; Parquet is built from the JSON Lines form."""
    if fmt != "parquet":
        atomic_write_text(path, lines)
        return
    import pandas as pd

    frame = pd.DataFrame([json.loads(line) for line in lines])
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
