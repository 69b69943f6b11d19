"""Property tests (hypothesis) of the course-CSV reader and writer and of the photo door.

- Captions with quotes, commas, line breaks (\\n, \\r\\n, \\r), tabs and any Unicode survive
  ``write_labelled_csv`` -> ``read_records`` exactly, whenever the course format can hold them.
- The format cannot hold every caption (quotes are not escaped): the writer refuses those, naming the
  row, and writes nothing, so what it writes always reads back as given.
- Arbitrary bytes given to the reader give records or a ``RecordsError``, never another exception,
  and arbitrary bytes given to ``load_rgb`` give an RGB image or an ``ImageError``.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fuselabel.images import ImageError, load_rgb
from fuselabel.records import RecordsError, RecordSet, read_records
from fuselabel.writers import write_labelled_csv

# Moderate example counts keep each test to a few seconds; no example database is written.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ROUND_TRIP = settings(FUZZ, max_examples=80)  # each example writes and reads a file

# Characters that stress the format, mixed with any Unicode (no surrogates: not encodable in UTF-8).
TRICKY = st.sampled_from(
    [
        '"',
        '"',
        ",",
        "\n",
        "\r\n",
        "\r",
        "\t",
        " ",
        "a",
        "1",
        ".jpg",
        "\ufeff",
        "\x00",
        "\u2028",
        "\x1c",
        "é",
        "漢",
        "🙂",
    ]
)
CAPTION = st.lists(TRICKY | st.characters(codec="utf-8"), max_size=25).map("".join)
LABELS = st.lists(st.from_regex(r"[A-Za-z0-9_.\-]{1,6}", fullmatch=True), max_size=4, unique=True)


def representable(caption: str) -> bool:
    """What the course format can hold: no line of the caption before a line break ends in a double quote
    (with only blanks or a \\r after it), and no later line reads like the start of a row (``<id>.jpg,``)."""
    lines = caption.split("\n")
    if any(line.rstrip(" \t\r").endswith('"') for line in lines[:-1]):
        return False
    return not any(line.split(",", 1)[0].lower().endswith(".jpg") and "," in line for line in lines[1:])


def _rows(captions_and_labels):
    return [(f"{i}.jpg", labels, caption) for i, (labels, caption) in enumerate(captions_and_labels)]


@ROUND_TRIP
@given(st.lists(st.tuples(LABELS, CAPTION.filter(representable)), min_size=1, max_size=6))
@example([([], 'A cow with a sign that reads "oh no, not beef on the menu again!"')])
@example([(["4"], "Red motor\nscooter on the sand"), (["1"], "two\r\nlines"), (["2"], 'tab\there, "quoted"')])
@example([([], ""), (["1"], '"'), (["1"], '""'), (["1"], 'ends with a quote"'), (["1"], "cr at end\r")])
def test_captions_round_trip(rows):
    rows = _rows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labelled.csv"
        assert write_labelled_csv(path, rows) == len(rows)
        back = read_records(path)
    assert [(r.image_id, r.labels, r.caption) for r in back.records] == [
        (i, tuple(labels), caption) for i, labels, caption in rows
    ]


@ROUND_TRIP
@given(st.lists(st.tuples(LABELS, CAPTION), min_size=1, max_size=6))
@example([(["1"], 'first line ends in a "quote"\nsecond line')])
@example([(["1"], "a caption\n12.jpg,3,that reads like a row")])
def test_writer_writes_only_what_reads_back(rows):
    rows = _rows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labelled.csv"
        path.write_text("old content\n")
        try:
            write_labelled_csv(path, rows)
        except ValueError as err:
            assert re.search(r"cannot write row \d+ \(ImageID \d+\.jpg\)", str(err))
            assert not all(representable(c) for _, _, c in rows)
            assert path.read_text() == "old content\n" and len(list(Path(tmp).iterdir())) == 1
            return
        back = read_records(path)
    assert [(r.image_id, r.labels, r.caption) for r in back.records] == [
        (i, tuple(labels), caption) for i, labels, caption in rows
    ]


def _check_reader(path: Path) -> None:
    """Records or RecordsError, and the records/bad rows are consistent with each other."""
    try:
        loose = read_records(path, strict=False)
    except RecordsError:
        with pytest.raises(RecordsError):
            read_records(path)
        return
    assert isinstance(loose, RecordSet)
    ids = loose.image_ids
    assert len(ids) == len(set(ids))
    lines = [r.line for r in loose.records]
    assert lines == sorted(lines) and not set(lines) & {b.line for b in loose.bad_rows}
    for r in loose.records:
        assert r.image_id and not re.search(r"\s", r.image_id) and (r.labels is None) == (not loose.labelled)
    if loose.bad_rows:
        with pytest.raises(RecordsError):
            read_records(path)
    else:
        assert read_records(path).records == loose.records


HEADERS = st.sampled_from(
    [
        "ImageID,Labels,Caption",
        "ImageID,Caption",
        "\ufeffImageID,Labels,Caption",
        "imageid , labels , caption",
        "ImageID,Labels",
        "",
    ]
)
CSV_LINE = st.lists(
    st.sampled_from(["1.jpg", "22.jpg", "x", ",", '"', " ", "1", "2 3", "\r", "\t", "é", ";"])
    | st.characters(codec="utf-8"),
    max_size=12,
).map("".join)


@FUZZ
@given(HEADERS, st.lists(CSV_LINE, max_size=8), st.sampled_from(["\n", "\r\n"]), st.sampled_from(["utf-8", "latin-1"]))
def test_reader_on_csv_like_text(tmp_path, header, lines, newline, encoding):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(newline.join([header, *lines]).encode(encoding, errors="replace"))
    _check_reader(path)


@FUZZ
@given(st.binary(max_size=400))
@example(b"\x89PNG\r\n\x1a\n")
@example(b'ImageID,Labels,Caption\n1.jpg,1,"\xff"\n')
@example(b"ImageID,Caption\n\x00")
def test_reader_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    _check_reader(path)


def _image_bytes() -> list[bytes]:
    out = []
    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "L")):
        buf = io.BytesIO()
        Image.new(mode, (24, 16), 90).save(buf, fmt)
        out.append(buf.getvalue())
    return out


IMAGES = _image_bytes()


@FUZZ
@given(st.sampled_from(range(len(IMAGES))), st.integers(0, 2000), st.binary(max_size=40))
@example(3, 20, b"\x01")  # a GIF whose overwritten byte is its frame's width: a whole photo of another size
def test_load_rgb_on_damaged_photos(which, cut, noise):
    """A photo cut short, or with bytes overwritten: an RGB image or ImageError, nothing else. (An overwritten
    size field can make another valid photo, so only a sane size is asked of one that decodes.)"""
    data = IMAGES[which]
    cut = min(cut, len(data))
    damaged = data[:cut] + noise + data[cut + len(noise) :] if noise else data[:cut]
    try:
        img = load_rgb(damaged)
    except ImageError as err:
        assert str(err).startswith("photo bytes: image ") and err.reason
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    assert np.asarray(img).shape == (img.height, img.width, 3)


@FUZZ
@given(st.binary(max_size=300))
def test_load_rgb_on_arbitrary_bytes(data):
    try:
        img = load_rgb(data)
    except ImageError:
        return
    assert img.mode == "RGB"
