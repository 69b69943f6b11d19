"""Writing tables atomically: submissions, probabilities and row subsets of a course CSV.

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
from .records import LABEL_TOKEN_RE, RecordSet

__all__ = [
    "atomic_write_text",
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
