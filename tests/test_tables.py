"""Users' own tables: standard CSV / TSV, JSON Lines, Parquet and DataFrames, labels by name, own columns and splits.

The data sets are made here and differ from the course in every way that matters: label names with spaces,
commas, quotes and other scripts; texts with ``""`` escapes, commas and line breaks; long texts; photos in
nested folders as PNG, WebP and JPEG, some given by absolute path; column names of the user's choosing.
"""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SETTINGS, make_tiny_dataset, shared_data_or_skip
from PIL import Image

from fuselabel import FuseLabel
from fuselabel.cli import main
from fuselabel.labels import read_label_names
from fuselabel.records import RecordsError, read_records
from fuselabel.tables import Columns, find_label_sep, iter_table, read_table

NAMES = {"1": "traffic light", "2": "fire hydrant", "3": "café, au lait", "4": 'the "kite"'}
FORMATS = ("csv", "tsv", "jsonl", "parquet")


def _user_rows(tmp_path, n: int = 48):
    """A product-style table: nested photos in three formats (one absolute path), named labels, awkward texts."""
    image_dir, course_csv = make_tiny_dataset(tmp_path / "course", n)
    course = read_records(course_csv)
    root = tmp_path / "shop"
    rows = []
    for i, r in enumerate(course.records):
        img = Image.open(image_dir / r.image_id).convert("RGB")
        ext = ("png", "webp", "jpg")[i % 3]
        rel = f"items/{('red', 'blue')[i % 2]}/{i}/photo.{ext}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
        title = r.caption.replace("\n", " ")
        if i % 5 == 0:
            title = f'{title}, says "hello, world"'
        if i % 7 == 0:
            title = f"{title}\nsecond line"
        rows.append(
            {
                "sku": f"SKU-{i:03d}",
                "name": title,
                "details": ("long text " * (40 if i % 4 == 0 else 1)).strip(),
                "picture": str(root / rel) if i == 5 else rel,
                "tags": [NAMES[t] for t in r.labels],
            }
        )
    return root, pd.DataFrame(rows)


def _write(df: pd.DataFrame, path, fmt: str, sep: str = "|"):
    flat = df.assign(tags=[sep.join(t) for t in df["tags"]])
    if fmt == "csv":
        flat.to_csv(path, index=False)
    elif fmt == "tsv":
        flat.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        df.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def user_table(tmp_path_factory):
    return _user_rows(tmp_path_factory.mktemp("user"))


def test_every_format_reads_exactly_the_same_rows(user_table, tmp_path):
    root, df = user_table
    cols = Columns.of(image_col="picture", text_col=["name", "details"], label_col="tags", id_col="sku")
    want = [(row.sku, row.picture, row.name + "\n" + row.details, tuple(row.tags)) for row in df.itertuples()]
    for fmt in FORMATS:
        table = read_table(_write(df, tmp_path / f"t.{fmt}", fmt), cols)
        got = [(r.id, r.image_id, r.caption, r.labels) for r in table.records]
        assert got == want, fmt
        assert table.table["format"] == fmt
    frame = read_table(df, cols)
    assert [(r.id, r.image_id, r.caption, r.labels) for r in frame.records] == want


def test_standard_csv_with_course_header_is_not_read_as_the_course_dialect(tmp_path):
    """A file written by pandas/csv with the course's header escapes an inner quote as "": read it back as one."""
    captions = ['a sign that reads "stop, now"', "plain", 'two\nlines and "quotes"']
    frame = pd.DataFrame({"ImageID": ["1.jpg", "2.jpg", "3.jpg"], "Labels": ["1", "2 3", "1"], "Caption": captions})
    frame.to_csv(tmp_path / "std.csv", index=False)
    table = read_table(tmp_path / "std.csv")
    assert table.table["format"] == "csv"
    assert [r.caption for r in table.records] == captions
    assert [r.labels for r in table.records] == [("1",), ("2", "3"), ("1",)]
    # the course dialect (quotes left unescaped) keeps being read as released
    (tmp_path / "course.csv").write_text('ImageID,Labels,Caption\n1.jpg,1,"a sign that reads "stop, now""\n')
    course = read_table(tmp_path / "course.csv")
    assert course.table["format"] == "course"
    assert course.records[0].caption == 'a sign that reads "stop, now"'


