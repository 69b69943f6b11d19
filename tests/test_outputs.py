"""Outputs that would destroy something are refused before any work; one writer per output; the machine's
limits are named errors (exit status 2, the path and what to do, no traceback)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from fuselabel import outputs
from fuselabel.cli import main
from fuselabel.outputs import OutputError, check_output, explain_error, kind_of, output_lock


def _model_folder(path):
    """What outputs recognise a model folder by (enough for checks that run before any load)."""
    path.mkdir(parents=True)
    (path / "fuselabel.json").write_text(json.dumps({"format_version": 2}))
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def _data_folder(path):
    (path / "data").mkdir(parents=True)
    (path / "data" / "0.jpg").write_bytes(b"photo")
    (path / "train.csv").write_text("ImageID,Labels,Caption\n0.jpg,1,a photo\n")
    return path


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _contents(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def test_kinds_are_recognised(tmp_path):
    assert kind_of(tmp_path / "nothing") is None
    (tmp_path / "empty").mkdir()
    assert kind_of(tmp_path / "empty") is None
    assert kind_of(_model_folder(tmp_path / "m")) == outputs.MODEL
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "manifest.json").write_text("{}")
    assert kind_of(tmp_path / "onnx") == outputs.ONNX
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.html").write_text("<!DOCTYPE html><html><head><title>fuselabel report: m</title>")
    assert kind_of(tmp_path / "r") == outputs.REPORT
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html>my own page</html>")
    assert kind_of(tmp_path / "site") == "folder"
    assert kind_of(_data_folder(tmp_path / "d") / "train.csv") == outputs.FILE


def test_outputs_that_would_destroy_something_are_refused(tmp_path):
    model, data = _model_folder(tmp_path / "m"), _data_folder(tmp_path / "d")
    csv = data / "train.csv"
    (tmp_path / "link.csv").symlink_to(csv)
    refusals = [
        (lambda: check_output(csv, "file", [model, csv]), "is an input"),
        (lambda: check_output(tmp_path / "link.csv", "file", [model, csv]), "is an input"),  # the same file
        (lambda: check_output(model, "onnx", [model]), "is an input"),  # export M --out M
        (lambda: check_output(tmp_path, "report", [model, csv]), "holds the input model folder"),
        (lambda: check_output(model / "sub.csv", "file", [model, csv]), "inside the input model folder"),
        (lambda: check_output(tmp_path / "a.csv", "file", [model, csv], [tmp_path / "a.csv"]), "two outputs"),
        (lambda: check_output(data, "model", [csv]), "is a folder that is none of fuselabel's"),
        (lambda: check_output(data / "data", "onnx", [model]), "is a folder that is none of fuselabel's"),
        (lambda: check_output(csv, "model", []), "is a file"),  # train --out E/train.csv
        (lambda: check_output(tmp_path / "other", "model", [tmp_path / "other"]), "is an input"),
        (lambda: check_output(data / "data", "file", []), "folder"),  # predict --out DIR
        (lambda: check_output(csv / "sub.csv", "file", []), "is a file, not a folder"),
    ]
    other = _model_folder(tmp_path / "other-model")
    refusals.append((lambda: check_output(other, "onnx", [model]), "is a fuselabel model folder"))
    refusals.append((lambda: check_output(other, "report", [model]), "is a fuselabel model folder"))
    before = _contents(tmp_path)
    for refuse, words in refusals:
        with pytest.raises(OutputError, match=words):
            refuse()
    assert _contents(tmp_path) == before
    # What may be written: a new path, a folder of the same kind, export's default MODEL/onnx, an empty folder.
    check_output(tmp_path / "new", "model", [model, csv])
    check_output(other, "model", [model])
    check_output(model / "onnx", "onnx", [model])
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "report", [model])
    check_output(tmp_path / "sub.csv", "file", [model, csv], [tmp_path / "proba.csv"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions (root writes anywhere)")
def test_unwritable_folder_is_refused_before_work(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        with pytest.raises(OutputError, match="cannot be written"):
            check_output(tmp_path / "ro" / "sub.csv", "file")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_replace_folder_keeps_a_folder_of_another_kind(tmp_path):
    from fuselabel.bundle import replace_folder

    data = _data_folder(tmp_path / "d")
    new = _model_folder(tmp_path / "new")
    before = _contents(data)
    with pytest.raises(OutputError, match="not a folder of the kind"):
        replace_folder(new, data)
    assert _contents(data) == before and new.is_dir()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError):
        replace_folder(new, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


HOLDER = """
import sys, time
from pathlib import Path
from fuselabel.outputs import output_lock
with output_lock(sys.argv[1]):
    Path(sys.argv[2]).touch()
    time.sleep(60)
