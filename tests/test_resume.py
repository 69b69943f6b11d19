"""``fuselabel train --resume``: a run killed (SIGKILL) at any point continues to the same model.

A real ``fuselabel train`` process is stopped at a named point by the test hook
``FUSELABEL_TEST_PAUSE_AT=stage`` (it announces the pause on stderr and sleeps), killed there,
and resumed. One run is killed four times in a row, once in each stage: while extracting
features, in the middle of an epoch, while tuning thresholds, and while writing the model folder
over a previous one. The end result is compared with an uninterrupted run of the same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_dataset, tiny_cli_train

from fuselabel.bundle import load_bundle, readable_folder, replace_folder

# The tiny model of tests/test_cli.py, for four epochs: two batches an epoch on the 36 training rows.
TRAIN = tiny_cli_train(epochs=4)
CHUNK_ROWS = "16"  # three chunks of image features for the 48 rows, so a kill can fall between two


PAUSING = str(Path(__file__).with_name("pausing.py"))  # runs a command that stops where told


def train(root: Path, out: Path, cache: Path, *extra, pause: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FUSELABEL_TEST_PAUSE_AT"}
    env["FUSELABEL_CACHE_CHUNK_ROWS"] = CHUNK_ROWS
    if pause:
        env["FUSELABEL_TEST_PAUSE_AT"] = pause
    log = open(root / f"{out.name}.log", "a")
    cmd = [
        sys.executable,
        PAUSING,
        "-m",
        "fuselabel.cli",
        "train",
        "--data",
        str(root / "data"),
        "--csv",
        str(root / "train.csv"),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        *TRAIN,
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc


def finish(proc: subprocess.Popen, root: Path, out: Path) -> None:
    code = proc.wait(timeout=600)
    assert code == 0, (root / f"{out.name}.log").read_text()[-4000:]


def kill_at(root: Path, out: Path, cache: Path, stage: str, *extra) -> None:
    """Start a run (resuming when asked), wait until it pauses at ``stage``, and SIGKILL it there."""
    log = root / f"{out.name}.log"
    seen = log.read_text().count("FUSELABEL_TEST_PAUSE_AT:") if log.exists() else 0
    proc = train(root, out, cache, *extra, pause=stage)
    deadline = time.monotonic() + 600
    while log.read_text().count("FUSELABEL_TEST_PAUSE_AT:") == seen:
        assert proc.poll() is None, f"the run ended before pausing at {stage}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no pause at {stage}"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def image_chunks(cache: Path) -> set[str]:
    """Chunk files of the image-feature store (the one that records which photos were present)."""
    found = set()
    for p in (cache / "features").glob("*/chunk-*.npz"):
        with np.load(p) as data:
            if "present" in data.files:
                found.add(p.name)
    return found


def validation(out: Path) -> tuple[dict, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, json.loads((out / "thresholds.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_tiny_dataset(root)
    return root


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """An uninterrupted run; its work folder (OUT.work) is removed once the model is saved."""
    out = root / "reference"
    finish(train(root, out, root / "cache-reference"), root, out)
    assert not (root / "reference.work").exists()
    return out


def test_killed_at_every_stage_then_resumed_matches_an_uninterrupted_run(root, reference):
    out, cache, work = root / "model", root / "cache", root / "model.work"
    shutil.copytree(reference, out)  # a previous model in the destination, to be replaced only whole
    previous = digests(out)

    # 1. While extracting image features (after the captions', which come first): the finished chunks stay in the
    # cache.
    text_chunks = len(list((root / "cache-reference" / "features").glob("*/chunk-*.npz"))) - len(
        image_chunks(root / "cache-reference")
    )
    kill_at(root, out, cache, f"cache-chunk-saved:{text_chunks + 2}")
    kept = image_chunks(cache)
    assert len(kept) == 2

    # 2. In the middle of the third epoch (training batch 5): the last checkpoint is from the end of the second.
    kill_at(root, out, cache, "train-batch:5", "--resume")
    assert len(image_chunks(cache)) == 3 and kept <= image_chunks(cache)  # only the third chunk was computed
    assert (work / "checkpoints" / "last.ckpt").exists() and not (work / "trained.json").exists()

    # 3. While tuning thresholds: training had finished and is not repeated.
    kill_at(root, out, cache, "tune", "--resume")
    assert (work / "trained.json").exists()
    assert "resuming from" in (root / "model.log").read_text()

    # 4. While writing the model folder: the previous folder is untouched and still loads.
    kill_at(root, out, cache, "bundle-write", "--resume")
    assert digests(out) == previous
    load_bundle(out)
    assert list(root.glob(".model.*.tmp")), "the half-written folder should be left beside, unused"

    finish(train(root, out, cache, "--resume"), root, out)
    assert "training had finished" in (root / "model.log").read_text().rsplit("resuming from", 1)[1]
    assert not list(root.glob(".model.*.tmp")) and not work.exists()

    got, got_thresholds = validation(out)
    want, want_thresholds = validation(reference)
    assert abs(got["validation"]["mean_f1"] - want["validation"]["mean_f1"]) <= 0.002
    assert np.allclose(got_thresholds["thresholds"], want_thresholds["thresholds"], atol=0.01)
    # Every epoch is reported, the ones before the kill from the checkpoint, with the same figures.
    assert [r["epoch"] for r in got["val_f1_by_time"]] == [r["epoch"] for r in want["val_f1_by_time"]] == [0, 1, 2, 3]
    assert np.allclose(
        [r["val_f1"] for r in got["val_f1_by_time"]], [r["val_f1"] for r in want["val_f1_by_time"]], atol=0.002
    )
    assert got["epochs_run"] == want["epochs_run"]


def test_resume_refuses_a_run_with_other_settings(root, reference, capsys):
    from fuselabel.cli import main

    work, out = root / "kept-work", root / "other"
    args = [
        "train",
        "--data",
        str(root / "data"),
        "--csv",
        str(root / "train.csv"),
        "--out",
        str(out),
        "--cache-dir",
        str(root / "cache-reference"),
        *TRAIN,
        "--work-dir",
        str(work),
    ]
    assert main(args) == 0
    assert (work / "trained.json").exists()  # a work folder the user named is kept
    import fuselabel.train as train_module

    computed = []
    real_loaders = train_module.make_loaders
    train_module.make_loaders = lambda *a, **k: computed.append(1) or real_loaders(*a, **k)
    try:
        code = main([*args, "--lr", "0.5", "--resume"])
    finally:
        train_module.make_loaders = real_loaders
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume" in err and "lr" in err and "Traceback" not in err
    assert not computed  # refused before any feature was computed
    # The same settings resume: training had finished, so only tuning and the save run again.
    assert main([*args, "--resume"]) == 0
    assert "training had finished" in capsys.readouterr().out
    assert validation(out)[0]["validation"] == validation(reference)[0]["validation"]


SWAP = """
import sys
from pathlib import Path
import fuselabel.snapshot as bundle

