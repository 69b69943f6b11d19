"""One feature cache folder, several processes: the ranks of a run compute each row once, separate runs never
corrupt or half-read a row, and nothing cut short or damaged is accepted.

The writers are real processes (``python -c``) over one cache folder; their compute function
records each row it computes in a shared log, sleeps a little so that the processes overlap,
and returns values derived from the row key, so any mix-up between rows shows.
``FUSELABEL_TEST_DELAY_S`` makes each process dawdle between listing the store and computing, and
between writing a chunk and renaming it: the windows in which claim-based caches raced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fuselabel.cache import FeatureCache

PAUSING = str(Path(__file__).with_name("pausing.py"))  # runs a command that stops where told

WORKER = """
import os, sys, time
import numpy as np
from fuselabel.cache import FeatureCache

root, log, start, stop, chunk, out, go, rank, world = sys.argv[1:10]
keys = [f"row{i}" for i in range(int(start), int(stop))]

def compute(idx):
    with open(log, "a") as f:
        f.write("".join(f"{os.getpid()} {keys[i]}\\n" for i in idx))
    time.sleep(0.05)
    return {"features": np.stack([int(keys[i][3:]) + np.arange(4, dtype=np.float32) for i in idx]),
            "present": np.ones(len(idx), np.float32)}

open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
arrays = FeatureCache(root, chunk_rows=int(chunk), poll_s=0.02).fetch("store", keys, compute, "test rows",
                                                                      rank=int(rank), world=int(world))
np.savez(out, **arrays)
"""


def expected(keys: list[str]) -> np.ndarray:
    return np.stack([int(k[3:]) + np.arange(4, dtype=np.float32) for k in keys])


def keys_between(start: int, stop: int) -> list[str]:
    return [f"row{i}" for i in range(start, stop)]


def start_worker(tmp_path, name, start, stop, chunk=10, env=None, rank=0, world=1):
    out = tmp_path / f"{name}.npz"
    args = [
        sys.executable,
        PAUSING,
        "-c",
        WORKER,
        str(tmp_path / "cache"),
        str(tmp_path / "computed.log"),
        str(start),
        str(stop),
        str(chunk),
        str(out),
        str(tmp_path / "go"),
        str(rank),
        str(world),
    ]
    stderr = open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen(args, stderr=stderr, env={**os.environ, **(env or {})})
    stderr.close()
    return proc, out


def wait_for(predicate, what: str, procs=(), timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"worker exited early ({p.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def computed_rows(tmp_path) -> list[tuple[str, str]]:
    log = tmp_path / "computed.log"
    return [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []


def store_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "features" / "store").iterdir())


def temporaries(tmp_path) -> list[str]:
    """Files of the store that are neither chunks nor its lock: temporaries and their writers' locks."""
    return [n for n in store_files(tmp_path) if not n.startswith("chunk-") and n != ".lock"]


def check_chunks(tmp_path) -> int:
    """Every chunk file loads and its arrays agree in length; returns the number of distinct rows stored."""
    keys = set()
    for p in (tmp_path / "cache" / "features" / "store").glob("chunk-*.npz"):
        with np.load(p) as data:
            lengths = {len(data[k]) for k in data.files}
            assert len(lengths) == 1, p
            assert (data["features"] == expected([str(k) for k in data["row_keys"]])).all()
            keys.update(str(k) for k in data["row_keys"])
    return len(keys)


def run_together(tmp_path, specs, env=None):
    """Start one worker per (name, start, stop, rank, world), release them at once, wait; their outputs."""
    procs = [
        start_worker(tmp_path, name, start, stop, env=env, rank=rank, world=world)
        for name, start, stop, rank, world in specs
    ]
    wait_for(
        lambda: all(out.with_suffix(".npz.ready").exists() for _, out in procs),
        "workers to start",
        [p for p, _ in procs],
    )
    (tmp_path / "go").touch()  # all start filling the cache together
    for (proc, _), spec in zip(procs, specs):
        assert proc.wait(timeout=120) == 0, (tmp_path / f"{spec[0]}.err").read_text()
    for (_, out), (_, start, stop, _, _) in zip(procs, specs):
        with np.load(out) as got:
            assert (got["features"] == expected(keys_between(start, stop))).all()
            assert (got["present"] == 1).all()
    assert not temporaries(tmp_path)
    return procs


DELAY = {"FUSELABEL_TEST_DELAY_S": "0.03"}


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_of_one_run_compute_every_row_once(tmp_path, world):
    for attempt in range(4):  # many runs in a row, each into a fresh cache
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        run_together(run, [(f"rank{r}", 0, 95, r, world) for r in range(world)], env=DELAY)
        rows = computed_rows(run)
        computed = [key for _, key in rows]
        assert len(computed) == len(set(computed)), f"run {attempt}: a row was computed twice"
        assert sorted(computed) == sorted(keys_between(0, 95))
        assert len({pid for pid, _ in rows}) == world  # every rank computed its share
        assert check_chunks(run) == 95


