"""Inspecting a table: summary statistics, missing or unreadable photos and a readable report.

This is what ``fuselabel inspect`` prints: the format, delimiter and columns found, how many rows were read,
which were bad, how labels are separated (and which rows look written with another separator), label and
caption statistics, and which photos are missing or cannot be opened (empty, truncated, not an image, too
large, a folder). A table is summarised a batch of rows at a time (:func:`inspect_table`), so memory does not
grow with its rows.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from .images import ImageError, check_image, resolve_image
from .labels import read_label_names, sort_labels
from .records import RecordSet
from .tables import Columns, iter_table
from .textfile import MAX_LISTED_BAD_ROWS, RecordsError

__all__ = ["find_missing_images", "find_unreadable_images", "format_summary", "inspect_table", "summarize"]

_FORMAT_NAMES = {
    "course": "course CSV (ImageID,Labels,Caption; quotes inside captions left as written)",
    "csv": "CSV (RFC 4180)",
    "json": "JSON array",
    "xlsx": "Excel workbook (.xlsx)",
    "tsv": "TSV",
    "jsonl": "JSON Lines",
    "parquet": "Parquet",
    "dataframe": "DataFrame",
}
_SEP_NAMES = {" ": "whitespace", "|": "'|'", ";": "';'", ",": "','", "\t": "tabs"}

# How many missing or unreadable photos a summary names.
_MAX_LISTED_IMAGES = 20


def find_missing_images(
    image_ids: Iterable[str], image_dir: str | os.PathLike[str], *, listing: set[str] | None = None
) -> list[str]:
    """ImageIDs (in the given order) with no file where :func:`fuselabel.images.resolve_image` points:
    ``image_dir/<ImageID>`` (nested folders allowed) or the ImageID itself when it is an absolute path.

    ``listing``: the folder's names, when the caller has listed it already (a table checked batch by batch).

    Raises:
        RecordsError: if ``image_dir`` is not a directory.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise RecordsError(f"{image_dir}: image directory not found")
    # One directory listing is far cheaper than 20,000 stat calls.
    present = set(os.listdir(image_dir)) if listing is None else listing
    missing = []
    for image_id in image_ids:
        if image_id in present:
            continue
        if ("/" in image_id or os.sep in image_id) and resolve_image(image_id, image_dir).is_file():
            continue
        missing.append(image_id)
    return missing


def find_unreadable_images(
    image_ids: Iterable[str], image_dir: str | os.PathLike[str], *, decode: bool = True
) -> list[tuple[str, str]]:
    """(ImageID, reason) for each present photo that :func:`fuselabel.images.load_rgb` would refuse.

    Missing files are left to :func:`find_missing_images`. With ``decode`` every photo is decoded,
    which also finds truncated files (about 10 s for 20,000 course photos on one core); without it
    only headers are read (format, size and the pixel limit; about 3 s).
    """
    image_dir = Path(image_dir)
    unreadable = []
    for image_id in image_ids:
        try:
            check_image(resolve_image(image_id, image_dir), decode=decode)
        except ImageError as err:
            if err.reason != "missing":
                unreadable.append((image_id, err.reason))
    return unreadable


