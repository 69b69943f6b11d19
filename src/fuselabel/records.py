"""Reading and writing the image/caption/label tables of the COMP5329 data.

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

The module also holds the label-vocabulary helpers and the atomic writers for
submission and probability files. It depends only on the standard library and
numpy.
"""

from __future__ import annotations

import csv
import os
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "BadRow",
    "Record",
    "RecordSet",
    "RecordsError",
    "find_missing_images",
    "format_summary",
    "label_vocabulary",
    "labels_to_matrix",
    "matrix_to_labels",
    "read_label_names",
    "read_records",
    "summarize",
    "write_probabilities",
    "write_submission",
]

LABELLED_HEADER = ("imageid", "labels", "caption")
UNLABELLED_HEADER = ("imageid", "caption")

# Ids and label fields may not contain a comma or a quote, otherwise the first
# two commas of a line would no longer delimit them unambiguously.
_LABELLED_ROW = re.compile(r'([^,"]*),([^,"]*),(.*)', re.DOTALL)
_UNLABELLED_ROW = re.compile(r'([^,"]*),(.*)', re.DOTALL)
_LABEL_TOKEN = r"[A-Za-z0-9_.\-]+"
_LABELS_FIELD = re.compile(rf"(?:{_LABEL_TOKEN}(?: +{_LABEL_TOKEN})*)?")
_LABEL_TOKEN_RE = re.compile(_LABEL_TOKEN)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_WHITESPACE = re.compile(r"\s")

# How many bad rows a strict-mode error message spells out.
_MAX_LISTED_BAD_ROWS = 10


