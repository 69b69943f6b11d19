"""One feature cache folder, several processes: no row computed twice, nothing half-written accepted.

The writers are real processes (``python -c``) over one cache folder; their compute function
records each row it computes in a shared log, sleeps a little so that the processes overlap,
and returns values derived from the row key, so any mix-up between rows shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from fuselabel.cache import FeatureCache

WORKER = """
import os, sys, time
import numpy as np
from fuselabel.cache import FeatureCache

root, log, start, stop, chunk, out, go = sys.argv[1:8]
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
arrays = FeatureCache(root, chunk_rows=int(chunk), poll_s=0.02).fetch("store", keys, compute, "test rows")
np.savez(out, **arrays)
"""


def expected(keys: list[str]) -> np.ndarray:
    return np.stack([int(k[3:]) + np.arange(4, dtype=np.float32) for k in keys])


def keys_between(start: int, stop: int) -> list[str]:
    return [f"row{i}" for i in range(start, stop)]


def start_worker(tmp_path, name, start, stop, chunk=10, env=None):
    out = tmp_path / f"{name}.npz"
    args = [sys.executable, "-c", WORKER, str(tmp_path / "cache"), str(tmp_path / "computed.log"), str(start),
            str(stop), str(chunk), str(out), str(tmp_path / "go")]
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


def test_two_processes_share_rows_and_compute_none_twice(tmp_path):
    procs = [start_worker(tmp_path, "a", 0, 60), start_worker(tmp_path, "b", 30, 90)]
    wait_for(lambda: all(out.with_suffix(".npz.ready").exists() for _, out in procs), "workers to start",
             [p for p, _ in procs])
    (tmp_path / "go").touch()  # both start filling the cache together
    for proc, _ in procs:
        assert proc.wait(timeout=120) == 0, (tmp_path / "a.err").read_text() + (tmp_path / "b.err").read_text()

    rows = computed_rows(tmp_path)
    computed = [key for _, key in rows]
    assert len(computed) == len(set(computed)), "a row was computed twice"
    assert sorted(computed) == sorted(keys_between(0, 90))
    assert len({pid for pid, _ in rows}) == 2  # rows 0-29 only a wants, rows 60-89 only b
    for (_, out), (start, stop) in zip(procs, [(0, 60), (30, 90)]):
        with np.load(out) as got:
            assert (got["features"] == expected(keys_between(start, stop))).all()
            assert (got["present"] == 1).all()
    assert check_chunks(tmp_path) == 90
    assert not [n for n in store_files(tmp_path) if n.startswith((".tmp", "claim-"))]

    # The same as one process alone, and now served entirely from the store.
    alone = FeatureCache(tmp_path / "alone").fetch("store", keys_between(30, 90), lambda idx: {
        "features": expected([keys_between(30, 90)[i] for i in idx]), "present": np.ones(len(idx), np.float32)},
        "alone")
    with np.load(procs[1][1]) as got:
        assert (got["features"] == alone["features"]).all()
    again = FeatureCache(tmp_path / "cache").fetch("store", keys_between(0, 90), pytest.fail, "again")
    assert (again["features"] == expected(keys_between(0, 90))).all()


def test_writer_killed_mid_write_leaves_nothing_accepted(tmp_path):
    # The writer stops with its second chunk written under a temporary name, not yet renamed into place.
    proc, out = start_worker(tmp_path, "killed", 0, 30, env={"FUSELABEL_TEST_PAUSE_AT": "cache-chunk-write:2"})
    (tmp_path / "go").touch()
    wait_for(lambda: "paused at cache-chunk-write" in (tmp_path / "killed.err").read_text(), "the pause", [proc])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    files = store_files(tmp_path)
    assert sum(n.startswith("chunk-") for n in files) == 1
    assert any(n.startswith(".tmp.") for n in files) and any(n.startswith("claim-") for n in files)
    assert not out.exists()

    recomputed: list[int] = []

    def compute(idx):
        recomputed.extend(idx)
        return {"features": expected([keys_between(0, 30)[i] for i in idx]),
                "present": np.ones(len(idx), np.float32)}

    got = FeatureCache(tmp_path / "cache", chunk_rows=10).fetch("store", keys_between(0, 30), compute, "resume")
    # The first chunk was finished and is kept; the half-written one is ignored and its rows computed again.
    assert sorted(recomputed) == list(range(10, 30))
    assert (got["features"] == expected(keys_between(0, 30))).all()
    assert not [n for n in store_files(tmp_path) if n.startswith((".tmp", "claim-"))]
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
    # One chunk damaged on disk (truncated), one whose arrays disagree in length (written by other code).
    damaged = chunks[0].read_bytes()
    chunks[0].write_bytes(damaged[: len(damaged) // 2])
    with np.load(chunks[1]) as data:
        short = {"row_keys": data["row_keys"], "features": data["features"][:-1]}
    with open(chunks[1], "wb") as f:
        np.savez(f, **short)

    calls.clear()
    got = FeatureCache(tmp_path / "cache", chunk_rows=5).fetch("store", keys, compute, "second")
    assert sorted(i for c in calls for i in c) == list(range(10))
    assert (got["features"] == expected(keys)).all()
    assert "ignored" in caplog.text and "disagree in length" in caplog.text
    for p in store.glob("chunk-*.npz"):
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None


def test_compute_that_returns_wrong_rows_is_refused(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(ValueError, match="3 rows"):
        cache.fetch("store", ["a", "b", "c"], lambda idx: {"features": np.zeros((2, 4))}, "image features")
    # Nothing was stored and the claim was released: a correct compute fills every row.
    got = cache.fetch("store", ["a", "b", "c"], lambda idx: {"features": np.ones((len(idx), 4))}, "image features")
    assert got["features"].shape == (3, 4)
