"""Bad input, case by case: every row of docs/bad-inputs.md, through the command line and the Python API.

Each case ends in exactly one of two ways, and is held to it below:

- a named error: exit status 2, a ``fuselabel: error:`` message naming the file and line (or the setting),
  the problem and what to do, no traceback, and nothing written; or
- a documented fallback, counted in the run's summary (rows predicted from the caption alone, ...).

Files that only look odd (a BOM, CRLF line ends, blank lines) are held to reading exactly what the clean
file reads. The table's case ids (``csv-bom``, ``photo-cmyk``, ``setting-unknown-key`` ...) are the ids of the
parametrized tests below, so ``pytest -k photo-cmyk`` runs one row. Everything is generated at test time
from the tiny synthetic data set of conftest.py; no test reads the course photos.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_CLI_TRAIN as TINY_TRAIN
from conftest import TINY_LABELS, make_tiny_dataset
from PIL import Image

from fuselabel.cli import main
from fuselabel.config import build_config
from fuselabel.images import MAX_PIXELS, ImageError, check_image, load_rgb
from fuselabel.inspection import summarize
from fuselabel.records import RecordsError, read_records

PREDICT = ["--num-workers", "1", "--quiet"]
WORDS = {label: word for label, (_, word) in TINY_LABELS.items()}  # "1" -> "person": non-numeric labels


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_named_error(code: int, err: str, fragments) -> None:
    """Exit status 2, one ``fuselabel: error:`` message holding every fragment, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    message = err[err.index("fuselabel: error: ") :]
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def _labelled_line(r, labels=None, caption=None) -> str:
    labels = " ".join(WORDS[x] for x in r.labels) if labels is None else labels
    return f'{r.image_id},{labels},"{r.caption if caption is None else caption}"'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, session_cache):
    """The tiny data set, a model trained on the messy-but-valid CSV (see csv-* "reads fine" rows), and a
    clean unlabelled copy of the first rows to derive prediction CSVs from."""
    root = tmp_path_factory.mktemp("bad-inputs")
    image_dir, clean = make_tiny_dataset(root)
    rows = read_records(clean).records
    # BOM, CRLF line ends, blank lines, word labels, one empty label set and one empty caption.
    lines = [_labelled_line(r) for r in rows]
    lines[6] = _labelled_line(rows[6], labels="")
    lines[7] = _labelled_line(rows[7], caption="")
    lines[10:10] = ["", ""]
    messy = root / "messy.csv"
    messy.write_bytes(
        ("\ufeffImageID,Labels,Caption\n" + "\n".join(lines) + "\n\n").replace("\n", "\r\n").encode("utf-8")
    )
    model = root / "model"
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(
            [
                str(a)
                for a in [
                    "train",
                    "--data",
                    image_dir,
                    "--csv",
                    messy,
                    "--out",
                    model,
                    "--cache-dir",
                    session_cache,
                    *TINY_TRAIN,
                ]
            ]
        )
    assert code == 0, out.getvalue()
    return SimpleNamespace(
        root=root, images=image_dir, rows=rows, messy=messy, model=model, train_out=out.getvalue(), cache=session_cache
    )