bundle._exchange = lambda a, b: False  # a file system without an atomic swap (e.g. NFS)
bundle.replace_folder(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_folder_swap_killed_between_renames_keeps_the_previous_folder(tmp_path):
    out, new = tmp_path / "model", tmp_path / "new"
    for folder, text in ((out, "previous"), (new, "next")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    env = dict(os.environ, FUSELABEL_TEST_PAUSE_AT="bundle-swap")
    proc = subprocess.Popen(
        [sys.executable, PAUSING, "-c", SWAP, str(new), str(out)], stderr=subprocess.PIPE, env=env, text=True
    )
    assert "paused at bundle-swap" in proc.stderr.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    # Killed with the old folder set aside and the new one not yet in place: readers get the previous one ...
    assert not out.exists()
    assert (readable_folder(out) / "weights").read_text() == "previous"
    # ... and the next replacement puts it back first, then swaps.
    replace_folder(new, out)
    assert (out / "weights").read_text() == "next"
    assert not new.exists() and not (tmp_path / ".model.old").exists()


def test_replace_folder_swaps_in_one_step(tmp_path):
    out, new = tmp_path / "model", tmp_path / "new"
    out.mkdir()
    (out / "old-only").write_text("x")
    new.mkdir()
    (new / "weights").write_text("next")
    replace_folder(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["weights"]
    assert not new.exists() and not (tmp_path / ".model.old").exists()
