"""Prediction that resumes: a killed ``predict`` reuses its finished chunks, publishes the submission and the
probabilities together, and leaves nothing behind once a run succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuselabel.records import read_records

PAUSING = str(Path(__file__).with_name("pausing.py"))  # runs a command that stops where told

PAUSE = "FUSELABEL_TEST_PAUSE_AT"


def _predict(model, images, csv, out, proba, pause=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != PAUSE}
    if pause:
        env[PAUSE] = pause
    cmd = [
        sys.executable,
        PAUSING,
        "-m",
        "fuselabel.cli",
        "predict",
        str(model),
        "--data",
        str(images),
        "--csv",
        str(csv),
        "--out",
        str(out),
        "--proba",
        str(proba),
        "--chunk-size",
        "64",
        "--num-workers",
        "1",
    ]
    if not pause:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    line = ""
    while "paused at" not in line:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "the run ended before its pause"
        assert time.time() < deadline
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return line


@pytest.fixture(scope="module")
def many_rows(tiny_model, tmp_path_factory):
    root, image_dir, csv = tiny_model
    folder = tmp_path_factory.mktemp("resume")
    rows = read_records(csv).records
    lines = ["ImageID,Caption"] + [f'{r.image_id},"{r.caption}"' for r in rows]
    # 48 rows of the tiny set, then copies of their photos under new names: 4 chunks of 64 rows
    for k in range(1, 5):
        for r in rows:
            name = f"copy{k}-{r.image_id}"
            target = image_dir / name
            if not target.exists():
                target.write_bytes((image_dir / r.image_id).read_bytes())
            lines.append(f'{name},"{r.caption} ({k})"')
    table = folder / "test.csv"
    table.write_text("\n".join(lines) + "\n")
    return root / "model", image_dir, table, folder


def test_a_killed_predict_reuses_its_chunks_and_leaves_nothing(many_rows, tmp_path):
    model, images, table, _ = many_rows
    clean_out, clean_proba = tmp_path / "clean.csv", tmp_path / "clean-proba.csv"
    _predict(model, images, table, clean_out, clean_proba)
    out, proba = tmp_path / "sub.csv", tmp_path / "proba.csv"
    _predict(model, images, table, out, proba, pause="predict-chunk:3")
    assert not out.exists()
    log = _predict(model, images, table, out, proba)
    assert "resuming: 3 of 4 chunks were already predicted" in log
    assert out.read_bytes() == clean_out.read_bytes() and proba.read_bytes() == clean_proba.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean-proba.csv", "clean.csv", "proba.csv", "sub.csv"]


def test_the_outputs_are_published_together(many_rows, tmp_path):
    model, images, table, _ = many_rows
    out, proba = tmp_path / "sub.csv", tmp_path / "proba.csv"
    out.write_text("old submission\n")
    proba.write_text("old probabilities\n")
    # killed after the first of the two renames: the submission is new, the probabilities not yet
    _predict(model, images, table, out, proba, pause="predict-rename:1")
    assert out.read_text() != "old submission\n" and proba.read_text() == "old probabilities\n"
    log = _predict(model, images, table, out, proba)
    assert "resuming: 4 of 4 chunks" in log
    assert proba.read_text().startswith("ImageID,") and out.read_text().startswith("ImageID,Labels\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proba.csv", "sub.csv"]


def test_other_rows_or_chunk_size_do_not_reuse_parts(many_rows, tmp_path):
    model, images, table, folder = many_rows
    out, proba = tmp_path / "sub.csv", tmp_path / "proba.csv"
    _predict(model, images, table, out, proba, pause="predict-chunk:2")
    other = folder / "other.csv"
    other.write_text(table.read_text().replace("(1)", "(one)"))
    log = _predict(model, images, other, out, proba)
    assert "resuming" not in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proba.csv", "sub.csv"]  # the old parts are gone too