class RecordsError(ValueError):
    """Raised for unreadable input; message names file, line and reason."""


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
        line: 1-based physical line of the file where the row starts.
    """

    image_id: str
    caption: str
    labels: tuple[str, ...] | None
    line: int


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


@dataclass
class RecordSet:
    """The parsed content of one table.

    Attributes:
        path: the file that was read.
        records: the good rows, in file order.
        bad_rows: rows that could not be read (always empty after a strict read).
        labelled: whether the file has a Labels column.
    """

    path: Path
    records: list[Record]
    bad_rows: list[BadRow] = field(default_factory=list)
    labelled: bool = True

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        """ImageIDs of the good rows, in file order."""
        return [r.image_id for r in self.records]

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
            raise RecordsError(f"{self.path}: file has no Labels column (header ImageID,Caption)")
        return [r.labels for r in self.records]  # type: ignore[misc]


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


def _decode(raw: bytes, path: Path) -> str:
    try:
        # utf-8-sig strips a leading BOM and is identical to utf-8 otherwise.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecordsError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _check_header(line: str, path: Path) -> bool:
    """Return True for the labelled layout, False for the unlabelled one."""
    fields = tuple(f.strip().strip('"').strip().lower() for f in line.replace("\ufeff", "").strip().split(","))
    if fields == LABELLED_HEADER:
        return True
    if fields == UNLABELLED_HEADER:
        return False
    raise RecordsError(
        f"{path}:1: bad header {line.strip()[:80]!r}: expected 'ImageID,Labels,Caption' or 'ImageID,Caption'"
    )


class _Parser:
    """Line-oriented parser for one file; see the module docstring for the rules."""

    def __init__(self, path: Path, lines: list[str], labelled: bool) -> None:
        self.path = path
        self.lines = lines
        self.labelled = labelled
        self.row_re = _LABELLED_ROW if labelled else _UNLABELLED_ROW
        self.expected = "expected ImageID,Labels,Caption" if labelled else "expected ImageID,Caption"
        self.records: list[Record] = []
        self.bad_rows: list[BadRow] = []
        self.first_line: dict[str, int] = {}
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
            line_no = i + 1
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
                closed = self._closes(caption, first=True)
                while not closed and i < n and not self._starts_new_row(lines[i]):
                    chunk.append(lines[i])
                    closed = self._closes(lines[i], first=False)
                    i += 1
                text = "\n".join([line, *chunk[1:]])
                if not closed:
                    self._bad(line_no, "unterminated quoted caption", text)
                    continue
                logical = "\n".join(chunk)
                caption = logical[1 : logical.rstrip(" \t").rindex('"')]
            self._add(line_no, image_id, labels_field, caption, text)

    @staticmethod
    def _closes(physical: str, *, first: bool) -> bool:
        # Trailing blanks after the closing quote are tolerated; blanks before
        # a line break inside the caption are caption text and are kept.
        stripped = physical.rstrip(" \t")
        if not stripped.endswith('"'):
            return False
        # On the first line the opening quote itself does not close the caption.
        return not first or len(stripped) >= 2

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
                    line_no,
                    f"malformed labels {labels_field!r} (expected label tokens separated by spaces)",
                    text,
                )
                return
            # dict.fromkeys de-duplicates while keeping file order.
            labels = tuple(dict.fromkeys(_LABEL_TOKEN_RE.findall(labels_field)))
        first = self.first_line.get(image_id)
        if first is not None:
            self._bad(line_no, f"duplicate ImageID {image_id}, first at line {first}", text)
            return
        self.first_line[image_id] = line_no
        self.shapes.add(_id_shape(image_id))
        self.records.append(Record(image_id, caption, labels, line_no))


def _bad_rows_message(path: Path, bad_rows: Sequence[BadRow]) -> str:
    shown = "\n".join(f"  {b}" for b in bad_rows[:_MAX_LISTED_BAD_ROWS])
    more = len(bad_rows) - _MAX_LISTED_BAD_ROWS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{path}: {len(bad_rows)} bad row(s):\n{shown}{tail}"


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
    text = _decode(raw, path)
    # Only CRLF is normalised: str.splitlines() would also split on characters
    # such as \x1c or \u2028 that may legitimately occur inside captions.
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines[0].strip():
        raise RecordsError(f"{path}:1: empty file or blank header: expected 'ImageID,Labels,Caption' or 'ImageID,Caption'")
    labelled = _check_header(lines[0], path)
    parser = _Parser(path, lines, labelled)
    parser.run()
    if strict and parser.bad_rows:
        raise RecordsError(_bad_rows_message(path, parser.bad_rows))
    return RecordSet(path=path, records=parser.records, bad_rows=parser.bad_rows, labelled=labelled)


def read_label_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a ``Label,Name`` table (e.g. ``label_names.csv``) into ``{label: name}``.

    Raises:
        RecordsError: if the file is missing or unreadable, the header is not
            ``Label,Name``, or a row is malformed or repeats a label.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read label names: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RecordsError(f"{path}: not valid UTF-8: {exc.reason}") from exc
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None or [h.strip().lower() for h in header] != ["label", "name"]:
        raise RecordsError(f"{path}:1: bad header {header!r}: expected 'Label,Name'")
    names: dict[str, str] = {}
    for row in rows:
        line = rows.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip():
            raise RecordsError(f"{path}:{line}: expected 'Label,Name', got {row!r}")
        label, name = row[0].strip(), row[1].strip()
        if label in names:
            raise RecordsError(f"{path}:{line}: duplicate label {label!r}")
        names[label] = name
    return names


# ---------------------------------------------------------------------------
# Label vocabulary and matrices


def _vocab_sort_key(tokens: Iterable[str]) -> list[str]:
    tokens = list(tokens)
    if tokens and all(_INTEGER.fullmatch(t) for t in tokens):
        # Numeric ids must sort 1, 2, ..., 10 rather than 1, 10, 11, 2; the
        # string tie-break keeps "01" and "1" in a stable order.
        return sorted(tokens, key=lambda t: (int(t), t))
    return sorted(tokens)


def label_vocabulary(label_sets: Iterable[Iterable[str]]) -> list[str]:
    """All distinct labels of ``label_sets``.

    Sorted numerically when every token is an integer (``1, 2, ..., 19``),
    lexicographically otherwise.
    """
    seen: set[str] = set()
    for labels in label_sets:
        seen.update(labels)
    return _vocab_sort_key(seen)


def _vocab_index(vocab: Sequence[str]) -> dict[str, int]:
    index = {label: j for j, label in enumerate(vocab)}
    if len(index) != len(vocab):
        dupes = sorted(label for label, c in Counter(vocab).items() if c > 1)
        raise ValueError(f"vocabulary has duplicate labels: {dupes}")
    return index


def labels_to_matrix(label_sets: Sequence[Iterable[str]], vocab: Sequence[str]) -> np.ndarray:
    """Multi-hot encode label sets as an ``(n, len(vocab))`` uint8 matrix.

    Raises:
        RecordsError: if a label is not in ``vocab`` (the message names the
            label and the row index).
    """
    index = _vocab_index(vocab)
    matrix = np.zeros((len(label_sets), len(vocab)), dtype=np.uint8)
    for i, labels in enumerate(label_sets):
        for label in labels:
            j = index.get(label)
            if j is None:
                raise RecordsError(f"unknown label {label!r} in row {i} (vocabulary: {list(vocab)})")
            matrix[i, j] = 1
    return matrix


def matrix_to_labels(matrix_bool: np.ndarray | Sequence[Sequence[object]], vocab: Sequence[str]) -> list[tuple[str, ...]]:
    """Inverse of :func:`labels_to_matrix`: each row's nonzero columns as labels in vocab order."""
    matrix = np.asarray(matrix_bool)
    if matrix.ndim != 2 or matrix.shape[1] != len(vocab):
        raise ValueError(f"matrix shape {matrix.shape} does not match a vocabulary of {len(vocab)} labels")
    vocab = list(vocab)
    return [tuple(vocab[j] for j in np.flatnonzero(row)) for row in matrix.astype(bool)]


