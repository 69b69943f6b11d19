"""Tables as spreadsheets write them, and tables of any size.

A ``;`` CSV with a byte-order mark and CRLF line ends (Excel and LibreOffice in much of Europe), a ``|`` CSV, a
JSON array and an ``.xlsx`` workbook give the same rows, and the same label matrix training builds, as the
standard CSV; a label column with a few rows written with another separator is read by its majority and those
rows are named; a table read a batch at a time gives the same records as a whole read, in bounded memory.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import shared_data_or_skip

from fuselabel.cli import main
from fuselabel.inspection import format_summary, inspect_table
from fuselabel.labels import label_vocabulary, labels_to_matrix
from fuselabel.records import RecordsError
from fuselabel.tables import Columns, iter_table, read_table
from fuselabel.textfile import SeenIds

ROWS = [
    {"image": "a/1.jpg", "text": 'a sign that reads "stop; now", twice', "tags": "traffic light|dog"},
    {"image": "2.jpg", "text": "two\nlines, with a | bar", "tags": "café, au lait"},
    {"image": "3.jpg", "text": "", "tags": ""},
    {"image": "4.jpg", "text": "plain", "tags": "dog|café, au lait|cat"},
    {"image": "5.jpg", "text": "ünïcode – ok", "tags": "cat"},
]


def _rows(table):
    return [(r.id, r.image_id, r.caption, r.labels) for r in table.records]


def _training_labels(path, **reader):
    """Labels as training builds them: the same reader, then the vocabulary and the label matrix."""
    table = read_table(path, need_labels=True, **reader)
    vocab = label_vocabulary(table.label_sets)
    return vocab, labels_to_matrix(table.label_sets, vocab).tolist()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spreadsheets")
    frame = pd.DataFrame(ROWS)
    frame.to_csv(folder / "standard.csv", index=False)
    text = frame.to_csv(index=False, sep=";", lineterminator="\r\n")
    (folder / "europe.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    frame.to_csv(folder / "pipes.txt", index=False, sep="|")
    (folder / "array.json").write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")
    with pd.ExcelWriter(folder / "book.xlsx") as book:
        pd.DataFrame({"note": ["not this sheet"]}).to_excel(book, sheet_name="notes", index=False)
        frame.to_excel(book, sheet_name="items", index=False)
    return folder


def test_spreadsheet_formats_read_the_same_rows_and_labels(written):
    standard = read_table(written / "standard.csv")
    want = _rows(standard)
    assert want[1][2] == "two\nlines, with a | bar" and want[3][3] == ("dog", "café, au lait", "cat")
    assert standard.table["label_sep"] == "|"
    labels = _training_labels(written / "standard.csv")
    for name, reader, fmt in [
        ("europe.csv", {}, "csv"),
        ("pipes.txt", {}, "csv"),
        ("array.json", {}, "json"),
        ("book.xlsx", {"sheet": "items"}, "xlsx"),
        ("book.xlsx", {"sheet": 1}, "xlsx"),
        ("europe.csv", {"delimiter": "semicolon"}, "csv"),
    ]:
        table = read_table(written / name, **reader)
        assert _rows(table) == want, (name, reader)
        assert table.table["format"] == fmt
        assert _training_labels(written / name, **reader) == labels, name
    assert read_table(written / "europe.csv").table["delimiter"] == ";"
    assert read_table(written / "pipes.txt").table["delimiter"] == "|"


def test_a_given_delimiter_overrides_the_sniffed_one(written):
    with pytest.raises(RecordsError, match=r"found no column for the photo"):
        read_table(written / "europe.csv", delimiter=",")
    with pytest.raises(RecordsError, match=r"delimiter 'ab'"):
        read_table(written / "europe.csv", delimiter="ab")


def test_workbook_first_sheet_and_sheet_errors(written):
    with pytest.raises(RecordsError, match=r"found no column for the photo: the table has 'note'"):
        read_table(written / "book.xlsx")  # the first sheet is the notes
    with pytest.raises(RecordsError, match=r"no sheet 'prices'.*'notes', 'items'"):
        read_table(written / "book.xlsx", sheet="prices")
    frame = pd.DataFrame(ROWS[:2] + [{"image": "a/1.jpg", "text": "again", "tags": "dog"}])
    frame.to_excel(written / "dupe.xlsx", index=False)
    # a spreadsheet's own row numbers: the header is row 1, the duplicate is row 4
    with pytest.raises(RecordsError, match=r"dupe.xlsx row 4: duplicate image a/1.jpg, first at row 2"):
        read_table(written / "dupe.xlsx")


def test_json_array_rows_that_are_not_objects_are_named(tmp_path):
    (tmp_path / "t.json").write_text('[{"image": "1.jpg", "text": "a"}, [1, 2], {"image": "3.jpg", "text": "c"}]')
    with pytest.raises(RecordsError, match=r"t.json row 2: expected a JSON object per array item, got list"):
        read_table(tmp_path / "t.json")
    assert [r.image_id for r in read_table(tmp_path / "t.json", strict=False).records] == ["1.jpg", "3.jpg"]
    (tmp_path / "lines.json").write_text('{"image": "1.jpg", "text": "a"}\n{"image": "2.jpg", "text": "b"}\n')
    assert read_table(tmp_path / "lines.json").table["format"] == "jsonl"


def test_a_semicolon_course_style_table_is_not_misread(tmp_path):
    (tmp_path / "t.csv").write_text('ImageID;Labels;Caption\n1.jpg;1 3;"a dog, a cat"\n2.jpg;2;"one; two"\n')
    table = read_table(tmp_path / "t.csv")
    assert table.table["format"] == "csv" and table.table["delimiter"] == ";"
    assert _rows(table) == [("1.jpg", "1.jpg", "a dog, a cat", ("1", "3")), ("2.jpg", "2.jpg", "one; two", ("2",))]


def test_the_label_separator_is_the_majority_and_the_minority_is_named(tmp_path, caplog, capsys):
    lines = ["image,text,tags"] + [f'{i}.jpg,t,"cat;dog"' for i in range(8)]
    lines += ['8.jpg,t,"cat|dog"', '9.jpg,t,"cat,dog"', '10.jpg,t,"just, one label;cat"', "11.jpg,t,cat"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="fuselabel.tables"):
        table = read_table(tmp_path / "t.csv")
    assert table.table["label_sep"] == ";"
    assert {r.image_id: r.labels for r in table.records}["0.jpg"] == ("cat", "dog")
    assert {r.image_id: r.labels for r in table.records}["8.jpg"] == ("cat|dog",)
    assert table.table["label_sep_minority"] == ["line 10: 'cat|dog'", "line 11: 'cat,dog'"]
    assert "t.csv: 2 row(s) hold no ';' between labels" in caplog.text and "line 10: 'cat|dog'" in caplog.text
    assert main(["inspect", "--data", str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "separated by ';'" in out and "2 row(s) written with another separator" in out
    assert "line 11: 'cat,dog'" in out


def test_streamed_batches_are_the_whole_read(tmp_path):
    lines = ["image\ttext\ttags"] + [f'{i}.jpg\t"caption {i}\nline two"\t{i % 3}|x' for i in range(95)]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n")
    batches = list(iter_table(tmp_path / "t.tsv", batch_rows=10))
    assert [len(b) for b in batches] == [10] * 9 + [5]
    assert [r for b in batches for r in b.records] == read_table(tmp_path / "t.tsv").records
    assert batches[-1].records[-1].line == 2 + 2 * 94
    assert all(b.table is batches[0].table for b in batches)
    (tmp_path / "dup.tsv").write_text("\n".join([*lines, "3.jpg\tagain\tx"]) + "\n")
    with pytest.raises(RecordsError, match=r"dup.tsv:192: duplicate image 3.jpg, first at line 8"):
        list(iter_table(tmp_path / "dup.tsv", batch_rows=10))


def test_a_course_file_streamed_is_read_as_released(tmp_path):
    """Cut into batches only where a row starts: captions spanning lines and unescaped quotes survive any cut."""
    rows = [f'{i}.jpg,{i % 5 + 1},"row {i} says "hi, there""' for i in range(40)]
    rows[7] = '7.jpg,1,"a caption\nover\nthree lines"'
    rows[20] = '20.jpg,2 3,"line one\n21.jpg,1,looks like a row but has no quote"'
    text = "ImageID,Labels,Caption\r\n" + "\r\n".join(rows) + '\r\n9.jpg,1,"again"\r\n'
    (tmp_path / "course.csv").write_bytes(text.encode())
    whole = read_table(tmp_path / "course.csv", strict=False)
    assert whole.table["format"] == "course" and whole.records[0].caption == 'row 0 says "hi, there"'
    for size in (1, 3, 7, 100):
        batches = list(iter_table(tmp_path / "course.csv", strict=False, batch_rows=size))
        assert [r for b in batches for r in b.records] == whole.records, size
        assert [b for s in batches for b in s.bad_rows] == whole.bad_rows, size
    assert [(b.line, b.reason.split(" (")[0]) for b in whole.bad_rows] == [
        (24, "unterminated quoted caption"),
        (26, "duplicate ImageID 21.jpg, first at line 25"),  # the line that looked like a row is one
        (45, "duplicate ImageID 9.jpg, first at line 13"),
    ]
    assert {r.image_id: r.caption for r in whole.records}["7.jpg"] == "a caption\nover\nthree lines"


def test_the_course_file_streamed_equals_the_whole_read():
    data = shared_data_or_skip("the course file read a batch at a time")
    whole = read_table(data / "train.csv")
    streamed = [r for b in iter_table(data / "train.csv", batch_rows=999) for r in b.records]
    assert streamed == whole.records and len(streamed) == 20_000
    summary = inspect_table(data / "train.csv", Columns())
    assert summary["rows"] == 20_000 and summary["captions_with_line_breaks"] == 2
    assert "Format:    course CSV" in format_summary(summary)


_PEAK = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    from fuselabel.tables import iter_table, read_table

    def high_water_mb():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    digest, rows = hashlib.sha256(), 0
    before = high_water_mb()
    if sys.argv[2] == "stream":
        batches = iter_table(sys.argv[1], batch_rows=2000)
    else:
        batches = [read_table(sys.argv[1])]
    for batch in batches:
        for r in batch.records:
            digest.update(repr((r.image_id, r.caption, r.labels, r.line)).encode())
            rows += 1
    print(json.dumps({"mb": high_water_mb() - before, "rows": rows, "digest": digest.hexdigest()}))
""")


