"""Which column of a table holds what: the photo, the text(s), the labels, the row id and the split, as the caller
names them, else as the model's training table had them, else by the course's and common names; and how the
label column is written (a list per row, or one field with a separator found from the majority of the rows).

The result is a table's description, ``RecordSet.table``: format, columns, delimiter, label separator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .labels import find_label_sep
from .records import RecordSet, no_labels_error
from .table_formats import RawBatch, is_list
from .textfile import RecordsError

__all__ = ["Columns", "describe_course", "describe_table", "pick_column"]

# Column names tried when the caller names none: the course's first, then common spellings.
_IMAGE_NAMES = (
    "ImageID",
    "image",
    "image_path",
    "image_file",
    "imagepath",
    "photo",
    "img",
    "picture",
    "filename",
    "file",
    "path",
)
_TEXT_NAMES = (
    "Caption",
    "caption",
    "text",
    "title",
    "description",
    "body",
    "report",
    "sentence",
    "content",
    "name",
    "post",
    "message",
    "summary",
)
_LABEL_NAMES = (
    "Labels",
    "labels",
    "label",
    "tags",
    "tag",
    "categories",
    "category",
    "classes",
    "class",
    "hashtags",
    "target",
    "targets",
)

_SEP_WORDS = {"none": None, "space": " ", "whitespace": " ", "tab": "\t", "pipe": "|", "comma": ",", "semicolon": ";"}


@dataclass(frozen=True)
class Columns:
    """Which column holds what; ``None`` means "find it". ``text`` may name several columns."""

    image: str | None = None
    text: tuple[str, ...] | None = None
    label: str | None = None
    id: str | None = None
    split: str | None = None
    label_sep: str | None = None  # None: found from the data; "none": one label per field

    @classmethod
    def of(cls, image_col=None, text_col=None, label_col=None, id_col=None, split_col=None, label_sep=None) -> Columns:
        if isinstance(text_col, str):
            text_col = (text_col,)
        return cls(image_col, tuple(text_col) if text_col else None, label_col, id_col, split_col, label_sep)

    def keywords(self) -> dict:
        """The same, as the Python API's keywords (image_col=, text_col=, ...)."""
        return {
            "image_col": self.image,
            "text_col": self.text,
            "label_col": self.label,
            "id_col": self.id,
            "label_sep": self.label_sep,
        }


def pick_column(
    role: str,
    given,
    columns: Sequence[str],
    preferred: Sequence[str],
    names: Sequence[str],
    path: Path,
    flag: str,
    required: bool,
) -> str | None:
    if given is not None:
        if given not in columns:
            raise RecordsError(
                f"{path}:1: no column {given!r} for the {role} ({flag}); the table has {', '.join(map(repr, columns))}"
            )
        return given
    for candidate in list(preferred) + list(names):
        if candidate and candidate in columns:
            return candidate
    lower = {c.lower(): c for c in columns}
    for candidate in names:
        if candidate.lower() in lower:
            return lower[candidate.lower()]
    if required:
        raise RecordsError(
            f"{path}:1: found no column for the {role}: the table has {', '.join(map(repr, columns))}; "
            f"name it with {flag} COLUMN"
        )
    return None


def _label_sep(raw: RawBatch, label_col: str, given: str | None, preferred: str | None) -> str | None:
    if given is not None:
        # a word ("none", "space", "pipe"...) or the separator itself; blank means whitespace
        return _SEP_WORDS.get(given.strip().lower(), given) if given.strip() else " "
    values = [row.get(label_col) for row in raw.rows]
    if any(is_list(v) for v in values):
        return None
    strings = [v for v in values if isinstance(v, str)]
    found = find_label_sep(strings)
    # The training table's separator, when this table's majority finds none but it occurs (a "/" given at training)
    if found is None and preferred not in (None, "none") and any(preferred in v for v in strings):
        return preferred
    return found


