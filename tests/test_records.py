"""Tests for the course-CSV reader (fuselabel.records) and its neighbours: labels, writers, inspection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data_or_skip

from fuselabel import writers
from fuselabel.inspection import find_missing_images, format_summary, summarize
from fuselabel.labels import label_vocabulary, labels_to_matrix, matrix_to_labels, read_label_names
from fuselabel.records import BadRow, Record, RecordsError, parse_records, read_records
from fuselabel.writers import write_labelled_csv, write_probabilities, write_rows, write_submission

HEADER = "ImageID,Labels,Caption\n"


def write(tmp_path: Path, text: str, name: str = "train.csv", *, raw: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else text.encode("utf-8"))
    return path


def by_id(recordset) -> dict[str, Record]:
    return {r.image_id: r for r in recordset.records}


# ---------------------------------------------------------------------------
# Reading crafted samples


def test_plain_rows_and_inner_unescaped_quotes(tmp_path):
    path = write(
        tmp_path,
        HEADER
        + '0.jpg,1,"Woman in swim suit holding parasol on sunny day."\n'
        + '3.jpg,8 3 13,"a black and silver clock tower"\n'
        + '9508.jpg,1,"A cow in street with writing that reads "oh no, not beef on the menu again!""\n'
        + '10.jpg,2,"He said "hi", then left"\n',
    )
    rs = read_records(path)
    assert rs.labelled and len(rs) == 4 and rs.bad_rows == []
    assert rs.image_ids == ["0.jpg", "3.jpg", "9508.jpg", "10.jpg"]
    assert rs.label_sets == [("1",), ("8", "3", "13"), ("1",), ("2",)]
    d = by_id(rs)
    assert d["9508.jpg"].caption == 'A cow in street with writing that reads "oh no, not beef on the menu again!"'
    assert d["10.jpg"].caption == 'He said "hi", then left'
    assert [r.line for r in rs.records] == [2, 3, 4, 5]
    assert rs.path == path


def test_caption_spanning_two_and_three_lines_with_trailing_space(tmp_path):
    path = write(
        tmp_path,
        HEADER
        + '1.jpg,1,"first line\nsecond line."\n'
        + '2.jpg,4,"Red motor \nscooter parked, on "the" sand\nwith a sunset in background."\n'
        + '3.jpg,5,"after"\n',
    )
    rs = read_records(path)
    d = by_id(rs)
    assert len(rs) == 3
    assert d["1.jpg"].caption == "first line\nsecond line."
    assert d["2.jpg"].caption == 'Red motor \nscooter parked, on "the" sand\nwith a sunset in background.'
    assert d["3.jpg"].caption == "after"
    assert [r.line for r in rs.records] == [2, 4, 7]


def test_write_rows_copies_chosen_rows_byte_for_byte(tmp_path):
    """Multi-line captions, CRLF, a BOM and a lone \\r or \\u2028 inside a caption survive the copy."""
    rows = ['1.jpg,1,"multi \r\nline"\r\n', '2.jpg,2 3,"He said "x" \u2028 and \r here"\r\n', '3.jpg,4,"three"\r\n']
    raw = b"\xef\xbb\xbf" + (HEADER.replace("\n", "\r\n") + "".join(rows)).encode("utf-8")
    src = read_records(write(tmp_path, "", raw=raw))
    assert write_rows(src, [2, 0], tmp_path / "sub.csv") == 2
    assert (tmp_path / "sub.csv").read_bytes() == b"\xef\xbb\xbf" + (
        HEADER.replace("\n", "\r\n") + rows[0] + rows[2]
    ).encode("utf-8")
    copied = read_records(tmp_path / "sub.csv")
    assert copied.image_ids == ["1.jpg", "3.jpg"] and copied.captions == [src.captions[0], src.captions[2]]
    write_rows(src, [1], tmp_path / "one.csv")
    assert read_records(tmp_path / "one.csv").records[0].caption == src.records[1].caption


def test_crlf_and_bom(tmp_path):
    text = HEADER + '1.jpg,1,"multi \nline"\n2.jpg,2 3,"He said "x""\n'
    raw = b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8")
    rs = read_records(write(tmp_path, "", raw=raw))
    d = by_id(rs)
    assert d["1.jpg"].caption == "multi \nline"
    assert d["2.jpg"].caption == 'He said "x"'
    assert d["2.jpg"].labels == ("2", "3")
    assert rs.image_ids == ["1.jpg", "2.jpg"]  # no BOM glued to anything


def test_line_ends_follow_the_header(tmp_path):
    # An LF file keeps a \r inside a caption as text; a CRLF row among LF rows still reads.
    text = HEADER + '1.jpg,1,"two\r\nlines"\n2.jpg,2,"crlf row"\r\n3.jpg,3,unquoted\r\n4.jpg,1,"nul \x00 ok"\n'
    rs = read_records(write(tmp_path, text))
    assert rs.captions == ["two\r\nlines", "crlf row", "unquoted", "nul \x00 ok"]
    assert rs.image_ids == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]


def test_parse_records_in_memory():
    rs = parse_records(HEADER + '1.jpg,1,"a"\n', "memory.csv")
    assert rs.captions == ["a"] and rs.path.name == "memory.csv"
    with pytest.raises(RecordsError, match=r"memory\.csv:3: duplicate ImageID"):
        parse_records(HEADER + '1.jpg,1,"a"\n1.jpg,1,"b"\n', "memory.csv")


def test_write_labelled_csv_round_trip_and_refusal(tmp_path):
    path = tmp_path / "labelled.csv"
    rows = [("1.jpg", ["2", "1"], 'A "quoted", comma\nsecond line\ttab'), ("2.jpg", [], "")]
    assert write_labelled_csv(path, rows) == 2
    rs = read_records(path)
    assert [(r.image_id, r.labels, r.caption) for r in rs.records] == [
        ("1.jpg", ("2", "1"), 'A "quoted", comma\nsecond line\ttab'),
        ("2.jpg", (), ""),
    ]
    assert write_labelled_csv(tmp_path / "copy.csv", rs.records) == 2
    assert (tmp_path / "copy.csv").read_bytes() == path.read_bytes()
    # A caption line ending in a quote before a line break cannot be told from the caption's end.
    with pytest.raises(ValueError, match=r"cannot write row 2 \(ImageID 2\.jpg\) so that it reads back"):
        write_labelled_csv(path, [("1.jpg", ["1"], "fine"), ("2.jpg", ["1"], 'says "hi"\nthen more')])
    with pytest.raises(ValueError, match="duplicate ImageID"):
        write_labelled_csv(path, [("1.jpg", ["1"], "a"), ("1.jpg", ["1"], "b")])
    with pytest.raises(ValueError, match="cannot write label"):
        write_labelled_csv(path, [("1.jpg", ["a b"], "a")])
    assert read_records(path).image_ids == ["1.jpg", "2.jpg"]  # refused writes left the file as it was


def test_header_is_case_and_whitespace_tolerant(tmp_path):
    rs = read_records(write(tmp_path, ' imageid , LABELS,caption \n1.jpg,1,"a"\n'))
    assert rs.labelled and rs.captions == ["a"]


def test_unlabelled_header(tmp_path):
    path = write(
        tmp_path,
        'ImageID,Caption\n30000.jpg,"A dog, "Rex", sleeping"\n30001.jpg,"two\nlines"\n30002.jpg,unquoted, with comma\n',
    )
    rs = read_records(path)
    assert not rs.labelled
    assert [r.labels for r in rs.records] == [None, None, None]
    assert rs.captions == ['A dog, "Rex", sleeping', "two\nlines", "unquoted, with comma"]
    with pytest.raises(RecordsError, match="no Labels column"):
        rs.label_sets


def test_empty_labels_multiple_spaces_duplicates_and_unquoted_caption(tmp_path):
    path = write(
        tmp_path,
        HEADER
        + '1.jpg,,"no labels"\n'
        + '2.jpg,3  1   3,"spaced"\n'
        + '3.jpg,2,plain caption, with "quotes" and commas \n',
    )
    rs = read_records(path)
    d = by_id(rs)
    assert d["1.jpg"].labels == ()
    assert d["2.jpg"].labels == ("3", "1")  # file order, de-duplicated
    assert d["3.jpg"].caption == 'plain caption, with "quotes" and commas '


def test_blank_lines_outside_captions_are_ignored(tmp_path):
    path = write(tmp_path, HEADER + '1.jpg,1,"a"\n\n   \n2.jpg,1,"b\n\nc"\n\n\n')
    rs = read_records(path)
    assert rs.captions == ["a", "b\n\nc"]
    assert [r.line for r in rs.records] == [2, 5]


def test_header_only_file(tmp_path):
    rs = read_records(write(tmp_path, HEADER))
    assert len(rs) == 0 and rs.label_sets == []


def test_duplicate_image_id(tmp_path):
    path = write(tmp_path, HEADER + '12.jpg,1,"a"\n13.jpg,1,"b"\n12.jpg,2,"c"\n')
    with pytest.raises(RecordsError, match=r"train\.csv:4: duplicate ImageID 12\.jpg, first at line 2"):
        read_records(path)
    rs = read_records(path, strict=False)
    assert rs.captions == ["a", "b"]
    assert [(b.line, b.reason) for b in rs.bad_rows] == [
        (4, "duplicate ImageID 12.jpg, first at line 2 (keep one of the two rows)")
    ]


GARBAGE = HEADER + '1.jpg,1,"one"\n' + '2.jpg,2,"two\nstill two"\n' + "this line is garbage\n" + '3.jpg,3,"three"\n'


def test_garbage_line_strict_names_file_and_line(tmp_path):
    path = write(tmp_path, GARBAGE)
    with pytest.raises(RecordsError) as info:
        read_records(path)
    message = str(info.value)
    assert str(path) in message
    assert "train.csv:5: expected ImageID,Labels,Caption: 'this line is garbage'" in message
    assert "1 bad row" in message


def test_garbage_line_non_strict_keeps_neighbours_unmerged(tmp_path):
    rs = read_records(write(tmp_path, GARBAGE), strict=False)
    assert rs.image_ids == ["1.jpg", "2.jpg", "3.jpg"]
    assert rs.captions == ["one", "two\nstill two", "three"]
    assert [r.line for r in rs.records] == [2, 3, 6]
    assert rs.bad_rows == [BadRow(str(rs.path), 5, "expected ImageID,Labels,Caption", "this line is garbage")]
    assert str(rs.bad_rows[0]) == "train.csv:5: expected ImageID,Labels,Caption: 'this line is garbage'"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (',1,"no id"', "empty ImageID"),
        ('4.jpg,1;2,"bad token"', "malformed labels '1;2'"),
        ('4.jpg, 1,"leading space"', "malformed labels ' 1'"),
        ('my image.jpg,1,"space in id"', "contains whitespace"),
        ('"4.jpg",1,"quoted id"', "expected ImageID,Labels,Caption"),
    ],
)
def test_bad_row_reasons(tmp_path, row, reason):
    rs = read_records(write(tmp_path, HEADER + '1.jpg,1,"a"\n' + row + '\n5.jpg,1,"b"\n'), strict=False)
    assert rs.image_ids == ["1.jpg", "5.jpg"]
    assert len(rs.bad_rows) == 1
    assert rs.bad_rows[0].line == 3
    assert reason in rs.bad_rows[0].reason


def test_unterminated_quote_followed_by_new_row(tmp_path):
    path = write(tmp_path, HEADER + '1.jpg,1,"ok"\n2.jpg,1,"never closed\n3.jpg,2,"next row"\n4.jpg,1,"last"\n')
    with pytest.raises(RecordsError, match=r"train\.csv:3: unterminated quoted caption"):
        read_records(path)
    rs = read_records(path, strict=False)
    assert rs.image_ids == ["1.jpg", "3.jpg", "4.jpg"]
    assert rs.captions == ["ok", "next row", "last"]
    assert [(b.line, b.reason, b.text) for b in rs.bad_rows] == [
        (3, "unterminated quoted caption (no closing quote before the next row)", '2.jpg,1,"never closed')
    ]


def test_unterminated_quote_at_end_of_file(tmp_path):
    rs = read_records(write(tmp_path, HEADER + '1.jpg,1,"ok"\n2.jpg,1,"open\nstill open\n'), strict=False)
    assert rs.image_ids == ["1.jpg"]
    assert rs.bad_rows[0].line == 3
    assert rs.bad_rows[0].reason == "unterminated quoted caption (the file ends inside it: truncated file?)"
    assert rs.bad_rows[0].text.startswith('2.jpg,1,"open\nstill open')


def test_continuation_line_that_merely_resembles_a_row_stays_in_caption(tmp_path):
    # "a,b,c" has commas but an id unlike the others (no .jpg): it is caption text.
    path = write(tmp_path, HEADER + '1.jpg,1,"list:\na,b,c"\n2.jpg,1,"x"\n')
    rs = read_records(path)
    assert rs.captions == ["list:\na,b,c", "x"]


def test_first_row_open_caption_uses_shape_of_later_ids(tmp_path):
    path = write(tmp_path, HEADER + '1.jpg,1,"open\n2.jpg,1,"x"\n3.jpg,1,"y"\n')
    rs = read_records(path, strict=False)
    assert rs.image_ids == ["2.jpg", "3.jpg"]
    assert rs.bad_rows[0].line == 2


def test_strict_message_lists_at_most_ten_bad_rows(tmp_path):
    body = "".join(f"garbage {i}\n" for i in range(15))
    with pytest.raises(RecordsError) as info:
        read_records(write(tmp_path, HEADER + body))
    message = str(info.value)
    assert "15 bad row(s)" in message
    assert "train.csv:11:" in message and "train.csv:12:" not in message
    assert "... and 5 more" in message


@pytest.mark.parametrize("header", ["ImageID,Labels", "id,labels,caption", "ImageID,Caption,Labels", ""])
def test_bad_header(tmp_path, header):
    path = write(tmp_path, header + '\n1.jpg,1,"a"\n')
    with pytest.raises(RecordsError, match=r"train\.csv:1: .*expected 'ImageID,Labels,Caption' or 'ImageID,Caption'"):
        read_records(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(RecordsError, match="nope.csv"):
        read_records(tmp_path / "nope.csv")
    path = write(tmp_path, "", raw=HEADER.encode() + b'1.jpg,1,"a"\n2.jpg,1,"caf\xe9"\n')
    with pytest.raises(RecordsError, match=r"train\.csv:3: not valid UTF-8"):
        read_records(path)


def test_records_are_frozen(tmp_path):
    rs = read_records(write(tmp_path, HEADER + '1.jpg,1,"a"\n'))
    with pytest.raises(AttributeError):
        rs.records[0].caption = "b"  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Label helpers


def test_label_vocabulary_sorting():
    assert label_vocabulary([("10", "2"), ("1",), (), ("2", "19")]) == ["1", "2", "10", "19"]
    assert label_vocabulary([("b", "10"), ("a", "2")]) == ["10", "2", "a", "b"]
    assert label_vocabulary([]) == []


def test_labels_matrix_round_trip():
    vocab = ["1", "2", "10"]
    sets = [("10", "1"), (), ("2",)]
    m = labels_to_matrix(sets, vocab)
    assert m.dtype == np.uint8 and m.shape == (3, 3)
    assert m.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert matrix_to_labels(m.astype(bool), vocab) == [("1", "10"), (), ("2",)]
    with pytest.raises(RecordsError, match="'12' in row 1 "):
        labels_to_matrix([("1",), ("12",)], vocab)
    with pytest.raises(RecordsError, match=r"'12' in test\.csv:3 .*remove it, or retrain"):
        labels_to_matrix([("1",), ("12",)], vocab, row_names=["test.csv:2", "test.csv:3"])
    with pytest.raises(ValueError):
        matrix_to_labels(np.zeros((2, 2), bool), vocab)


def test_read_label_names(tmp_path):
    path = write(tmp_path, "\ufeffLabel,Name\n1,person\n10,traffic light\n", name="label_names.csv")
    assert read_label_names(path) == {"1": "person", "10": "traffic light"}
    with pytest.raises(RecordsError, match="missing.csv"):
        read_label_names(tmp_path / "missing.csv")
    # any header above numeric ids is a header; a file of one column names nothing
    assert read_label_names(write(tmp_path, "code,meaning\n1,x\n", name="other.csv")) == {"1": "x"}
    with pytest.raises(RecordsError, match=r"one.csv:1: expected label,name"):
        read_label_names(write(tmp_path, "1\n2\n", name="one.csv"))


# ---------------------------------------------------------------------------
# Writers


def parse_simple_csv(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_submission_round_trip(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(path, ["30000.jpg", "30001.jpg", "30002.jpg"], [("1", "19"), (), ["3"]])
    assert path.read_text() == "ImageID,Labels\n30000.jpg,1 19\n30001.jpg,\n30002.jpg,3\n"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]
    with pytest.raises(ValueError):
        write_submission(path, ["a.jpg"], [])
    with pytest.raises(ValueError):
        write_submission(path, ["a,b.jpg"], [("1",)])


def test_write_probabilities_round_trip(tmp_path):
    path = tmp_path / "probs.csv"
    probs = np.array([[0.1234567, 1.0], [0.0, 0.5]])
    write_probabilities(path, ["1.jpg", "2.jpg"], ["1", "19"], probs)
    rows = parse_simple_csv(path)
    assert rows[0] == ["ImageID", "1", "19"]
    assert rows[1] == ["1.jpg", "0.123457", "1.000000"]
    assert np.allclose(np.array([r[1:] for r in rows[1:]], float), probs, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        write_probabilities(path, ["1.jpg"], ["1", "19"], probs)
    with pytest.raises(ValueError, match="NaN"):
        write_probabilities(path, ["1.jpg", "2.jpg"], ["1", "19"], np.full((2, 2), np.nan))
    assert parse_simple_csv(path)[1] == ["1.jpg", "0.123457", "1.000000"]  # failed calls left it alone


class ExplodingSets(list):
    """Label sets that fail part-way through iteration, like a crash mid-write."""

    def __iter__(self):
        for i, item in enumerate(list.__iter__(self)):
            if i == 2:
                raise RuntimeError("boom mid-write")
            yield item


def test_write_submission_failure_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("old content\n")
    with pytest.raises(RuntimeError, match="boom"):
        write_submission(path, ["1.jpg", "2.jpg", "3.jpg"], ExplodingSets([("1",), ("2",), ("3",)]))
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # temp file cleaned up


@pytest.mark.parametrize("writer", ["submission", "probabilities"])
def test_failed_replace_keeps_old_file(tmp_path, monkeypatch, writer):
    path = tmp_path / "out.csv"
    path.write_text("old content\n")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        if writer == "submission":
            write_submission(path, ["1.jpg"], [("1",)])
        else:
            write_probabilities(path, ["1.jpg"], ["1"], np.array([[0.5]]))
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "probs.csv"
    path.write_text("old content\n")
    real_fsync = os.fsync

    def failing_fsync(fd):
        real_fsync(fd)
        raise OSError("I/O error")

    monkeypatch.setattr(writers.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        write_probabilities(path, ["1.jpg", "2.jpg"], ["1"], np.array([[0.1], [0.2]]))
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["probs.csv"]


# ---------------------------------------------------------------------------
# Images and summaries


def test_find_missing_images_and_summary(tmp_path):
    images = tmp_path / "data"
    images.mkdir()
    (images / "1.jpg").write_bytes(b"")
    path = write(tmp_path, HEADER + '1.jpg,1 3,"a dog"\n2.jpg,3,"two\nlines here"\n3.jpg,,"x"\nbad line\n')
    rs = read_records(path, strict=False)
    assert find_missing_images(rs.image_ids, images) == ["2.jpg", "3.jpg"]
    with pytest.raises(RecordsError):
        find_missing_images(rs.image_ids, tmp_path / "nope")

    s = summarize(rs, image_dir=images, label_names={"1": "person", "3": "car"})
    assert json.loads(json.dumps(s)) == s
    assert s["rows"] == 3 and s["labelled"] is True
    assert s["bad_rows"] == ["train.csv:6: expected ImageID,Labels,Caption: 'bad line'"]
    assert s["label_counts"] == {"1": 1, "3": 2}
    assert s["labels_per_row"] == {"0": 1, "1": 1, "2": 1}
    assert s["caption_words"] == {"min": 1, "mean": 2.0, "median": 2, "max": 3}
    assert s["caption_chars"]["max"] == len("two\nlines here")
    assert s["captions_with_line_breaks"] == 1
    assert s["missing_images"] == 2 and s["missing_images_first"] == ["2.jpg", "3.jpg"]
    text = format_summary(s)
    assert "person" in text and "car" in text and "bad line" in text and "2 missing" in text


def test_summary_of_unlabelled_file(tmp_path):
    rs = read_records(write(tmp_path, 'ImageID,Caption\n1.jpg,"a b"\n'))
    s = summarize(rs)
    assert s["label_counts"] is None and s["labels_per_row"] is None
    assert "missing_images" not in s
    assert "unlabelled" in format_summary(s)


# ---------------------------------------------------------------------------
# The real course file


@pytest.fixture(scope="module")
def real_train():
    data = shared_data_or_skip("checks of the real course CSV")
    return read_records(data / "train.csv"), data


def test_real_train_csv(real_train):
    rs, _ = real_train
    assert len(rs) == 20_000
    assert rs.bad_rows == []
    assert label_vocabulary(rs.label_sets) == [str(i) for i in range(1, 20) if i != 12]
    d = by_id(rs)
    assert d["9508.jpg"].caption == 'A cow in street with writing that reads "oh no, not beef on the menu again!"'
    assert "\n" in d["1014.jpg"].caption
    assert d["1014.jpg"].line == 673
    assert d["6751.jpg"].caption == "Red motor \nscooter parked on the sand with a sunset in background."
    assert sum("\n" in c for c in rs.captions) == 2
    # No caption keeps an enclosing quote (a sign of mis-split rows).
    assert not any(c.startswith('"') and c.count('"') == 1 for c in rs.captions)


def test_real_train_summary_and_images(real_train):
    rs, data = real_train
    names = read_label_names(data / "label_names.csv")
    assert names["1"] == "person" and len(names) == 18
    assert find_missing_images(rs.image_ids, data / "data") == []
    s = summarize(rs, image_dir=data / "data", label_names=names)
    assert s["rows"] == 20_000 and s["missing_images"] == 0
    assert s["captions_with_line_breaks"] == 2
    assert list(s["label_counts"]) == [str(i) for i in range(1, 20) if i != 12]
    assert sum(int(k) * v for k, v in s["labels_per_row"].items()) == sum(s["label_counts"].values())
    json.dumps(s)
    assert "person" in format_summary(s)
    m = labels_to_matrix(rs.label_sets, label_vocabulary(rs.label_sets))
    assert m.shape == (20_000, 18) and m.sum(axis=1).min() >= 1