def test_columns_are_found_or_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"image": "x.jpg", "text": "a dog", "labels": ["dog"]}\n')
    table = read_table(tmp_path / "a.jsonl")
    assert (table.table["image_col"], table.table["text_cols"], table.table["label_col"]) == (
        "image",
        ["text"],
        "labels",
    )
    with pytest.raises(RecordsError, match=r"no column 'photo'.*--image-col"):
        read_table(tmp_path / "a.jsonl", Columns.of(image_col="photo"))
    (tmp_path / "b.csv").write_text("pic,words\nx.jpg,a dog\n")
    with pytest.raises(RecordsError, match=r"found no column for the photo.*'pic', 'words'.*--image-col"):
        read_table(tmp_path / "b.csv")
    with pytest.raises(ValueError, match="columns have no names"):
        read_table(pd.DataFrame([["x.jpg", "a dog"]]))


@pytest.mark.parametrize("name", ["dup.csv", "dup.jsonl", "course.csv"])
def test_a_second_read_remembers_no_ids(tmp_path, name):
    """predict's chunk pass reads a table its first pass checked: duplicates were refused then, so it keeps no ids."""
    path = tmp_path / name
    if name == "dup.jsonl":
        path.write_text('{"image": "1.jpg", "text": "a"}\n{"image": "1.jpg", "text": "b"}\n')
    elif name == "course.csv":
        path.write_text('ImageID,Labels,Caption\n1.jpg,1,"a"\n1.jpg,2,"b"\n')
    else:
        path.write_text("image,text\n1.jpg,a\n1.jpg,b\n")
    checked = list(iter_table(path, strict=False))
    reasons = [b.reason.split(",")[0] for batch in checked for b in batch.bad_rows]
    assert len(reasons) == 1 and reasons[0].startswith("duplicate ") and reasons[0].endswith(" 1.jpg")
    again = list(iter_table(path, strict=False, check_ids=False))
    assert [r.caption for batch in again for r in batch.records] == ["a", "b"]
    assert not any(batch.bad_rows for batch in again)


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "1.jpg", "text": "ok", "labels": []}\nnot json\n')
    with pytest.raises(RecordsError, match=r"bad.jsonl:2: not valid JSON"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "dup.csv").write_text("image,text\n1.jpg,a\n1.jpg,b\n")
    with pytest.raises(RecordsError, match=r"dup.csv:3: duplicate image 1.jpg, first at line 2.*--id-col"):
        read_table(tmp_path / "dup.csv")
    (tmp_path / "quote.csv").write_text('image,text\n1.jpg,"open quote\n')
    with pytest.raises(RecordsError, match=r"quote.csv:2"):
        read_table(tmp_path / "quote.csv")
    (tmp_path / "split.csv").write_text("image,text,part\n1.jpg,a,train\n2.jpg,b,later\n")
    with pytest.raises(RecordsError, match=r"split.csv:3.*'later'.*train, val, test"):
        read_table(tmp_path / "split.csv", Columns.of(split_col="part"))


@pytest.mark.parametrize(
    "fields, sep",
    [
        (["1 3", "2", "19"], " "),  # the course's ids
        (["traffic light", "fire hydrant"], None),  # one name with a space per row
        (["dog cat", "dog", "cat"], " "),  # words that are each a label alone
        (["traffic light|dog", "dog"], "|"),
        (["a;b", "c"], ";"),
        (["a,b", "c"], ","),
        (["dog", "cat"], None),
    ],
)
def test_label_separator_is_found_from_the_data(fields, sep):
    assert find_label_sep(fields) == sep


@pytest.mark.parametrize(
    "text",
    [
        "Label,Name\n1,person\n2,traffic light\n",
        "id,name\n1,person\n2,traffic light\n",
        "class_id\tclass_name\n1\tperson\n2\ttraffic light\n",
        "1,person\n2,traffic light\n",
        '{"1": "person", "2": "traffic light"}',
    ],
)
def test_label_names_files_with_any_sensible_header(tmp_path, text):
    path = tmp_path / ("names.json" if text.startswith("{") else "names.csv")
    path.write_text(text)
    assert read_label_names(path) == {"1": "person", "2": "traffic light"}


def _predict_rows(path):
    """The rows of an output table (its header names the user's columns; what follows is compared)."""
    return path.read_text().split("\n", 1)[1]