"""


def _hold(tmp_path, path):
    ready = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path):
    out = tmp_path / "sub.csv"
    proc = _hold(tmp_path, out)
    try:
        start = time.monotonic()
        with pytest.raises(OutputError, match=rf"pid {proc.pid} on .* is writing it now"), output_lock(out):
            pass
        assert time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait()
    # The holder died (killed, no clean-up): its flock went with it, and the next writer goes ahead.
    with output_lock(out), output_lock(out):  # the same process again (the command, then save_bundle inside it)
        pass
    assert not list(tmp_path.glob(".sub.csv.lock"))  # no lock file is left beside the output


def test_two_trainings_into_one_folder(tmp_path, capsys, tiny_dataset):
    image_dir, csv = tiny_dataset
    out = tmp_path / "m"
    proc = _hold(tmp_path, out)
    try:
        code, _, err = _run(capsys, "train", "--data", image_dir, "--csv", csv, "--out", out, "--epochs", "1")
    finally:
        proc.kill()
        proc.wait()
    assert code == 2 and f"pid {proc.pid}" in err and "is writing it now" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "m.work").exists()


def test_commands_refuse_destructive_outputs_before_work(tmp_path, capsys, tiny_dataset):
    image_dir, csv = tiny_dataset
    model = _model_folder(tmp_path / "m")
    data = image_dir.parent
    (data / "notes.csv").write_text("the user's own file\n")
    before = _contents(data), _contents(model)
    cases = [
        (["convert", model, "--out", data, "--save-dtype", "int8"], "none of fuselabel's"),
        (["export", model, "--out", model], "is an input"),
        (["export", model, "--out", data], "none of fuselabel's"),
        (["train", "--data", image_dir, "--csv", csv, "--out", csv], "is an input"),
        (["train", "--data", image_dir, "--csv", csv, "--out", data / "notes.csv"], "is a file"),
        (["train", "--data", image_dir, "--csv", csv, "--out", image_dir], "is an input"),
        (["predict", model, "--data", image_dir, "--csv", csv, "--out", csv], "is an input"),
        (
            [
                "predict",
                model,
                "--data",
                image_dir,
                "--csv",
                csv,
                "--out",
                tmp_path / "s.csv",
                "--proba",
                tmp_path / "s.csv",
            ],
            "two outputs",
        ),
        (["predict", model, "--data", image_dir, "--csv", csv, "--out", image_dir], "none of fuselabel's"),
        (["evaluate", model, "--data", image_dir, "--csv", csv, "--json", csv], "is an input"),
        (["report", model, "--data", image_dir, "--csv", csv, "--out", data], "is a folder"),
        (["report", model, "--data", image_dir, "--csv", csv, "--out", data / "notes.csv"], "not a fuselabel report"),
    ]
    for args, words in cases:
        code, _, err = _run(capsys, *args)
        assert code == 2 and words in err and "Traceback" not in err, (args, err)
    assert (_contents(data), _contents(model)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tiny"]


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "disk is full"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EISDIR, "is a folder"),
        (errno.ENOTDIR, "a part of the path is a file"),
    ],
)
def test_machine_limits_are_named(code, words):
    err = OSError(code, os.strerror(code), "/data/out/model.safetensors")
    text = explain_error(err)
    assert text.startswith("/data/out/model.safetensors: ") and words in text
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = err
    assert words in explain_error(wrapped)
    assert explain_error(OSError(errno.ECONNRESET, "reset")) is None and explain_error(KeyError("x")) is None


def test_full_disk_while_saving_weights(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error, without the path: the save names the path."""
    import safetensors.torch
    from test_snapshot import _model

    from fuselabel.bundle import save_bundle

    class SafetensorError(Exception):
        pass

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as caught:
        _model(tmp_path, "a", 0.25)
    text = explain_error(caught.value)
    assert "a/model.safetensors" in text and "disk is full" in text
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))
    assert save_bundle  # the save that failed is the one every command uses


def test_failed_training_says_resume(tmp_path, capsys, tiny_dataset, monkeypatch):
    import fuselabel.train

    image_dir, csv = tiny_dataset

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.work" / "checkpoints" / "last.ckpt"))

    monkeypatch.setattr(fuselabel.train, "fit", full)
    code, _, err = _run(capsys, "train", "--data", image_dir, "--csv", csv, "--out", tmp_path / "m")
    assert code == 2 and "Traceback" not in err
    assert "last.ckpt: the disk is full" in err and "--resume" in err


def test_every_case_in_the_robustness_doc_names_a_test_that_exists():
    """Each row of docs/robustness.md's table of cases points at tests that exist."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "robustness.md").read_text()
    table = doc[doc.index("## The cases and their tests") :]
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", table)
    assert len(named) >= 15
    for path, name in named:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), re.M), f"{path}::{name} does not exist"


DIES_WRITING = """
import sys, time
from fuselabel.writers import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_dead_writers_temporaries_go_and_a_live_ones_stay(tmp_path):
    from fuselabel.writers import atomic_path, remove_abandoned

    proc = subprocess.Popen(
        [sys.executable, "-c", DIES_WRITING, str(tmp_path / "dead.txt")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dead.txt.")]  # its temporary and lock
    with atomic_path(tmp_path / "live.txt") as live:
        live.write_text("being written")
        remove_abandoned(tmp_path)
        assert live.read_text() == "being written"  # its writer holds the lock: left alone
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dead.txt.")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.txt"]
    assert (tmp_path / "live.txt").read_text() == "being written"