# ---------------------------------------------------------------------------
# Writing


def _check_id(image_id: str) -> None:
    if not isinstance(image_id, str) or not image_id or any(c in image_id for c in ',"\r\n'):
        raise ValueError(f"cannot write ImageID {image_id!r}: must be a non-empty string without , \" or line breaks")


def _atomic_write(path: str | os.PathLike[str], lines: Iterator[str]) -> None:
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

    _atomic_write(out, rows())
    return len(chosen)


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

    def lines() -> Iterator[str]:
        yield "ImageID,Labels\n"
        for image_id, labels in zip(image_ids, label_sets):
            _check_id(image_id)
            labels = list(labels)
            for label in labels:
                if not isinstance(label, str) or not _LABEL_TOKEN_RE.fullmatch(label):
                    raise ValueError(f"cannot write label {label!r} for {image_id}: expected a token of [A-Za-z0-9_.-]")
            yield f"{image_id},{' '.join(labels)}\n"

    _atomic_write(path, lines())


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
    _vocab_index(vocab)
    for label in vocab:
        if not isinstance(label, str) or not _LABEL_TOKEN_RE.fullmatch(label):
            raise ValueError(f"cannot write label {label!r} as a column name")

    def lines() -> Iterator[str]:
        yield "ImageID," + ",".join(vocab) + "\n"
        for image_id, row in zip(image_ids, probs):
            _check_id(image_id)
            yield image_id + "," + ",".join(f"{p:.6f}" for p in row.tolist()) + "\n"

    _atomic_write(path, lines())


# ---------------------------------------------------------------------------
# Images and summaries