def test_course_model_predicts_every_rewriting_of_the_course_rows_identically(tiny_model, tmp_path):
    """Renamed, reordered columns with "" escapes, JSON Lines and Parquet give the course file's predictions."""
    root, image_dir, course_csv = tiny_model
    model = root / "model"
    rows = read_records(course_csv).records
    frame = pd.DataFrame(
        {
            "text": [r.caption for r in rows],
            "labels": [" ".join(r.labels) for r in rows],
            "photo": [r.image_id for r in rows],
        }
    )
    frame.to_csv(tmp_path / "std.csv", index=False, quoting=csv.QUOTE_ALL)
    frame.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "rows.parquet")
    assert '""no parking, ever""' in (tmp_path / "std.csv").read_text()
    outputs = {}
    for name in ("course", "std.csv", "rows.jsonl", "rows.parquet"):
        table = course_csv if name == "course" else tmp_path / name
        out = tmp_path / f"pred-{name}.csv"
        proba = tmp_path / f"proba-{name}.csv"
        assert (
            main(
                [
                    "predict",
                    str(model),
                    "--data",
                    str(image_dir),
                    "--csv",
                    str(table),
                    "--out",
                    str(out),
                    "--proba",
                    str(proba),
                    "--quiet",
                ]
            )
            == 0
        )
        outputs[name] = (out, proba)
    course_out, course_proba = outputs.pop("course")
    assert course_out.read_text().startswith("ImageID,Labels\n")
    for name, (out, proba) in outputs.items():
        assert out.read_text().startswith("photo,Labels\n"), name
        assert _predict_rows(out) == _predict_rows(course_out), name
        assert _predict_rows(proba) == _predict_rows(course_proba), name


@pytest.fixture(scope="module")
def named_model(user_table, tmp_path_factory, session_cache):
    """A model trained from a JSON Lines table of named labels, nested photos and two text columns."""
    root, df = user_table
    work = tmp_path_factory.mktemp("named")
    table = _write(df, work / "train.jsonl", "jsonl")
    out = work / "model"
    settings = {k: v for k, v in TINY_SETTINGS.items() if k not in ("preset",)}
    code = main(
        [
            "train",
            "--data",
            str(root),
            "--csv",
            str(table),
            "--out",
            str(out),
            "--preset",
            "cpu-fast",
            "--image-col",
            "picture",
            "--text-col",
            "name",
            "--text-col",
            "details",
            "--id-col",
            "sku",
            "--cache-dir",
            session_cache,
            "--quiet",
            *[a for k, v in settings.items() if k != "text_config_overrides" for a in ("--set", f"{k}={v}")],
            "--set",
            "text_config_overrides={num_hidden_layers: 1}",
        ]
    )
    assert code == 0
    return root, df, work, out


def test_training_on_names_speaks_names_everywhere(named_model, tmp_path):
    root, df, work, model_dir = named_model
    labels = json.loads((model_dir / "labels.json").read_text())
    assert labels["labels"] == sorted(NAMES.values())
    assert labels["table"]["label_col"] == "tags" and labels["table"]["text_cols"] == ["name", "details"]
    outs = {}
    for fmt in ("csv", "parquet"):
        table = _write(df, tmp_path / f"in.{fmt}", fmt)
        out = tmp_path / f"out-{fmt}.csv"
        # the model's own columns are the defaults: no column flags needed
        assert (
            main(
                [
                    "predict",
                    str(model_dir),
                    "--data",
                    str(root),
                    "--csv",
                    str(table),
                    "--out",
                    str(out),
                    "--id-col",
                    "sku",
                    "--quiet",
                ]
            )
            == 0
        )
        outs[fmt] = out.read_text()
    assert outs["csv"] == outs["parquet"]
    assert outs["csv"].startswith("sku,tags\n")
    written = list(csv.reader(outs["csv"].splitlines()))[1:]
    predicted = {label for _, labels in written for label in labels.split("|") if label}
    assert predicted <= set(NAMES.values()) and "traffic light" in predicted
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "predict",
                str(model_dir),
                "--data",
                str(root),
                "--csv",
                str(tmp_path / "in.csv"),
                "--out",
                str(out),
                "--id-col",
                "sku",
                "--quiet",
            ]
        )
        == 0
    )
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == {"sku", "tags"} and isinstance(first["tags"], list)