def _unlabelled(rows, captions=None) -> str:
    captions = captions or {}
    return "ImageID,Caption\n" + "".join(f'{r.image_id},"{captions.get(r.image_id, r.caption)}"\n' for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# CSV: read fine


def test_messy_but_valid_csv_trains(corpus):
    """csv-bom, csv-crlf, csv-blank-lines, csv-non-numeric-labels, csv-empty-label-set, csv-empty-caption: train."""
    assert "48 rows, 4 labels" in corpus.train_out
    assert json.loads((corpus.model / "labels.json").read_text())["labels"] == ["car", "dog", "kite", "person"]
    messy = read_records(corpus.messy)
    assert messy.image_ids == [r.image_id for r in corpus.rows]
    assert messy.records[6].labels == () and messy.records[7].caption == ""
    assert messy.records[3].caption == corpus.rows[3].caption  # the line break inside a caption stays "\n"
    assert all("\r" not in r.caption for r in messy.records)


READS_FINE = {
    "csv-bom": lambda text: ("\ufeff" + text).encode("utf-8"),
    "csv-crlf": lambda text: text.replace("\n", "\r\n").encode("utf-8"),
    "csv-blank-lines": lambda text: text.replace("\n", "\n\n", 3).encode("utf-8") + b"\n\n",
}


@pytest.mark.parametrize("case", list(READS_FINE))
def test_reads_fine(corpus, tmp_path, capsys, case):
    rows = corpus.rows[:12]
    csv = tmp_path / "test.csv"
    csv.write_bytes(READS_FINE[case](_unlabelled(rows)))
    clean = tmp_path / "clean.csv"
    clean.write_text(_unlabelled(rows))
    # Python API: exactly what the clean file reads, line breaks inside captions included.
    assert read_records(csv).captions == read_records(clean).captions == [r.caption for r in rows]
    assert read_records(csv).image_ids == [r.image_id for r in rows]

    code, out, err = _run(capsys, "inspect", "--data", corpus.images, "--csv", csv)
    assert code == 0 and "Rows:      12 (unlabelled)" in out and "Bad rows:  0" in out, err

    sub = tmp_path / "submission.csv"
    code, out, err = _run(
        capsys, "predict", corpus.model, "--data", corpus.images, "--csv", csv, "--out", sub, *PREDICT
    )
    assert code == 0, err
    assert [line.split(",")[0] for line in sub.read_text().splitlines()[1:]] == [r.image_id for r in rows]


def test_csv_empty_caption_predicts_from_photo(corpus, tmp_path, capsys):
    """csv-empty-caption at predict: a fallback, counted (predicted from the photo alone)."""
    rows = corpus.rows[:6]
    csv = tmp_path / "test.csv"
    csv.write_text(_unlabelled(rows, {rows[2].image_id: ""}))
    proba = tmp_path / "proba.csv"
    code, out, err = _run(
        capsys,
        "predict",
        corpus.model,
        "--data",
        corpus.images,
        "--csv",
        csv,
        "--out",
        tmp_path / "s.csv",
        "--proba",
        proba,
        *PREDICT,
    )
    assert code == 0, err
    assert "1 from the photo alone (empty caption)" in out
    inputs = [line.rsplit(",", 1)[1] for line in proba.read_text().splitlines()[1:]]
    assert inputs == ["ok", "ok", "image_only", "ok", "ok", "ok"]

    code, out, _ = _run(capsys, "inspect", "--data", corpus.images, "--csv", csv)
    assert code == 0 and "empty: 1" in out


def test_csv_empty_label_set_and_non_numeric_labels(corpus, capsys):
    """csv-empty-label-set, csv-non-numeric-labels: counted by inspect, kept as str labels by the model."""
    code, out, err = _run(capsys, "inspect", "--data", corpus.images, "--csv", corpus.messy, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["labels_per_row"]["0"] == 1
    assert set(summary["label_counts"]) == {"car", "dog", "kite", "person"}
    from fuselabel.estimator import FuseLabel

    model = FuseLabel.from_pretrained(corpus.model)
    assert model.labels_ == ["car", "dog", "kite", "person"]


def test_csv_unseen_label_at_evaluate(corpus, tmp_path, capsys):
    """csv-unseen-label: a label the model was not trained on is named once and counted as missed."""
    rows = corpus.rows[:6]
    csv = tmp_path / "labelled.csv"
    lines = [_labelled_line(r) for r in rows]
    clean = tmp_path / "clean.csv"
    clean.write_text("ImageID,Labels,Caption\n" + "\n".join(lines) + "\n")
    lines[3] = _labelled_line(rows[3], labels=" ".join(WORDS[x] for x in rows[3].labels) + " zebra")
    csv.write_text("ImageID,Labels,Caption\n" + "\n".join(lines) + "\n")
    reports = {}
    for name, table in (("clean", clean), ("zebra", csv)):
        out = tmp_path / f"{name}.json"
        code, stdout, err = _run(
            capsys, "evaluate", corpus.model, "--data", corpus.images, "--csv", table, "--json", out, *PREDICT
        )
        assert code == 0, err
        reports[name] = json.loads(out.read_text())
    assert "never saw (zebra) on 1 row(s): counted as missed" in stdout
    assert reports["zebra"]["unseen_labels"] == ["zebra"]
    assert reports["zebra"]["mean_f1"] < reports["clean"]["mean_f1"]


def test_csv_cases_any_table_reader_accepts(corpus, tmp_path, capsys):
    """csv-extra-column-header, csv-columns-reordered, csv-malformed-labels: the course reader refuses them,
    but they are ordinary tables: an unused column is listed, columns are found by name, and ``;`` is a
    label separator."""
    for case, check in (
        ("csv-extra-column-header", "not used: 'Source'"),
        ("csv-columns-reordered", "photo 'ImageID'"),
        ("csv-malformed-labels", "separated by ';'"),
    ):
        csv = _bad_csv(tmp_path, CSV_ERRORS[case].labelled)
        with pytest.raises(RecordsError):
            read_records(csv)
        code, out, err = _run(capsys, "inspect", "--data", corpus.images, "--csv", csv)
        assert code == 0 and "Bad rows:  0" in out and check in out, (case, err, out)


# ---------------------------------------------------------------------------------------------------------------
# CSV: named errors


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class CsvCase:
    labelled: bytes  # for train and inspect
    unlabelled: bytes | None  # for predict (None: the problem needs a Labels column)
    fragments: list[str]  # what the message must say (the file is called bad.csv)
    row_level: bool  # inspect lists it as a bad row (exit 0) instead of refusing the file
    course_only: list[str] | None = None  # what the course reader (read_records) says, where it differs
    a_table: bool = False  # refused by the course reader only: an ordinary table to the commands


H, U = "ImageID,Labels,Caption\n", "ImageID,Caption\n"
CSV_ERRORS = {
    "csv-duplicate-id": CsvCase(
        (H + '0.jpg,person,"a"\n1.jpg,dog,"b"\n0.jpg,car,"c"\n').encode(),
        (U + '0.jpg,"a"\n1.jpg,"b"\n0.jpg,"c"\n').encode(),
        ["bad.csv:4", "duplicate ImageID 0.jpg, first at line 2", "keep one of the two rows"],
        True,
    ),
    "csv-missing-column-header": CsvCase(
        b"ImageID,Labels\n0.jpg,person\n1.jpg,dog\n",
        b"ImageID\n0.jpg\n",
        ["bad.csv:1", "found no text column", "'ImageID'", "--text-col"],
        False,
        ["bad.csv:1", "missing column(s) Caption", "expected 'ImageID,Labels,Caption'"],
    ),
    "csv-missing-column-row": CsvCase(
        (H + '0.jpg,person,"a"\n1.jpg,"b"\n').encode(),
        (U + '0.jpg,"a"\n1.jpg\n').encode(),
        ["bad.csv:3", "expected ImageID,"],
        True,
    ),
    "csv-extra-column-header": CsvCase(
        (H.strip() + ",Source\n" + '0.jpg,person,"a",web\n').encode(),
        (U.strip() + ',Source\n0.jpg,"a",web\n').encode(),
        ["bad.csv:1", "unexpected column(s) Source", "remove them"],
        False,
        a_table=True,
    ),
    "csv-extra-column-row": CsvCase(
        (H + '0.jpg,person,"a",web\n1.jpg,dog,"b"\n').encode(),
        (U + '0.jpg,"a",web\n1.jpg,"b"\n').encode(),
        ["bad.csv:2", "text follows its closing quote: an extra column?"],
        True,
    ),
    "csv-columns-reordered": CsvCase(
        b'ImageID,Caption,Labels\n0.jpg,"a",person\n',
        b'Caption,ImageID\n"a",0.jpg\n',
        ["bad.csv:1", "columns in another order", "the caption must come last"],
        False,
        a_table=True,
    ),
    "csv-malformed-labels": CsvCase(
        (H + '0.jpg,person,"a"\n1.jpg,person;dog,"b"\n').encode(),
        None,
        ["bad.csv:3", "malformed labels 'person;dog'"],
        True,
        a_table=True,
    ),
    "csv-non-utf8": CsvCase(
        (H + '0.jpg,person,"a"\n1.jpg,dog,"caf\xe9"\n').encode("latin-1"),
        (U + '0.jpg,"a"\n1.jpg,"caf\xe9"\n').encode("latin-1"),
        ["bad.csv:3", "not valid UTF-8", "save the file as UTF-8"],
        False,
    ),
    "csv-truncated-last-line": CsvCase(
        (H + '0.jpg,person,"a"\n1.jpg,dog,"a dog on the gra').encode(),
        (U + '0.jpg,"a"\n1.jpg,"a dog on the gra').encode(),
        ["bad.csv:3", "the file ends inside it: truncated file?"],
        True,
    ),
    "csv-empty-file": CsvCase(b"", b"", ["bad.csv:1", "empty file", "'ImageID,Labels,Caption'"], False),
    "csv-not-csv": CsvCase(_png_bytes(), _png_bytes(), ["bad.csv:1", "not a CSV text file", "a PNG image"], False),
}


def _bad_csv(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.csv"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(CSV_ERRORS))
def test_csv_error_api(tmp_path, case):
    c = CSV_ERRORS[case]
    for data in [d for d in (c.labelled, c.unlabelled) if d is not None]:
        with pytest.raises(RecordsError) as err:
            read_records(_bad_csv(tmp_path, data))
        for fragment in c.course_only or c.fragments:
            assert fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.parametrize("case", [k for k, c in CSV_ERRORS.items() if not c.a_table])
def test_csv_error_train(corpus, tmp_path, capsys, case):
    csv = _bad_csv(tmp_path, CSV_ERRORS[case].labelled)
    code, _, err = _run(capsys, "train", "--data", corpus.images, "--csv", csv, "--out", tmp_path / "m", *TINY_TRAIN)
    _assert_named_error(code, err, CSV_ERRORS[case].fragments)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("case", [k for k, c in CSV_ERRORS.items() if c.unlabelled is not None and not c.a_table])
def test_csv_error_predict(corpus, tmp_path, capsys, case):
    csv = _bad_csv(tmp_path, CSV_ERRORS[case].unlabelled)
    sub = tmp_path / "submission.csv"
    code, _, err = _run(capsys, "predict", corpus.model, "--data", corpus.images, "--csv", csv, "--out", sub, *PREDICT)
    _assert_named_error(code, err, CSV_ERRORS[case].fragments)
    assert not sub.exists()


@pytest.mark.parametrize("case", [k for k, c in CSV_ERRORS.items() if not c.a_table])
def test_csv_error_inspect(corpus, tmp_path, capsys, case):
    c = CSV_ERRORS[case]
    code, out, err = _run(capsys, "inspect", "--data", corpus.images, "--csv", _bad_csv(tmp_path, c.labelled))
    if c.row_level:  # inspect's job is to show what was read: the bad row is listed, the rest summarised
        assert code == 0 and "Bad rows:  1" in out, err
        for fragment in c.fragments:
            assert fragment in out, (fragment, out)
    else:
        _assert_named_error(code, err, c.fragments)


def test_csv_header_only(corpus, tmp_path, capsys):
    """csv-header-only: nothing to train on is an error; predict writes an empty submission, 0 rows counted."""
    csv = tmp_path / "bad.csv"
    csv.write_text("ImageID,Labels,Caption\n")
    assert len(read_records(csv)) == 0
    code, _, err = _run(capsys, "train", "--data", corpus.images, "--csv", csv, "--out", tmp_path / "m", *TINY_TRAIN)
    _assert_named_error(code, err, ["bad.csv: 0 row(s) after the header", "at least two labelled rows"])
    code, out, _ = _run(capsys, "inspect", "--data", corpus.images, "--csv", csv)
    assert code == 0 and "Rows:      0 (labelled)" in out

    sub = tmp_path / "submission.csv"
    csv.write_text("ImageID,Caption\n")
    code, out, err = _run(
        capsys, "predict", corpus.model, "--data", corpus.images, "--csv", csv, "--out", sub, *PREDICT
    )
    assert code == 0 and ": 0 rows" in out, err
    assert sub.read_text() == "ImageID,Labels\n"


def test_csv_error_in_a_real_process(corpus, tmp_path):
    """The command as a user runs it: exit status 2 and a one-message stderr, no traceback."""
    csv = _bad_csv(tmp_path, CSV_ERRORS["csv-not-csv"].labelled)
    done = subprocess.run(
        [sys.executable, "-m", "fuselabel.cli", "inspect", "--data", str(corpus.images), "--csv", str(csv)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr == (
        "fuselabel: error: " + str(csv) + ":1: not a CSV text file (it looks like a PNG image); "
        "pass the table (CSV, TSV, JSON, JSON Lines, Parquet or .xlsx)\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Photos


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width x height``, no pixel data: a bomb in 57 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _two_halves(size=(40, 20)) -> Image.Image:
    """Red left half, blue right half: orientation and colour are both checkable."""
    img = Image.new("RGB", size, (220, 30, 30))
    img.paste((30, 30, 220), (size[0] // 2, 0, size[0], size[1]))
    return img


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees clockwise
    return _encode(_two_halves(), "JPEG", quality=95, exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 30, 200, 30] + [0] * 762)
    img.paste(1, (10, 0, 20, 20))
    return _encode(img, "PNG", transparency=0)  # left half transparent (black underneath), right half green


PHOTOS_DECODED = {  # case -> (file name, bytes, check of the RGB image load_rgb returns)
    "photo-png-named-jpg": (
        "png.jpg",
        lambda: _encode(_two_halves(), "PNG"),
        lambda a: a.shape == (20, 40, 3) and (a[10, 5] == [220, 30, 30]).all(),
    ),
    "photo-webp-named-jpg": (
        "webp.jpg",
        lambda: _encode(_two_halves(), "WEBP", lossless=True),
        lambda a: a.shape == (20, 40, 3) and (a[10, 35] == [30, 30, 220]).all(),
    ),
    "photo-cmyk": (
        "cmyk.jpg",
        lambda: _encode(_two_halves().convert("CMYK"), "JPEG", quality=95),
        lambda a: a.shape == (20, 40, 3) and abs(a[10, 5].astype(int) - [220, 30, 30]).max() < 30,
    ),
    "photo-grayscale": (
        "grey.jpg",
        lambda: _encode(Image.new("L", (30, 20), 90), "JPEG", quality=95),
        lambda a: a.shape == (20, 30, 3) and abs(a.astype(int) - 90).max() <= 2,
    ),
    "photo-palette-transparency": (
        "palette.png",
        _palette_with_transparency,
        lambda a: (a[5, 2] == 255).all() and (a[5, 15] == [30, 200, 30]).all(),
    ),
    # 30000 of 65535: mid-grey, not clipped to white as a plain convert("RGB") would.
    "photo-16-bit": (
        "grey16.png",
        lambda: _encode(Image.new("I;16", (30, 20), 30000), "PNG"),
        lambda a: abs(a.astype(int) - 117).max() <= 1,
    ),
    "photo-exif-rotated": (
        "rotated.jpg",
        _exif_rotated,  # upright: 20 wide, 40 tall, red on top
        lambda a: a.shape == (40, 20, 3) and a[5, 10, 0] > 150 and a[35, 10, 2] > 150,
    ),
}

PHOTOS_UNUSABLE = {  # case -> (file name, how to make it, what the reason must say)
    "photo-missing": ("missing.jpg", None, "image missing"),
    "photo-zero-byte": ("zero.jpg", lambda p: p.write_bytes(b""), "empty file"),
    "photo-truncated": (
        "truncated.jpg",
        lambda p: p.write_bytes(_encode(_two_halves((200, 200)), "JPEG", quality=95)[:1500]),
        "truncated or corrupt",
    ),
    "photo-not-an-image": ("text.jpg", lambda p: p.write_text("not a photo at all\n"), "not an image format"),
    "photo-decompression-bomb": (
        "bomb.png",
        lambda p: p.write_bytes(_png_header_only(20000, 20000)),
        "too large: 400 megapixels, over the 64-megapixel limit",
    ),
    "photo-folder": ("folder.jpg", lambda p: p.mkdir(), "a folder, not a photo"),
}

ROOT_READS_ANYTHING = hasattr(os, "geteuid") and os.geteuid() == 0


def _write_photos(image_dir: Path) -> dict[str, str]:
    """Every photo case into ``image_dir``; returns case -> ImageID."""
    ids = {}
    for case, (name, make, _) in PHOTOS_DECODED.items():
        (image_dir / name).write_bytes(make())
        ids[case] = name
    for case, (name, make, _) in PHOTOS_UNUSABLE.items():
        if make is not None:
            make(image_dir / name)
        ids[case] = name
    return ids


@pytest.fixture(scope="module")
def photos(corpus, tmp_path_factory):
    """A copy of the tiny photos plus every photo case; a test CSV of the cases then ten good rows."""
    image_dir = tmp_path_factory.mktemp("photos") / "data"
    shutil.copytree(corpus.images, image_dir)
    ids = _write_photos(image_dir)
    good = corpus.rows[:10]
    caption = {r.image_id: r.caption for r in corpus.rows}
    cases = list(ids)
    csv = image_dir.parent / "test.csv"
    csv.write_text(
        "ImageID,Caption\n"
        + "".join(f'{ids[c]},"a photo of a dog"\n' for c in cases)
        + "".join(f'{r.image_id},"{caption[r.image_id]}"\n' for r in good)
    )
    return SimpleNamespace(images=image_dir, ids=ids, cases=cases, csv=csv, good=good)


@pytest.mark.parametrize("case", list(PHOTOS_DECODED))
def test_photo_decoded_api(photos, case):
    name, make, check = PHOTOS_DECODED[case]
    path = photos.images / name
    with Image.open(path) as pil:
        for source in (path, path.read_bytes(), pil):  # path | bytes | PIL image
            img = load_rgb(source)
            assert img.mode == "RGB"
            assert check(np.asarray(img)), (case, type(source).__name__)


@pytest.mark.parametrize("case", list(PHOTOS_UNUSABLE))
def test_photo_unusable_api(photos, case):
    name, _, reason = PHOTOS_UNUSABLE[case]
    path = photos.images / name
    with pytest.raises(ImageError) as err:
        load_rgb(path)
    message = str(err.value)
    assert message.startswith(f"{path}: image ") and "; " in message  # the file, the problem, what to do
    assert reason in message, message


def test_photo_pixel_limit_is_a_setting(tmp_path):
    """photo-decompression-bomb: the limit is fuselabel's own (MAX_PIXELS), not PIL's warning."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (100, 80), (1, 2, 3)).save(path, "JPEG")
    assert check_image(path) == (100, 80) and MAX_PIXELS == 64_000_000
    with pytest.raises(ImageError, match=r"big\.jpg: image too large: 100 x 80 = 0 megapixels"):
        load_rgb(path, max_pixels=5_000)
    assert load_rgb(path, max_pixels=8_000).size == (100, 80)
    with pytest.raises(ImageError, match="9000 x 8000 = 72 megapixels, over the 64-megapixel limit"):
        load_rgb(_png_header_only(9000, 8000))  # above our limit, below PIL's own warning


def test_photo_unreadable_file(photos, tmp_path, monkeypatch):
    """photo-unreadable: permission denied is named as such."""
    path = tmp_path / "locked.jpg"
    path.write_bytes(_encode(_two_halves(), "JPEG"))
    if ROOT_READS_ANYTHING:
        # chmod 000 does not stop root from reading: simulate the refusal the way the OS reports it.
        real_open = Image.open

        def refusing_open(fp, *args, **kwargs):
            if Path(str(fp)) == path:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", refusing_open)
    else:
        path.chmod(0)
    with pytest.raises(ImageError, match=rf"{path.name}: image unreadable: permission denied; make the file"):
        load_rgb(path)


@pytest.mark.skipif(
    ROOT_READS_ANYTHING,
    reason="running as root: chmod 000 does not stop reading (the "
    "refusal itself is tested by test_photo_unreadable_file)",
)
def test_photo_unreadable_file_cli(corpus, photos, tmp_path, capsys):
    image_dir = tmp_path / "data"
    shutil.copytree(photos.images, image_dir, ignore=shutil.ignore_patterns("folder.jpg"))
    (image_dir / "0.jpg").chmod(0)
    csv = tmp_path / "test.csv"
    csv.write_text(_unlabelled(corpus.rows[:4]))
    proba = tmp_path / "proba.csv"
    code, out, err = _run(
        capsys,
        "predict",
        corpus.model,
        "--data",
        image_dir,
        "--csv",
        csv,
        "--out",
        tmp_path / "s.csv",
        "--proba",
        proba,
        *PREDICT,
    )
    assert code == 0 and "1 rows predicted from the caption alone" in out, err
    assert proba.read_text().splitlines()[1].endswith(",caption_only")


def test_photos_at_predict(corpus, photos, tmp_path, capsys):
    """Every photo case in one prediction: decodable ones are used, unusable ones fall back to the caption,
    counted in the summary and flagged per row in the --proba file's input column."""
    sub, proba = tmp_path / "submission.csv", tmp_path / "proba.csv"
    code, out, err = _run(
        capsys,
        "predict",
        corpus.model,
        "--data",
        photos.images,
        "--csv",
        photos.csv,
        "--out",
        sub,
        "--proba",
        proba,
        *PREDICT,
    )
    assert code == 0, err
    n_unusable = len(PHOTOS_UNUSABLE)
    assert f"{n_unusable} rows predicted from the caption alone (no usable photo)" in out
    cells = [line.split(",") for line in proba.read_text().splitlines()[1:]]
    inputs = {row[0]: row[-1] for row in cells}  # the last column says which inputs each row was predicted from
    for case in photos.cases:
        expected = "caption_only" if case in PHOTOS_UNUSABLE else "ok"
        assert inputs[photos.ids[case]] == expected, case
    labels = {line.split(",")[0]: line.split(",")[1] for line in sub.read_text().splitlines()[1:]}
    assert all(labels[photos.ids[c]] for c in photos.cases)  # caption-only rows still get labels


def test_photos_at_predict_api(corpus, photos):
    """The same through FuseLabel.predict_details: status and the reason per row."""
    from fuselabel.estimator import FuseLabel

    model = FuseLabel.from_pretrained(corpus.model, num_workers=1)
    paths = [photos.images / photos.ids[c] for c in photos.cases]
    p = model.predict_details(paths, ["a photo of a dog"] * len(paths))
    for i, case in enumerate(photos.cases):
        if case in PHOTOS_UNUSABLE:
            assert p.status[i] == "caption_only" and not p.image_present[i], case
            assert PHOTOS_UNUSABLE[case][2] in p.image_errors[i], (case, p.image_errors[i])
            assert photos.ids[case] in p.image_errors[i]  # the file is named
        else:
            assert p.status[i] == "ok" and p.image_errors[i] is None, (case, p.image_errors[i])
    assert np.isfinite(p.probs).all()
    # Bytes and PIL images take the same door.
    data = (photos.images / photos.ids["photo-zero-byte"]).read_bytes()
    with Image.open(photos.images / photos.ids["photo-cmyk"]) as pil:
        q = model.predict_details([pil, data], ["a dog", "a dog"])
    assert q.status == ["ok", "caption_only"]


def test_photos_at_predict_strict(corpus, photos, tmp_path, capsys):
    """--strict turns the fallback into a named error."""
    sub = tmp_path / "s.csv"
    code, _, err = _run(
        capsys,
        "predict",
        corpus.model,
        "--data",
        photos.images,
        "--csv",
        photos.csv,
        "--out",
        sub,
        "--strict",
        *PREDICT,
    )
    first = photos.ids[next(c for c in photos.cases if c in PHOTOS_UNUSABLE)]
    _assert_named_error(code, err, [first, "CSV line", "drop --strict"])
    assert not sub.exists()


def test_photos_at_inspect(corpus, photos, capsys):
    code, out, err = _run(capsys, "inspect", "--data", photos.images, "--csv", photos.csv, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["missing_images"] == 1 and summary["missing_images_first"] == [photos.ids["photo-missing"]]
    unreadable = dict(entry.split(": ", 1) for entry in summary["unreadable_images_first"])
    expected = {photos.ids[c] for c in PHOTOS_UNUSABLE} - {photos.ids["photo-missing"]}
    assert set(unreadable) == expected and summary["unreadable_images"] == len(expected)
    for case in PHOTOS_UNUSABLE:
        if case != "photo-missing":
            assert PHOTOS_UNUSABLE[case][2] in unreadable[photos.ids[case]], (case, unreadable)
    # Header-only checking (quick) finds all but the truncated file.
    quick = summarize(read_records(photos.csv), photos.images, decode_images=False)
    assert quick["unreadable_images"] == len(expected) - 1


def _training_csv(path: Path, rows, extra_ids) -> Path:
    lines = [f'{i},dog,"a photo of a dog"' for i in extra_ids] + [_labelled_line(r) for r in rows]
    path.write_text("ImageID,Labels,Caption\n" + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", list(PHOTOS_UNUSABLE))
def test_photo_unusable_at_train(corpus, photos, tmp_path, capsys, case):
    """A photo that cannot be used is an error naming the row, its CSV line and the file."""
    csv = _training_csv(tmp_path / "train.csv", corpus.rows[:12], [photos.ids[case]])
    code, _, err = _run(
        capsys,
        "train",
        "--data",
        photos.images,
        "--csv",
        csv,
        "--out",
        tmp_path / "m",
        "--cache-dir",
        corpus.cache,
        *TINY_TRAIN,
    )
    _assert_named_error(
        code,
        err,
        [
            photos.ids[case],
            f"row {photos.ids[case]} (CSV line 2)",
            PHOTOS_UNUSABLE[case][2],
            "--missing-images caption_only",
        ],
    )
    assert not (tmp_path / "m").exists()


def test_photos_at_train(corpus, photos, tmp_path, capsys, caplog):
    """Decodable odd photos train; with missing_images: caption_only the unusable ones fall back, counted."""
    decoded = [photos.ids[c] for c in PHOTOS_DECODED]
    unusable = [photos.ids[c] for c in PHOTOS_UNUSABLE]
    csv = _training_csv(tmp_path / "train.csv", corpus.rows[:16], decoded)
    code, out, err = _run(
        capsys,
        "train",
        "--data",
        photos.images,
        "--csv",
        csv,
        "--out",
        tmp_path / "m1",
        "--cache-dir",
        corpus.cache,
        *TINY_TRAIN,
    )
    assert code == 0, err
    assert f"{16 + len(decoded)} rows" in out

    csv = _training_csv(tmp_path / "train2.csv", corpus.rows[:16], unusable)
    with caplog.at_level("WARNING", logger="fuselabel.features"):
        code, out, err = _run(
            capsys,
            "train",
            "--data",
            photos.images,
            "--csv",
            csv,
            "--out",
            tmp_path / "m2",
            "--cache-dir",
            tmp_path / "cache",
            "--missing-images",
            "caption_only",
            *TINY_TRAIN,
        )
    assert code == 0, err
    assert (
        f"{len(unusable)} of {16 + len(unusable)} rows have no usable photo and train on their caption alone"
        in caplog.text
    )


# ---------------------------------------------------------------------------------------------------------------
# Settings

SETTING_ERRORS = {  # case -> (command-line options, what stderr must name)
    "setting-string-for-number": (["--set", "epochs=ten"], ["epochs", "'ten'", "integer"]),
    "setting-negative-size": (["--set", "batch_size=-3"], ["batch_size", "-3", "greater than 0"]),
    "setting-unknown-key": (["--set", "no_such_key=1"], ["no_such_key", "unknown setting"]),
    "setting-unknown-preset": (["--preset", "no-such-preset"], ["no-such-preset", "unknown preset", "cpu-fast"]),
}


@pytest.mark.parametrize("case", list(SETTING_ERRORS))
def test_setting_error_cli(corpus, tmp_path, capsys, case):
    options, fragments = SETTING_ERRORS[case]
    code, _, err = _run(
        capsys, "train", "--data", corpus.images, "--csv", corpus.messy, "--out", tmp_path / "m", *options
    )
    _assert_named_error(code, err, fragments)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("case", list(SETTING_ERRORS))
def test_setting_error_api(case):
    options, fragments = SETTING_ERRORS[case]
    from fuselabel.cli import _kv
    from fuselabel.estimator import FuseLabel

    preset = options[1] if options[0] == "--preset" else None
    settings = dict([_kv(options[1])]) if options[0] == "--set" else {}
    for make in (lambda: build_config(preset, **settings), lambda: FuseLabel(preset=preset, **settings).get_config()):
        with pytest.raises(ValueError) as err:
            make()
        for fragment in fragments:
            assert fragment in str(err.value), (fragment, str(err.value))


def test_setting_error_on_the_command_line_flag(corpus, tmp_path, capsys):
    """A typed flag (--epochs ten) is refused by the argument parser: usage error, exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(corpus.images), "--out", str(tmp_path / "m"), "--epochs", "ten"])
    assert exit_.value.code == 2
    _, err = capsys.readouterr()
    assert "--epochs" in err and "'ten'" in err and "Traceback" not in err


def test_every_documented_case_is_tested():
    """Each case id in docs/bad-inputs.md's tables is a test parameter or named in a test's docstring in this file."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md").read_text()
    documented = set(re.findall(r"^\| `((?:csv|photo|setting)-[a-z0-9-]+)` \|", doc, re.M))
    tests_text = Path(__file__).read_text()
    assert len(documented) >= 35 and not [case for case in sorted(documented) if case not in tests_text]
    parametrized = set(READS_FINE) | set(CSV_ERRORS) | set(PHOTOS_DECODED) | set(PHOTOS_UNUSABLE) | set(SETTING_ERRORS)
    assert parametrized <= documented