def find_missing_images(image_ids: Iterable[str], image_dir: str | os.PathLike[str]) -> list[str]:
    """ImageIDs (in the given order) with no file ``image_dir/<ImageID>``.

    Raises:
        RecordsError: if ``image_dir`` is not a directory.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise RecordsError(f"{image_dir}: image directory not found")
    # One directory listing is far cheaper than 20,000 stat calls.
    present = set(os.listdir(image_dir))
    missing = []
    for image_id in image_ids:
        if image_id in present:
            continue
        if ("/" in image_id or os.sep in image_id) and (image_dir / image_id).is_file():
            continue
        missing.append(image_id)
    return missing


def _length_stats(values: Sequence[int]) -> dict[str, float | int | None]:
    if not values:
        return {"min": None, "mean": None, "median": None, "max": None}
    return {
        "min": min(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "max": max(values),
    }


def summarize(
    recordset: RecordSet,
    image_dir: str | os.PathLike[str] | None = None,
    label_names: Mapping[str, str] | str | os.PathLike[str] | None = None,
) -> dict:
    """JSON-able overview of a :class:`RecordSet`.

    Keys: ``file``, ``rows``, ``bad_rows`` (list of str), ``labelled``,
    ``label_counts`` ({label: rows} in vocabulary order; ``None`` if
    unlabelled), ``labels_per_row`` ({"k": rows}, keys are strings so the dict
    survives a JSON round trip; ``None`` if unlabelled), ``caption_words`` and
    ``caption_chars`` (min/mean/median/max), ``captions_with_line_breaks``,
    ``label_names`` ({label: name} for the vocabulary, when ``label_names`` is
    given as a dict or a path to ``label_names.csv``), and when ``image_dir``
    is given ``image_dir``, ``missing_images`` (count) and
    ``missing_images_first`` (up to 20 ids).
    """
    records = recordset.records
    summary: dict = {
        "file": str(recordset.path),
        "rows": len(records),
        "bad_rows": [str(b) for b in recordset.bad_rows],
        "labelled": recordset.labelled,
        "label_counts": None,
        "labels_per_row": None,
    }
    vocab: list[str] = []
    if recordset.labelled:
        label_sets = recordset.label_sets
        vocab = label_vocabulary(label_sets)
        counts = Counter(label for labels in label_sets for label in labels)
        summary["label_counts"] = {label: counts[label] for label in vocab}
        per_row = Counter(len(labels) for labels in label_sets)
        summary["labels_per_row"] = {str(k): per_row[k] for k in sorted(per_row)}
    summary["caption_words"] = _length_stats([len(r.caption.split()) for r in records])
    summary["caption_chars"] = _length_stats([len(r.caption) for r in records])
    summary["captions_with_line_breaks"] = sum("\n" in r.caption for r in records)
    if label_names is not None:
        names = label_names if isinstance(label_names, Mapping) else read_label_names(label_names)
        shown = vocab or _vocab_sort_key(names)
        summary["label_names"] = {label: names.get(label, "") for label in shown}
    if image_dir is not None:
        missing = find_missing_images((r.image_id for r in records), image_dir)
        summary["image_dir"] = str(image_dir)
        summary["missing_images"] = len(missing)
        summary["missing_images_first"] = missing[:20]
    return summary


def _fmt_stats(stats: Mapping[str, object]) -> str:
    if stats.get("min") is None:
        return "n/a"
    mean = stats["mean"]
    median = stats["median"]
    return f"min {stats['min']}, mean {mean:.1f}, median {median:g}, max {stats['max']}"  # type: ignore[str-format]


def format_summary(summary: Mapping) -> str:
    """Render :func:`summarize` output as a readable multi-line text report."""
    rows = summary["rows"]
    out = [
        f"File:      {summary['file']}",
        f"Rows:      {rows} ({'labelled' if summary['labelled'] else 'unlabelled'})",
        f"Bad rows:  {len(summary['bad_rows'])}",
    ]
    for bad in summary["bad_rows"][:_MAX_LISTED_BAD_ROWS]:
        out.append(f"  {bad}")
    if len(summary["bad_rows"]) > _MAX_LISTED_BAD_ROWS:
        out.append(f"  ... and {len(summary['bad_rows']) - _MAX_LISTED_BAD_ROWS} more")
    out.append(f"Captions:  words {_fmt_stats(summary['caption_words'])}")
    out.append(f"           chars {_fmt_stats(summary['caption_chars'])}")
    out.append(f"           with line breaks: {summary['captions_with_line_breaks']}")
    if "missing_images" in summary:
        first = summary["missing_images_first"]
        line = f"Images:    {summary['missing_images']} missing in {summary['image_dir']}"
        if first:
            line += " (first: " + ", ".join(first) + ")"
        out.append(line)

    def share(count: int) -> str:
        return f"{100.0 * count / rows:5.1f}%" if rows else "    -"

    if summary.get("labels_per_row") is not None:
        out.append("")
        out.append("Labels per row:")
        for k, count in summary["labels_per_row"].items():
            out.append(f"  {k:>3}  {count:>7}  {share(count)}")
    names = summary.get("label_names") or {}
    if summary.get("label_counts") is not None:
        counts = summary["label_counts"]
        width = max([5, *(len(label) for label in counts)])
        name_width = max([4, *(len(names.get(label, "")) for label in counts)]) if names else 0
        out.append("")
        out.append(f"Label counts ({len(counts)} labels):")
        head = f"  {'label':<{width}}"
        if names:
            head += f"  {'name':<{name_width}}"
        out.append(head + f"  {'rows':>7}  {'share':>6}")
        for label, count in counts.items():
            line = f"  {label:<{width}}"
            if names:
                line += f"  {names.get(label, ''):<{name_width}}"
            out.append(line + f"  {count:>7}  {share(count)}")
    return "\n".join(out)