def _peak(path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PEAK, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_a_large_table_streams_in_bounded_memory(tmp_path):
    n = 150_000
    path = tmp_path / "large.csv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("photo;caption;labels\n")
        for i in range(n):
            f.write(f'{i}.jpg;"row {i}: a fairly long caption, {"with words " * 12}and a ""quote""";a|b{i % 7}\n')
    streamed, whole = _peak(path, "stream"), _peak(path, "whole")
    assert streamed["rows"] == whole["rows"] == n
    assert streamed["digest"] == whole["digest"]
    # The whole read holds every record; the stream one batch and a 12-byte slot for each id seen.
    assert whole["mb"] > 100, whole
    assert streamed["mb"] < 20, streamed


def test_seen_ids_name_the_first_line_of_every_duplicate():
    seen = SeenIds(slots=4)
    ids = [f"{i}.jpg" for i in range(5000)]
    for line, row_id in enumerate(ids, start=2):
        assert seen.line_of(row_id) is None
        seen.add(row_id, line)
    assert [seen.line_of(i) for i in ("0.jpg", "2500.jpg", "4999.jpg")] == [2, 2502, 5001]
    seen.add("0.jpg", 9999)  # a duplicate keeps its first line
    assert seen.line_of("0.jpg") == 2 and seen.line_of("5000.jpg") is None