def test_dataframes_in_python(named_model):
    root, df, _, model_dir = named_model
    model = FuseLabel.from_pretrained(model_dir)
    labels = model.predict(df, images=root, text_col=["name", "details"], id_col="sku")
    assert len(labels) == len(df) and all(set(row) <= set(NAMES.values()) for row in labels)
    probs = model.predict_proba(df, images=root, text_col=["name", "details"])
    assert probs.shape == (len(df), 4)
    with pytest.raises(ValueError, match="columns have no names"):
        model.predict(pd.DataFrame(df.to_numpy()), images=root)
    with pytest.raises(RecordsError, match="no column 'nope'"):
        model.predict(df, images=root, image_col="nope")
    report = model.evaluate(df, images=root, text_col=["name", "details"], id_col="sku")
    # the labels follow the names in the captions: a model that read the columns right beats chance clearly
    assert report["mean_f1"] > 0.5, report["mean_f1"]


def test_evaluate_counts_a_label_the_model_never_saw_as_missed(named_model, caplog):
    root, df, _, model_dir = named_model
    model = FuseLabel.from_pretrained(model_dir)
    kw = dict(images=root, text_col=["name", "details"], id_col="sku")
    base = model.evaluate(df, **kw)
    extra = df.assign(tags=[t + ["unicorn"] if i % 2 else t for i, t in enumerate(df["tags"])])
    with caplog.at_level(logging.WARNING, logger="fuselabel"):
        report = model.evaluate(extra, **kw)
    assert "never saw (unicorn)" in caplog.text
    assert report["unseen_labels"] == ["unicorn"]
    assert report["mean_f1"] < base["mean_f1"]


def test_validation_rows_from_a_file_or_a_split_column(user_table, tmp_path, session_cache):
    root, df = user_table
    settings = dict(TINY_SETTINGS, cache_dir=session_cache)
    cols = dict(image_col="picture", text_col="name", id_col="sku")
    train, val = df.iloc[:36], df.iloc[36:]
    model = FuseLabel(**settings).fit(train, images=root, val=val, out=tmp_path / "m1", progress=False, **cols)
    split = json.loads((tmp_path / "m1" / "split.json").read_text())
    assert split["method"] == "val_table" and split["val_ids"] == list(val["sku"])
    assert model.evaluate(df, images=root, split="val", **cols)["rows"] == len(val)
    marked = df.assign(part=["test" if i < 4 else "val" if i % 4 == 0 else "train" for i in range(len(df))])
    FuseLabel(**settings).fit(marked, images=root, split_col="part", out=tmp_path / "m2", progress=False, **cols)
    split = json.loads((tmp_path / "m2" / "split.json").read_text())
    assert split["method"] == "split_column"
    assert split["val_ids"] == list(marked[marked.part == "val"]["sku"])
    assert not set(marked[marked.part == "test"]["sku"]) & set(split["train_ids"] + split["val_ids"])


def test_inspect_says_what_it_found(user_table, tmp_path, capsys):
    root, df = user_table
    table = _write(df, tmp_path / "t.tsv", "tsv", sep=";")
    assert main(["inspect", "--data", str(root), "--csv", str(table), "--image-col", "picture", "--id-col", "sku"]) == 0
    out = capsys.readouterr().out
    assert "Format:    TSV" in out and "photo 'picture'" in out and "separated by ';'" in out
    assert "0 missing" in out and "First rows as read:" in out and "SKU-000" in out
    single = df.assign(tags=[t[:1] for t in df["tags"]])
    _write(single, tmp_path / "one.jsonl", "jsonl")
    assert main(["inspect", "--data", str(root), "--csv", str(tmp_path / "one.jsonl"), "--image-col", "picture"]) == 0
    assert "--task multiclass" in capsys.readouterr().out


def test_the_course_rows_rewritten_read_back_exactly():
    """All the real rows, rewritten by pandas as a standard CSV, JSON Lines and Parquet, with named labels."""
    data = shared_data_or_skip("course rows rewritten in other formats")
    course = read_table(data / "train.csv")
    assert course.table["format"] == "course"
    names = read_label_names(data / "label_names.csv")
    frame = pd.DataFrame(
        {
            "caption": [r.caption for r in course.records],
            "objects": [[names[t] for t in r.labels] for r in course.records],
            "image": [r.image_id for r in course.records],
        }
    )
    want = [(r.image_id, r.caption, tuple(names[t] for t in r.labels)) for r in course.records]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            path = _write(frame.rename(columns={"objects": "tags"}), Path(tmp) / f"rows.{fmt}", fmt)
            table = read_table(path)
            assert [(r.image_id, r.caption, r.labels) for r in table.records] == want, fmt
    assert np.mean(['"' in c for c in frame["caption"]]) > 0  # quotes inside captions were in play
