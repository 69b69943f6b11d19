"""Prediction streams its table: the files equal those of the table read whole, bad rows anywhere in the table are
refused before any work, and peak memory does not grow with the rows."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fuselabel.predict import parts_key, predict_csv
from fuselabel.predict_rows import ChunkCursor, iter_chunks, scan_table
from fuselabel.tables import read_table
from fuselabel.textfile import RecordsError

WORDS = ["dog", "cat", "person", "car", "bus", "tree", "kite", "boat", "sofa", "horse", "pizza", "train"]


def _captions_table(path: Path, rows: int, extra: str = "") -> Path:
    """``rows`` caption-only rows (no photo files exist), their captions varied so predictions differ; every
    caption is as long as the first rows', so a longer table never asks the text encoder for more memory."""
    n = len(WORDS)
    with open(path, "w", encoding="utf-8") as f:
        f.write("ImageID,Caption\n")
        for i in range(rows):
            a, b, c = WORDS[i % n], WORDS[(i // n) % n], WORDS[(i // n // n) % n]
            f.write(f'{i}.jpg,"a {a} beside a {b} and a {c}"\n')
        f.write(extra)
    return path


@pytest.fixture(scope="module")
def model(tiny_model):
    from fuselabel import FuseLabel

    return FuseLabel.from_pretrained(tiny_model[0] / "model")


def test_streamed_files_equal_the_whole_table_read(model, tmp_path):
    table = _captions_table(tmp_path / "rows.csv", 2_500)
    whole = read_table(table, trained=model.bundle_.table)
    one_chunk = -(-len(whole) // 64) * 64
    predict_csv(model, tmp_path, whole, tmp_path / "w.csv", proba_out=tmp_path / "wp.csv", chunk_size=one_chunk)
    # reader batches of 300 rows against chunks of 128: chunks are cut across batches
    predict_csv(
        model,
        tmp_path,
        table,
        tmp_path / "s.csv",
        proba_out=tmp_path / "sp.csv",
        chunk_size=128,
        reader={"batch_rows": 300},
        progress=False,
    )
    assert (tmp_path / "s.csv").read_bytes() == (tmp_path / "w.csv").read_bytes()
    assert (tmp_path / "sp.csv").read_bytes() == (tmp_path / "wp.csv").read_bytes()
    lines = (tmp_path / "sp.csv").read_text().splitlines()
    assert len(lines) == 2_501 and lines[-1].startswith("2499.jpg,") and lines[-1].endswith(",caption_only")
    assert len({line.split(",", 1)[1] for line in lines[1:]}) > 1, "every row predicted alike: nothing was compared"


def test_chunks_follow_the_table_across_reader_batches(tmp_path):
    table = _captions_table(tmp_path / "rows.csv", 1_000)
    chunks = list(iter_chunks(table, 192, batch_rows=250))
    assert [len(c) for c in chunks] == [192] * 5 + [40]
    assert [r.image_id for c in chunks for r in c.records] == [f"{i}.jpg" for i in range(1_000)]
    cursor = ChunkCursor(table, 192, batch_rows=250)
    assert [cursor.get(i).records[0].image_id for i in (1, 3, 5)] == ["192.jpg", "576.jpg", "960.jpg"]
    assert cursor.get(0).records[0].image_id == "0.jpg"  # a chunk handed again reads the table from its start
    with pytest.raises(IndexError, match="chunk 6"):
        cursor.get(6)


def test_the_scan_identifies_the_rows(model, tmp_path):
    a = scan_table(_captions_table(tmp_path / "a.csv", 500), batch_rows=120)
    b = scan_table(_captions_table(tmp_path / "b.csv", 500), batch_rows=77)
    changed = (tmp_path / "c.csv").write_text(
        (tmp_path / "a.csv").read_text().replace('\n321.jpg,"a ', '\n321.jpg,"one ')
    )
    c = scan_table(tmp_path / "c.csv")
    assert changed and a.rows == b.rows == c.rows == 500
    assert a.digest == b.digest != c.digest  # the reader's batches do not matter, a changed caption does
    assert parts_key(model, a.digest, 512, False) == parts_key(model, b.digest, 512, False)
    assert parts_key(model, a.digest, 512, False) != parts_key(model, c.digest, 512, False)


def test_a_bad_row_late_in_the_table_is_refused_before_any_work(model, tmp_path):
    bad = '5.jpg,"a second row five"\n,"a row without an id"\n'
    table = _captions_table(tmp_path / "rows.csv", 1_200, extra=bad)
    out = tmp_path / "out" / "sub.csv"
    with pytest.raises(RecordsError) as err:
        predict_csv(model, tmp_path, table, out, chunk_size=64, reader={"batch_rows": 100}, progress=False)
    message = str(err.value)
    assert "rows.csv: 2 bad row(s)" in message
    assert "rows.csv:1202: duplicate ImageID 5.jpg, first at line 7" in message
    assert "rows.csv:1203: empty photo" in message
    assert not (tmp_path / "out").exists(), "nothing is written for a table that is refused"


# Peak RSS of predicting a generated table in a fresh process, over what the process held once the model was loaded.
_PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fuselabel import FuseLabel
    from fuselabel.predict import predict_csv

    def high_water_mb():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    model_dir, warm_up, table, out = sys.argv[1:5]
    model = FuseLabel.from_pretrained(model_dir)
    # reader batches of 2,000 rows: both tables are read in full batches, so only what grows with the rows differs
    reader = {"batch_rows": 2000}
    # a first table brings the engine's own memory (thread pools, allocators) to its level: not the table's
    predict_csv(model, Path(out).parent, warm_up, out, proba_out=out + ".proba", reader=reader, progress=False)
    before = high_water_mb()
    summary = predict_csv(model, Path(out).parent, table, out, proba_out=out + ".proba", reader=reader, progress=False)
    print(json.dumps({"mb": high_water_mb() - before, "rows": summary["rows"]}))
""")


def _peak_growth(model_dir: Path, warm_up: Path, table: Path) -> dict:
    out = table.with_suffix(".out.csv")
    cmd = [sys.executable, "-c", _PEAK, str(model_dir), str(warm_up), str(table), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_rows(tiny_model, tmp_path):
    model_dir = tiny_model[0] / "model"
    warm_up = _captions_table(tmp_path / "warm-up.csv", 3_000)
    small = _peak_growth(model_dir, warm_up, _captions_table(tmp_path / "small.csv", 6_000))
    big = _peak_growth(model_dir, warm_up, _captions_table(tmp_path / "big.csv", 60_000))
    assert (small["rows"], big["rows"]) == (6_000, 60_000)
    # Held whole, 54,000 more rows would take about 38 MB (0.7 kB a row); streamed, a 12-byte slot for each id, and
    # a few MB the allocators settle into over a longer run.
    assert big["mb"] - small["mb"] < 16, (small, big)
