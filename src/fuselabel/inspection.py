"""Inspecting a course table: summary statistics, missing or unreadable photos and a readable report.

This is what ``fuselabel inspect`` prints: how many rows were read, which were
bad, label and caption statistics, and which photos are missing or cannot be
opened (empty, truncated, not an image, too large, a folder).
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .images import ImageError, check_image, resolve_image
from .labels import label_vocabulary, read_label_names, sort_labels
from .records import RecordSet
from .textfile import MAX_LISTED_BAD_ROWS, RecordsError

__all__ = ["find_missing_images", "find_unreadable_images", "format_summary", "summarize"]

_FORMAT_NAMES = {
    "course": "course CSV (ImageID,Labels,Caption; quotes inside captions left as written)",
    "csv": "CSV (RFC 4180)",
    "tsv": "TSV",
    "jsonl": "JSON Lines",
    "parquet": "Parquet",
    "dataframe": "DataFrame",
}
_SEP_NAMES = {" ": "whitespace", "|": "'|'", ";": "';'", ",": "','", "\t": "tabs"}

# How many missing or unreadable photos a summary names.
_MAX_LISTED_IMAGES = 20


def find_missing_images(image_ids: Iterable[str], image_dir: str | os.PathLike[str]) -> list[str]:
    """ImageIDs (in the given order) with no file where :func:`fuselabel.images.resolve_image` points:
    ``image_dir/<ImageID>`` (nested folders allowed) or the ImageID itself when it is an absolute path.

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
    *,
    decode_images: bool = True,
) -> dict:
    """JSON-able overview of a :class:`RecordSet`.

    Keys: ``file``, ``rows``, ``bad_rows`` (list of str), ``labelled``,
    ``label_counts`` ({label: rows} in vocabulary order; ``None`` if
    unlabelled), ``labels_per_row`` ({"k": rows}, keys are strings so the dict
    survives a JSON round trip; ``None`` if unlabelled), ``caption_words`` and
    ``caption_chars`` (min/mean/median/max), ``captions_with_line_breaks``,
    ``label_names`` ({label: name} for the vocabulary, when ``label_names`` is
    given as a dict or a path to ``label_names.csv``), and when ``image_dir``
    is given ``image_dir``, ``missing_images`` (count),
    ``missing_images_first`` (up to 20 ids), ``unreadable_images`` (count of
    photos that exist but cannot be opened; every photo is decoded unless
    ``decode_images`` is False) and ``unreadable_images_first`` (up to 20
    ``"<ImageID>: <reason>"``). ``empty_captions`` counts rows whose caption
    is empty.
    """
    records = recordset.records
    table = recordset.table or {}
    summary: dict = {
        "file": str(recordset.path),
        "format": table.get("format"),
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
        "rows": len(records),
        "bad_rows": [str(b) for b in recordset.bad_rows],
        "labelled": recordset.labelled,
        "label_counts": None,
        "labels_per_row": None,
        "first_rows": [
            {
                "id": r.id,
                "image": r.image_id,
                "text": r.caption[:200],
                "labels": list(r.labels) if r.labels is not None else None,
                **({"split": r.split} if r.split else {}),
            }
            for r in records[:3]
        ],
    }
    if table.get("split_col"):
        summary["split_counts"] = dict(Counter(r.split for r in records))
    vocab: list[str] = []
    if recordset.labelled:
        label_sets = recordset.label_sets
        vocab = label_vocabulary(label_sets)
        counts = Counter(label for labels in label_sets for label in labels)
        summary["label_counts"] = {label: counts[label] for label in vocab}
        per_row = Counter(len(labels) for labels in label_sets)
        summary["labels_per_row"] = {str(k): per_row[k] for k in sorted(per_row)}
        # Exactly one label on every row: a single-label problem, which a softmax head models directly.
        summary["suggest_multiclass"] = bool(records) and set(per_row) == {1} and len(vocab) > 2
    summary["caption_words"] = _length_stats([len(r.caption.split()) for r in records])
    summary["caption_chars"] = _length_stats([len(r.caption) for r in records])
    summary["captions_with_line_breaks"] = sum("\n" in r.caption for r in records)
    summary["empty_captions"] = sum(not r.caption.strip() for r in records)
    if label_names is not None:
        names = label_names if isinstance(label_names, Mapping) else read_label_names(label_names)
        shown = vocab or sort_labels(names)
        summary["label_names"] = {label: names.get(label, "") for label in shown}
    if image_dir is not None:
        missing = find_missing_images((r.image_id for r in records), image_dir)
        summary["image_dir"] = str(image_dir)
        summary["missing_images"] = len(missing)
        summary["missing_images_first"] = missing[:_MAX_LISTED_IMAGES]
        unreadable = find_unreadable_images((r.image_id for r in records), image_dir, decode=decode_images)
        summary["unreadable_images"] = len(unreadable)
        summary["unreadable_images_first"] = [f"{i}: {why}" for i, why in unreadable[:_MAX_LISTED_IMAGES]]
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
    out = [f"File:      {summary['file']}"]
    columns = summary.get("columns") or {}
    if summary.get("format"):
        out.append(f"Format:    {_FORMAT_NAMES.get(summary['format'], summary['format'])}")
        out.append(
            f"Columns:   photo {columns.get('image')!r}, text {', '.join(map(repr, columns.get('text') or []))}"
            + (f", labels {columns['labels']!r}" if columns.get("labels") else ", no label column")
            + (f", id {columns['id']!r}" if columns.get("id") not in (None, columns.get("image")) else "")
            + (f", split {columns['split']!r}" if columns.get("split") else "")
        )
        other = [
            c
            for c in columns.get("all") or []
            if c
            not in {
                columns.get("image"),
                columns.get("labels"),
                columns.get("id"),
                columns.get("split"),
                *(columns.get("text") or []),
            }
        ]
        if other:
            out.append(f"           not used: {', '.join(map(repr, other))}")
        if columns.get("labels"):
            sep = summary.get("label_sep")
            how = (
                "a list per row"
                if summary.get("labels_as") == "list"
                else "one label per field"
                if sep is None
                else f"separated by {_SEP_NAMES.get(sep, repr(sep))}"
            )
            out.append(f"Labels:    {how}")
    out += [
        f"Rows:      {rows} ({'labelled' if summary['labelled'] else 'unlabelled'})",
        f"Bad rows:  {len(summary['bad_rows'])}",
    ]
    if summary.get("split_counts"):
        out.append("Split:     " + ", ".join(f"{k} {v}" for k, v in sorted(summary["split_counts"].items())))
    for bad in summary["bad_rows"][:MAX_LISTED_BAD_ROWS]:
        out.append(f"  {bad}")
    if len(summary["bad_rows"]) > MAX_LISTED_BAD_ROWS:
        out.append(f"  ... and {len(summary['bad_rows']) - MAX_LISTED_BAD_ROWS} more")
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
    if summary.get("suggest_multiclass"):
        out.append("")
        out.append(
            "Every row has exactly one label: consider training with --task multiclass (one softmax over the labels)"
        )
    if summary.get("first_rows"):
        out.append("")
        out.append("First rows as read:")
        for row in summary["first_rows"]:
            labels = "" if row["labels"] is None else f"  labels {row['labels']}"
            out.append(f"  {row['id']}: photo {row['image']!r}  text {row['text'][:60]!r}{labels}")
    return "\n".join(out)
