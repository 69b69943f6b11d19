"""Writing tables atomically: submissions, probabilities, labelled course CSVs and row subsets of one.

Every writer goes through :func:`atomic_write_text`, so a failure at any point
leaves an existing file as it was: nothing already written is lost.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .labels import vocab_index
from .records import LABEL_TOKEN_RE, Record, RecordSet, parse_records

__all__ = [
    "atomic_write_text",
    "write_labelled_csv",
    "write_probabilities",
    "write_rows",
    "write_submission",
]


def _check_id(image_id: str) -> None:
    if not isinstance(image_id, str) or not image_id or any(c in image_id for c in ',"\r\n'):
        raise ValueError(f"cannot write ImageID {image_id!r}: must be a non-empty string without , \" or line breaks")


def atomic_write_text(path: str | os.PathLike[str], lines: Iterator[str]) -> None:
    """Write ``lines`` to ``path`` via a temp file in the same directory + os.replace.

    The temp file lives beside the target so that os.replace is a same-
    filesystem rename: readers see either the old file or the complete new
    one, and an error at any point leaves the old file untouched.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            for line in lines:
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates the file 0600; give the result the permissions the
        # old file had, or ordinary ones for a new file.
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


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
            yield from lines[starts[i] - 1:starts[i + 1] - 1]

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
            raise ValueError(f"cannot write row {k + 1} (ImageID {want.image_id}) so that it reads back as given{why}: "
                             f"caption {want.caption[:80]!r}; the course format cannot hold a caption line that "
                             "ends in a double quote or reads like the start of a row")
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
    path: str | os.PathLike[str],
    image_ids: Sequence[str],
    label_sets: Sequence[Iterable[str]],
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