def _text_cols(columns: Columns, raw: RawBatch, trained: Mapping, path: Path) -> tuple[str, ...]:
    if columns.text:
        return tuple(pick_column("text", c, raw.columns, [], (), path, "--text-col", True) for c in columns.text)
    trained_text = [c for c in trained.get("text_cols") or () if c in raw.columns]
    found = pick_column("text", None, raw.columns, [], _TEXT_NAMES, path, "--text-col", required=False)
    text_cols = tuple(trained_text) or ((found,) if found else ())
    if not text_cols:
        raise RecordsError(
            f"{path}:1: found no text column: the table has {', '.join(map(repr, raw.columns))}; "
            "name it with --text-col COLUMN (repeat it for several)"
        )
    return text_cols


def describe_table(raw: RawBatch, columns: Columns, trained: Mapping, need_labels: bool, path: Path) -> dict:
    """The table's description (``RecordSet.table``) from its first batch: which column is which, and how labels
    are written."""
    image_col = pick_column(
        "photo", columns.image, raw.columns, [trained.get("image_col")], _IMAGE_NAMES, path, "--image-col", True
    )
    text_cols = _text_cols(columns, raw, trained, path)
    label_col = pick_column(
        "labels", columns.label, raw.columns, [trained.get("label_col")], _LABEL_NAMES, path, "--label-col", need_labels
    )
    # A model trained with an id column of its own names rows by it again wherever the table has it.
    trained_id = trained.get("id_col") if trained.get("id_col") != trained.get("image_col") else None
    id_col = pick_column("row id", columns.id, raw.columns, [trained_id], (), path, "--id-col", False) or image_col
    split_col = (
        pick_column("split", columns.split, raw.columns, [], (), path, "--split-col", True) if columns.split else None
    )
    sep = _label_sep(raw, label_col, columns.label_sep, trained.get("label_sep")) if label_col else None
    as_list = label_col and any(is_list(r.get(label_col)) for r in raw.rows[:1000])
    return {
        "format": raw.format,
        "columns": list(raw.columns),
        **({"delimiter": raw.delimiter} if raw.delimiter else {}),
        "image_col": image_col,
        "text_cols": list(text_cols),
        "label_col": label_col,
        "id_col": id_col,
        "split_col": split_col,
        "label_sep": sep,
        "labels_as": "list" if as_list else "field" if label_col else None,
        "label_sep_minority": [],
        "label_sep_minority_count": 0,
        "unit": raw.unit,
    }


def describe_course(course: RecordSet, columns: Columns, need_labels: bool) -> dict:
    """The course file's description, the same as any other table's; named columns must be the course's."""
    for given, course_name, flag in (
        (columns.image, "ImageID", "--image-col"),
        (columns.label, "Labels", "--label-col"),
        (columns.id, "ImageID", "--id-col"),
    ):
        if given is not None and given != course_name:
            raise RecordsError(
                f"{course.path}: {flag} {given!r}: this course-format file's columns are "
                f"{'ImageID,Labels,Caption' if course.labelled else 'ImageID,Caption'}"
            )
    if columns.text and tuple(columns.text) != ("Caption",):
        raise RecordsError(
            f"{course.path}: --text-col {','.join(columns.text)!r}: this course-format file's text column is Caption"
        )
    if columns.split:
        raise RecordsError(
            f"{course.path}: --split-col {columns.split!r}: the course format has no split column; "
            "give the validation rows as their own file with --val-csv"
        )
    if need_labels and not course.labelled:
        raise no_labels_error(course.path)
    return {
        "format": "course",
        "columns": ["ImageID", "Labels", "Caption"] if course.labelled else ["ImageID", "Caption"],
        "image_col": "ImageID",
        "text_cols": ["Caption"],
        "label_col": "Labels" if course.labelled else None,
        "id_col": "ImageID",
        "split_col": None,
        "label_sep": " " if course.labelled else None,
        "labels_as": "field" if course.labelled else None,
        "unit": "line",
    }