def _length_stats(counts: Counter) -> dict[str, float | int | None]:
    """min/mean/median/max of lengths kept as {length: rows}: memory grows with distinct lengths, not rows."""
    total = sum(counts.values())
    if not total:
        return {"min": None, "mean": None, "median": None, "max": None}
    ordered = sorted(counts)

    def nth(k: int) -> int:  # the k-th smallest length, from 0
        seen = 0
        for length in ordered:
            seen += counts[length]
            if seen > k:
                return length
        return ordered[-1]

    middle = nth(total // 2) if total % 2 else (nth(total // 2 - 1) + nth(total // 2)) / 2
    return {
        "min": ordered[0],
        "mean": round(sum(length * n for length, n in counts.items()) / total, 2),
        "median": middle,
        "max": ordered[-1],
    }


class _Tally:
    """What a summary counts, added up a batch of rows at a time."""

    def __init__(self, image_dir, decode_images: bool) -> None:
        self.rows = 0
        self.bad_rows: list[str] = []
        self.first_rows: list[dict] = []
        self.labels: Counter = Counter()
        self.per_row: Counter = Counter()
        self.splits: Counter = Counter()
        self.words: Counter = Counter()
        self.chars: Counter = Counter()
        self.line_breaks = self.empty = 0
        self.image_dir, self.decode = image_dir, decode_images
        self.listing = set(os.listdir(image_dir)) if image_dir is not None and Path(image_dir).is_dir() else None
        self.missing: list[str] = []
        self.missing_count = self.unreadable_count = 0
        self.unreadable: list[tuple[str, str]] = []

    def add(self, batch: RecordSet) -> None:
        records = batch.records
        self.rows += len(records)
        self.bad_rows += [str(b) for b in batch.bad_rows]
        self.first_rows += [_first_row(r) for r in records[: 3 - len(self.first_rows)]]
        for r in records:
            self.words[len(r.caption.split())] += 1
            self.chars[len(r.caption)] += 1
            self.line_breaks += "\n" in r.caption
            self.empty += not r.caption.strip()
            if r.split:
                self.splits[r.split] += 1
            if r.labels is not None:
                self.labels.update(r.labels)
                self.per_row[len(r.labels)] += 1
        if self.image_dir is not None:
            self._check_images([r.image_id for r in records])

    def _check_images(self, image_ids: list[str]) -> None:
        missing = find_missing_images(image_ids, self.image_dir, listing=self.listing)
        self.missing_count += len(missing)
        self.missing += missing[: _MAX_LISTED_IMAGES - len(self.missing)]
        unreadable = find_unreadable_images(image_ids, self.image_dir, decode=self.decode)
        self.unreadable_count += len(unreadable)
        self.unreadable += unreadable[: _MAX_LISTED_IMAGES - len(self.unreadable)]


def _first_row(r) -> dict:
    shown = {"id": r.id, "image": r.image_id, "text": r.caption[:200]}
    shown["labels"] = list(r.labels) if r.labels is not None else None
    return {**shown, **({"split": r.split} if r.split else {})}


def _table_part(table: Mapping) -> dict:
    return {
        "format": table.get("format"),
        **({"delimiter": table["delimiter"]} if table.get("delimiter") else {}),
        "columns": {
            "all": table.get("columns"),
            "image": table.get("image_col"),
            "text": table.get("text_cols"),
            "labels": table.get("label_col"),
            "id": table.get("id_col"),
            "split": table.get("split_col"),
        },
        "label_sep": table.get("label_sep"),
        "labels_as": table.get("labels_as"),
        "label_sep_minority": list(table.get("label_sep_minority") or []),
        "label_sep_minority_count": table.get("label_sep_minority_count") or 0,
    }


def _label_part(tally: _Tally) -> dict:
    vocab = sort_labels(tally.labels)
    return {
        "label_counts": {label: tally.labels[label] for label in vocab},
        "labels_per_row": {str(k): tally.per_row[k] for k in sorted(tally.per_row)},
        # Exactly one label on every row: a single-label problem, which a softmax head models directly.
        "suggest_multiclass": bool(tally.rows) and set(tally.per_row) == {1} and len(vocab) > 2,
    }


def summarize(
    records: RecordSet | Iterable[RecordSet],
    image_dir: str | os.PathLike[str] | None = None,
    label_names: Mapping[str, str] | str | os.PathLike[str] | None = None,
    *,
    decode_images: bool = True,
) -> dict:
    """JSON-able overview of a :class:`RecordSet`, or of a table's batches (:func:`fuselabel.tables.iter_table`).

    Keys: ``file``, ``format``, ``columns``, ``label_sep``, ``label_sep_minority`` (rows that look written with
    another separator, first 10) and its ``_count``, ``rows``, ``bad_rows`` (list of str), ``labelled``,
    ``label_counts`` ({label: rows} in vocabulary order; ``None`` if unlabelled), ``labels_per_row`` ({"k":
    rows}, keys are strings so the dict survives a JSON round trip; ``None`` if unlabelled), ``caption_words``
    and ``caption_chars`` (min/mean/median/max), ``captions_with_line_breaks``, ``empty_captions``,
    ``first_rows``, ``label_names`` ({label: name} for the vocabulary, when ``label_names`` is given as a dict
    or a path to ``label_names.csv``), and when ``image_dir`` is given ``image_dir``, ``missing_images``
    (count), ``missing_images_first`` (up to 20 ids), ``unreadable_images`` (count of photos that exist but
    cannot be opened; every photo is decoded unless ``decode_images`` is False) and
    ``unreadable_images_first`` (up to 20 ``"<ImageID>: <reason>"``).
    """
    tally, last = _Tally(image_dir, decode_images), None
    for batch in [records] if isinstance(records, RecordSet) else records:
        tally.add(batch)
        last = batch
    if last is None:
        raise RecordsError("no rows to summarise")
    summary: dict = {"file": str(last.path), **_table_part(last.table or {}), "rows": tally.rows}
    summary.update(bad_rows=tally.bad_rows, labelled=last.labelled, label_counts=None, labels_per_row=None)
    summary["first_rows"] = tally.first_rows
    if tally.splits:
        summary["split_counts"] = dict(tally.splits)
    if last.labelled:
        summary.update(_label_part(tally))
    summary["caption_words"] = _length_stats(tally.words)
    summary["caption_chars"] = _length_stats(tally.chars)
    summary["captions_with_line_breaks"] = tally.line_breaks
    summary["empty_captions"] = tally.empty
    if label_names is not None:
        names = label_names if isinstance(label_names, Mapping) else read_label_names(label_names)
        shown = list(summary.get("label_counts") or []) or sort_labels(names)
        summary["label_names"] = {label: names.get(label, "") for label in shown}
    if image_dir is not None:
        summary["image_dir"] = str(image_dir)
        summary.update(missing_images=tally.missing_count, missing_images_first=tally.missing)
        summary["unreadable_images"] = tally.unreadable_count
        summary["unreadable_images_first"] = [f"{i}: {why}" for i, why in tally.unreadable]
    return summary


def inspect_table(
    source,
    columns: Columns | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    label_names: Mapping[str, str] | str | os.PathLike[str] | None = None,
    *,
    delimiter: str | None = None,
    sheet: str | int | None = None,
    decode_images: bool = True,
) -> dict:
    """:func:`summarize` of any table, read a batch of rows at a time (bad rows are listed, not raised)."""
    batches = iter_table(source, columns, strict=False, delimiter=delimiter, sheet=sheet)
    return summarize(batches, image_dir, label_names, decode_images=decode_images)


def _fmt_stats(stats: Mapping[str, object]) -> str:
    if stats.get("min") is None:
        return "n/a"
    mean = stats["mean"]
    median = stats["median"]
    return f"min {stats['min']}, mean {mean:.1f}, median {median:g}, max {stats['max']}"  # type: ignore[str-format]


def _format_table(summary: Mapping) -> list[str]:
    """Format, columns and how labels are written."""
    columns = summary.get("columns") or {}
    fmt = _FORMAT_NAMES.get(summary["format"], summary["format"])
    if summary.get("delimiter") not in (None, ",", "\t"):
        fmt += f", fields separated by {_SEP_NAMES.get(summary['delimiter'], repr(summary['delimiter']))}"
    out = [f"Format:    {fmt}"]
    out.append(
        f"Columns:   photo {columns.get('image')!r}, text {', '.join(map(repr, columns.get('text') or []))}"
        + (f", labels {columns['labels']!r}" if columns.get("labels") else ", no label column")
        + (f", id {columns['id']!r}" if columns.get("id") not in (None, columns.get("image")) else "")
        + (f", split {columns['split']!r}" if columns.get("split") else "")
    )
    used = {columns.get(k) for k in ("image", "labels", "id", "split")} | set(columns.get("text") or [])
    other = [c for c in columns.get("all") or [] if c not in used]
    if other:
        out.append(f"           not used: {', '.join(map(repr, other))}")
    if columns.get("labels"):
        sep = summary.get("label_sep")
        if summary.get("labels_as") == "list":
            how = "a list per row"
        else:
            how = "one label per field" if sep is None else f"separated by {_SEP_NAMES.get(sep, repr(sep))}"
        out.append(f"Labels:    {how}")
        odd = summary.get("label_sep_minority_count") or 0
        if odd:
            out.append(f"           {odd} row(s) written with another separator, each read as one label:")
            out.extend(f"  {row}" for row in summary.get("label_sep_minority") or [])
    return out


def _format_rows(summary: Mapping) -> list[str]:
    """Rows, bad rows, splits, captions and photos."""
    bad = summary["bad_rows"]
    out = [
        f"Rows:      {summary['rows']} ({'labelled' if summary['labelled'] else 'unlabelled'})",
        f"Bad rows:  {len(bad)}",
    ]
    if summary.get("split_counts"):
        out.append("Split:     " + ", ".join(f"{k} {v}" for k, v in sorted(summary["split_counts"].items())))
    out += [f"  {b}" for b in bad[:MAX_LISTED_BAD_ROWS]]
    if len(bad) > MAX_LISTED_BAD_ROWS:
        out.append(f"  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more")
    out.append(f"Captions:  words {_fmt_stats(summary['caption_words'])}")
    out.append(f"           chars {_fmt_stats(summary['caption_chars'])}")
    out.append(f"           with line breaks: {summary['captions_with_line_breaks']}")
    out.append(f"           empty: {summary['empty_captions']}")
    if "missing_images" in summary:
        first = summary["missing_images_first"]
        line = f"Images:    {summary['missing_images']} missing in {summary['image_dir']}"
        if first:
            line += " (first: " + ", ".join(first) + ")"
        out.append(line)
        out.append(f"           {summary['unreadable_images']} unreadable")
        out.extend(f"  {entry}" for entry in summary["unreadable_images_first"])
    return out


def _format_labels(summary: Mapping) -> list[str]:
    """Labels per row and the count of each label, with its name when known."""
    rows = summary["rows"]

    def share(count: int) -> str:
        return f"{100.0 * count / rows:5.1f}%" if rows else "    -"

    out = []
    if summary.get("labels_per_row") is not None:
        out += ["", "Labels per row:"]
        out += [f"  {k:>3}  {count:>7}  {share(count)}" for k, count in summary["labels_per_row"].items()]
    names = summary.get("label_names") or {}
    if summary.get("label_counts") is not None:
        counts = summary["label_counts"]
        width = max([5, *(len(label) for label in counts)])
        name_width = max([4, *(len(names.get(label, "")) for label in counts)]) if names else 0
        named = (lambda label: f"  {names.get(label, ''):<{name_width}}") if names else (lambda label: "")
        out += ["", f"Label counts ({len(counts)} labels):"]
        out.append(
            f"  {'label':<{width}}" + (f"  {'name':<{name_width}}" if names else "") + f"  {'rows':>7}  {'share':>6}"
        )
        out += [f"  {label:<{width}}{named(label)}  {n:>7}  {share(n)}" for label, n in counts.items()]
    if summary.get("suggest_multiclass"):
        out.append("")
        out.append(
            "Every row has exactly one label: consider training with --task multiclass (one softmax over the labels)"
        )
    return out


def format_summary(summary: Mapping) -> str:
    """Render :func:`summarize` output as a readable multi-line text report."""
    out = [f"File:      {summary['file']}"]
    if summary.get("format"):
        out += _format_table(summary)
    out += _format_rows(summary) + _format_labels(summary)
    if summary.get("first_rows"):
        out += ["", "First rows as read:"]
        for row in summary["first_rows"]:
            labels = "" if row["labels"] is None else f"  labels {row['labels']}"
            out.append(f"  {row['id']}: photo {row['image']!r}  text {row['text'][:60]!r}{labels}")
    return "\n".join(out)