@pytest.mark.parametrize("runs", [2, 3])
def test_separate_runs_over_overlapping_rows_store_whole_rows(tmp_path, runs):
    ranges = [(0, 60), (30, 90), (15, 75)][:runs]
    for attempt in range(4):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        procs = run_together(run, [(f"run{i}", a, b, 0, 1) for i, (a, b) in enumerate(ranges)], env=DELAY)
        rows = computed_rows(run)
        by_pid: dict[str, list[str]] = {}
        for pid, key in rows:
            by_pid.setdefault(pid, []).append(key)
        for pid, keys in by_pid.items():  # a run computes a row at most once, and only rows it needs
            assert len(keys) == len(set(keys)), f"run {attempt}: pid {pid} computed a row twice"
        assert set(k for _, k in rows) == set(keys_between(0, 90))
        assert check_chunks(run) == 90
        # Whatever was computed twice, every later reader gets each row whole, from the store alone.
        again = FeatureCache(run / "cache").fetch("store", keys_between(0, 90), pytest.fail, "again")
        assert (again["features"] == expected(keys_between(0, 90))).all()
        assert len(procs) == runs


def test_writer_killed_mid_write_leaves_nothing_accepted(tmp_path):
    # The writer stops with its second chunk written under a temporary name, not yet renamed into place.
    proc, out = start_worker(tmp_path, "killed", 0, 30, env={"FUSELABEL_TEST_PAUSE_AT": "cache-chunk-write:2"})
    (tmp_path / "go").touch()
    wait_for(lambda: "paused at cache-chunk-write" in (tmp_path / "killed.err").read_text(), "the pause", [proc])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    files = store_files(tmp_path)
    assert sum(n.startswith("chunk-") for n in files) == 1
    assert temporaries(tmp_path) and all(n.endswith((".tmp", ".tmp.lock")) for n in temporaries(tmp_path))
    assert not out.exists()

    recomputed: list[int] = []

    def compute(idx):
        recomputed.extend(idx)
        return {"features": expected([keys_between(0, 30)[i] for i in idx]), "present": np.ones(len(idx), np.float32)}

    got = FeatureCache(tmp_path / "cache", chunk_rows=10).fetch("store", keys_between(0, 30), compute, "resume")
    # The first chunk was finished and is kept; the half-written one is ignored and its rows computed again,
    # and its temporary (whose writer's lock died with it) is removed.
    assert sorted(recomputed) == list(range(10, 30))
    assert (got["features"] == expected(keys_between(0, 30))).all()
    assert not temporaries(tmp_path)
    assert check_chunks(tmp_path) == 30


def test_broken_chunks_are_ignored_and_recomputed(tmp_path, caplog):
    cache = FeatureCache(tmp_path / "cache", chunk_rows=5)
    keys = keys_between(0, 10)

    def compute(idx):
        calls.append(list(idx))
        return {"features": expected([keys[i] for i in idx])}

    calls: list[list[int]] = []
    cache.fetch("store", keys, compute, "first")
    assert calls == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    store = tmp_path / "cache" / "features" / "store"
    chunks = sorted(store.glob("chunk-*.npz"))
    # One chunk cut short on disk (its bytes no longer match the hash in its name) ...
    damaged = chunks[0].read_bytes()
    chunks[0].write_bytes(damaged[: len(damaged) // 2])
    # ... and one, named as earlier versions named them (no hash), whose arrays disagree in length.
    with np.load(chunks[1]) as data:
        short = {"row_keys": data["row_keys"], "features": data["features"][:-1]}
    chunks[1].unlink()
    with open(store / "chunk-0123456789abcdef0123456789abcdef.npz", "wb") as f:
        np.savez(f, **short)

    calls.clear()
    got = FeatureCache(tmp_path / "cache", chunk_rows=5).fetch("store", keys, compute, "second")
    assert sorted(i for c in calls for i in c) == list(range(10))
    assert (got["features"] == expected(keys)).all()
    assert "do not match its hash" in caplog.text and "disagree in length" in caplog.text
    assert chunks[0].read_bytes() == damaged  # the same rows again: the same bytes, under the same name
    assert not (store / "chunk-0123456789abcdef0123456789abcdef.npz").exists()
    for p in store.glob("chunk-*.npz"):
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None


def test_compute_that_returns_wrong_rows_is_refused(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(ValueError, match="3 rows"):
        cache.fetch("store", ["a", "b", "c"], lambda idx: {"features": np.zeros((2, 4))}, "image features")
    # Nothing was stored: a correct compute fills every row.
    got = cache.fetch("store", ["a", "b", "c"], lambda idx: {"features": np.ones((len(idx), 4))}, "image features")
    assert got["features"].shape == (3, 4)


def test_cut_short_onnx_graph_is_exported_again(tmp_path, caplog):
    import onnxruntime
    import torch

    from fuselabel.onnxrt import cached_graph, export_graph

    exports = []
    module = torch.nn.Linear(4, 3)

    def export(path):
        exports.append(path)
        return export_graph(module, (torch.zeros(2, 4),), path, ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}})

    path = tmp_path / "onnx" / "linear.onnx"
    assert cached_graph(path, export) == path and len(exports) == 1
    assert cached_graph(path, export) == path and len(exports) == 1  # checked, and used as it is
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # what a crash after an unsynced rename can leave
    (path.parent / ".linear.onnx.0123abcd.tmp").write_bytes(b"half")  # and a killed export's temporary
    cached_graph(path, export)
    assert len(exports) == 2 and "exporting it again" in caplog.text
    assert path.read_bytes() == whole
    assert not list(path.parent.glob(".linear.onnx.*.tmp"))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((5, 4), np.float32)})[0].shape == (5, 3)
    # A graph without its record (written by an earlier version, or the record lost) is exported again too.
    (path.parent / "linear.onnx.sha256").unlink()
    cached_graph(path, export)
    assert len(exports) == 3
