"""Files that several processes share: atomic writes, a lock, and the frozen-feature cache.

Several processes may fill one cache folder at once (the ranks of a DDP run, two runs started
side by side, a run killed and started again). The rules that keep that safe:

- a file is written under a temporary name in its destination folder and renamed into place
  (``os.replace``), so a reader sees the whole file or none of it, and a killed writer leaves
  only a temporary file that nothing reads (and that the next writer on the host removes);
- a feature store is a folder of immutable chunk files (one per finished batch of rows); its
  index is the union of the chunks' row keys, so adding rows never rewrites what is stored;
- before computing, a process claims the rows it will compute (a small claim file, written
  under the store's ``flock``); others skip claimed rows and wait for them, so no row is computed
  twice while its claimant lives. A claim whose process is dead (same host), or whose heartbeat
  stopped (another host), is stale and its rows are free again.

See docs/robustness.md for what this assumes of the file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no lock between processes (one process per cache folder)
    fcntl = None

log = logging.getLogger(__name__)

CHUNK_ROWS = 2000          # rows computed and saved at a time: a killed extraction keeps every finished chunk
COMPACT_CHUNKS = 16        # more small chunks than this in a store are merged into one
HEARTBEAT_S = 10.0         # a claimant touches its claim this often ...
STALE_AFTER_S = 120.0      # ... and a claim untouched this long is abandoned (its owner died on another host)
TMP_PREFIX = ".tmp."


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    base = cache_dir or os.environ.get("FUSELABEL_CACHE") or Path.home() / ".cache" / "fuselabel"
    return Path(base)


# ---- test hook: stop at a named point so that a test can kill the process there ----

_pauses_seen: dict[str, int] = {}


def pause_for_test(stage: str) -> None:
    """Sleep at ``stage`` when FUSELABEL_TEST_PAUSE_AT names it (test hook; unset in normal use).

    ``FUSELABEL_TEST_PAUSE_AT=stage`` or ``stage:N`` (the N-th time this process reaches it), several
    joined by commas. The process announces the pause on stderr and sleeps, for the test to kill it.
    """
    wanted = os.environ.get("FUSELABEL_TEST_PAUSE_AT")
    if not wanted:
        return
    _pauses_seen[stage] = _pauses_seen.get(stage, 0) + 1
    for item in wanted.split(","):
        name, _, nth = item.strip().partition(":")
        if name == stage and _pauses_seen[stage] == int(nth or 1):
            sys.stderr.write(f"FUSELABEL_TEST_PAUSE_AT: paused at {stage} (pid {os.getpid()})\n")
            sys.stderr.flush()
            time.sleep(3600)


# ---- atomic files ----

_HOST = socket.gethostname()


def temporary_name(prefix: str = TMP_PREFIX) -> str:
    """``PREFIX<pid>.<random>.<host>``: whose it is, so that one left by a dead writer can be removed."""
    # pid first: host names may hold dots
    return f"{prefix}{os.getpid()}.{uuid.uuid4().hex[:8]}.{_HOST}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, stage: str | None = None):
    """A temporary path beside ``path``, renamed onto it when the block succeeds, removed when it fails.

    Whatever the block writes there (a file, or a folder) appears at ``path`` whole or not at all.
    ``stage`` names the moment before the rename for the test hook (``pause_for_test``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temporary_name()
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if stage:
            pause_for_test(stage)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.is_file():
            tmp.unlink()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_stale_temporaries(folder: Path, prefix: str = TMP_PREFIX, older_than_s: float = 24 * 3600) -> None:
    """Temporaries (``temporary_name``) of writers that died: the pid is gone on this host, or a day old."""
    for p in Path(folder).glob(prefix + "*"):
        pid, _, rest = p.name[len(prefix):].partition(".")
        host = rest.partition(".")[2]
        try:
            dead = (host == _HOST and pid.isdigit() and not _pid_alive(int(pid))) or \
                time.time() - p.stat().st_mtime > older_than_s
            if dead and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif dead:
                p.unlink()
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False):
    """``flock`` on ``path`` (created if absent): exclusive for writers, shared for readers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---- row keys ----

def image_row_keys(records, image_dir) -> list[str]:
    """Each image row keyed by its file's bytes, not its path or time.

    A data set copied to another machine, restored from an archive or moved keeps its features
    (a path-and-time key re-extracted all 20,000 photos after every copy, minutes each time);
    an edited photo misses. Hashing is cheap next to decoding: 0.4 s for the 20,000 course photos
    (217 MB) when the OS has them cached, about 2 s when it has not.
    """
    keys = []
    for rec in records:
        try:
            with open(Path(image_dir) / rec.image_id, "rb") as f:
                keys.append(hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest())
        except OSError:
            keys.append(f"missing|{rec.image_id}")
    return keys


def text_row_keys(captions) -> list[str]:
    return [hashlib.sha1(c.encode()).hexdigest() for c in captions]


# ---- the feature cache ----

class _BadChunk(Exception):
    pass


def _npy_shapes(path: Path) -> dict[str, tuple]:
    """Shape of each array of an ``.npz`` from its headers alone (the data is read, and CRC-checked, later)."""
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shapes[member.removesuffix(".npy")] = read(f)[0]
    return shapes


class _Heartbeat:
    """Touches a claim file every few seconds while its rows are computed, so others know its owner lives."""

    def __init__(self, path: Path, every: float):
        self.path, self.every, self.stop = path, every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class FeatureCache:
    """Per-row feature vectors on disk, one store per encoder setting, shared safely between processes.

    A store is keyed by a digest of everything that determines the numbers except the rows
    (weights, preprocessing, pooling, flipping); inside it each row is keyed by what it reads
    (an image file's bytes; a caption's text). Any subset of known rows (a validation split, a
    second CSV over the same images) is served from the store, and only rows never seen are
    computed, ``chunk_rows`` at a time, each chunk saved as soon as it is done.

        features/<key>/chunk-<id>.npz     immutable: row_keys plus one array per output, same length
        features/<key>/claim-<id>.json    rows a live process is computing now
        features/<key>/.lock              flock guarding chunk and claim changes
    """

    def __init__(self, cache_dir=None, chunk_rows: int | None = None, poll_s: float = 0.2):
        self.root = default_cache_dir(cache_dir) / "features"
        self.chunk_rows = int(chunk_rows or os.environ.get("FUSELABEL_CACHE_CHUNK_ROWS") or CHUNK_ROWS)
        self.poll_s = poll_s
        self._keys: dict[Path, np.ndarray] = {}   # chunk -> its row keys (chunks never change once written)

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def fetch(self, key: str, row_keys: list[str], compute, label: str) -> dict[str, np.ndarray]:
        """Arrays for ``row_keys`` in order; ``compute(indices)`` supplies the rows the store lacks.

        ``compute`` is called once per chunk of missing rows (indices into ``row_keys``) and returns a
        dict of arrays, one row per index.
        """
        store = self.root / key
        start, computed = time.time(), 0
        while True:
            computed += self._fill(store, row_keys, compute, label)
            try:
                with file_lock(store / ".lock", shared=True):
                    arrays = self._read(store, row_keys)
                break
            except _BadChunk as err:  # unreadable data found late: drop that chunk and compute its rows again
                if str(err):
                    self._discard(store, Path(str(err)))
        if computed:
            log.info("%s: %d rows computed in %.1fs%s (%s)", label, computed, time.time() - start,
                     f", {len(row_keys) - computed} cached" if computed < len(row_keys) else "", store)
        else:
            log.info("%s: %d rows cached (%s)", label, len(row_keys), store)
        self._compact(store)
        return arrays

    # -- filling: claim free rows, compute them, save them; wait for rows others are computing --

    def _fill(self, store: Path, row_keys: list[str], compute, label: str) -> int:
        first, seen = [], set()  # one index per distinct key: a repeated caption is computed once
        for i, k in enumerate(row_keys):
            if k not in seen:
                seen.add(k)
                first.append(i)
        computed, waiting = 0, False
        while True:
            with file_lock(store / ".lock"):
                index = self._index(store)
                claimed = self._live_claims(store)
                missing = [i for i in first if row_keys[i] not in index]
                mine = [i for i in missing if row_keys[i] not in claimed][:self.chunk_rows]
                claim = self._claim(store, [row_keys[i] for i in mine]) if mine else None
            if not missing:
                return computed
            if claim is None:  # every missing row is being computed by another process
                if not waiting:
                    waiting = True
                    log.info("%s: waiting for %d rows another process is computing", label, len(missing))
                time.sleep(self.poll_s)
                continue
            try:
                with _Heartbeat(claim, HEARTBEAT_S):
                    fresh = compute(mine)
                self._save_chunk(store, [row_keys[i] for i in mine], fresh, label)
            finally:
                claim.unlink(missing_ok=True)
            computed += len(mine)
            pause_for_test("cache-chunk-saved")

    def _claim(self, store: Path, keys: list[str]) -> Path:
        path = store / f"claim-{uuid.uuid4().hex}.json"
        write_atomic(path, json.dumps({"pid": os.getpid(), "host": _HOST, "rows": keys}).encode())
        return path

    def _live_claims(self, store: Path) -> set[str]:
        """Row keys claimed by live processes; stale claims (and temporaries of dead writers) are removed."""
        remove_stale_temporaries(store)
        rows: set[str] = set()
        for path in store.glob("claim-*.json"):
            try:
                claim = json.loads(path.read_text())
                age = time.time() - path.stat().st_mtime
            except (OSError, ValueError):
                continue  # vanished (finished) between listing and reading
            dead = claim.get("host") == _HOST and not _pid_alive(int(claim.get("pid", -1)))
            if dead or age > STALE_AFTER_S:
                log.warning("%s: claim of %d rows by pid %s on %s is stale; its rows will be computed again",
                            store, len(claim.get("rows", [])), claim.get("pid"), claim.get("host"))
                path.unlink(missing_ok=True)
                continue
            rows.update(claim.get("rows", []))
        return rows

    def _save_chunk(self, store: Path, keys: list[str], arrays: dict, label: str) -> None:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        wrong = {k: len(v) for k, v in arrays.items() if len(v) != len(keys)}
        if wrong or "row_keys" in arrays:
            raise ValueError(f"{label}: compute returned {wrong or 'a row_keys array'} for {len(keys)} rows")
        with atomic_path(store / f"chunk-{uuid.uuid4().hex}.npz", stage="cache-chunk-write") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, row_keys=np.asarray(keys, dtype=str), **arrays)

    # -- reading --

    def _chunks(self, store: Path) -> list[Path]:
        return sorted(store.glob("chunk-*.npz")) if store.is_dir() else []

    def _index(self, store: Path) -> dict[str, tuple[Path, int]]:
        """Row key -> (chunk, row) over every chunk that checks out; broken chunks are logged and removed."""
        index: dict[str, tuple[Path, int]] = {}
        for path in self._chunks(store):
            if path not in self._keys:
                try:
                    self._keys[path] = self._check(path)
                except FileNotFoundError:  # merged away by another process since the listing
                    continue
                except _BadChunk as err:
                    log.warning("%s: ignored (%s); its rows will be computed again", path, err)
                    path.unlink(missing_ok=True)
                    continue
            for row, k in enumerate(self._keys[path]):
                index.setdefault(str(k), (path, row))
        return index

    @staticmethod
    def _check(path: Path) -> np.ndarray:
        try:
            shapes = _npy_shapes(path)
            with np.load(path, allow_pickle=False) as data:
                keys = data["row_keys"]
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise _BadChunk(f"unreadable: {err}") from None
        lengths = {name: shape[0] if shape else None for name, shape in shapes.items()}
        if len(set(lengths.values())) != 1 or len(lengths) < 2 or keys.ndim != 1:
            raise _BadChunk(f"arrays disagree in length: {lengths}")
        return keys

    def _read(self, store: Path, row_keys: list[str]) -> dict[str, np.ndarray]:
        index = self._index(store)
        by_chunk: dict[Path, list[tuple[int, int]]] = {}
        for i, k in enumerate(row_keys):
            if k not in index:  # its chunk was found broken and removed since the rows were counted
                raise _BadChunk("")
            path, row = index[k]
            by_chunk.setdefault(path, []).append((i, row))
        out: dict[str, np.ndarray] = {}
        for path, pairs in by_chunk.items():
            dest = np.asarray([p[0] for p in pairs])
            rows = np.asarray([p[1] for p in pairs])
            try:
                with np.load(path, allow_pickle=False) as data:
                    for name in data.files:
                        if name == "row_keys":
                            continue
                        values = data[name]
                        if name not in out:
                            out[name] = np.empty((len(row_keys), *values.shape[1:]), dtype=values.dtype)
                        out[name][dest] = values[rows]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                log.warning("%s: ignored (unreadable: %s); its rows will be computed again", path, err)
                raise _BadChunk(str(path)) from None
        return out

    def _discard(self, store: Path, path: Path) -> None:
        with file_lock(store / ".lock"):
            path.unlink(missing_ok=True)
            self._keys.pop(path, None)

    def _compact(self, store: Path) -> None:
        """Many small chunks (many small fetches) are merged into one, under the lock, readers excluded."""
        small = [p for p in self._chunks(store) if len(self._keys.get(p, ())) < self.chunk_rows]
        if len(small) <= COMPACT_CHUNKS:
            return
        with file_lock(store / ".lock"):
            self._index(store)
            small = [p for p in self._chunks(store) if p in self._keys and len(self._keys[p]) < self.chunk_rows]
            if len(small) <= COMPACT_CHUNKS:
                return
            merged: dict[str, list] = {}
            seen: set[str] = set()
            for path in small:
                with np.load(path, allow_pickle=False) as data:
                    keep = [i for i, k in enumerate(data["row_keys"]) if str(k) not in seen]
                    seen.update(str(k) for k in data["row_keys"])
                    for name in data.files:
                        merged.setdefault(name, []).append(data[name][keep])
            with atomic_path(store / f"chunk-{uuid.uuid4().hex}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **{k: np.concatenate(v) for k, v in merged.items()})
            for path in small:  # a kill before these go leaves duplicates only: the index keeps the first
                path.unlink(missing_ok=True)
                self._keys.pop(path, None)
            log.info("%s: %d chunks merged into one", store, len(small))
