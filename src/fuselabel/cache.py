"""The frozen-feature cache: files that several processes share, written atomically (``writers``).

Several processes may fill one cache folder at once (the ranks of a DDP run, two runs started
side by side, a run killed and started again). The rules that keep that safe:

- a file is written under a temporary name in its destination folder, flushed to disk and renamed
  into place (``os.replace``), so a reader sees the whole file or none of it; a killed writer leaves
  only a temporary file that nothing reads, and that the next writer removes once the lock
  (``writers.file_lock``) its writer held on it is free (the lock goes when its process dies);
- a feature store is a folder of immutable chunk files named by the hash of their bytes, checked on
  reading; its index is the union of the chunks' row keys, so adding rows never rewrites what is
  stored, and a damaged chunk is removed and its rows computed again;
- the ranks of one run split the rows they need into fixed shares (share ``i`` to rank
  ``i % world``), so no two of them compute a row; separate runs may both compute a row,
  and each stores a whole chunk of it.

There are no claims, process ids, host names or clocks. See docs/robustness.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np

from . import writers
from .writers import atomic_path, file_lock, remove_abandoned

log = logging.getLogger(__name__)

CHUNK_ROWS = 2000  # rows computed and saved at a time: a killed extraction keeps every finished chunk
COMPACT_CHUNKS = 16  # more small chunks than this in a store are merged into one
WAIT_LOG_S = 60.0  # how often a rank waiting for the other ranks' shares says so


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    base = (
        cache_dir
        or os.environ.get("FUSELABEL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fuselabel"
    )
    return Path(base)


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


_HASHED = re.compile(r"chunk-([0-9a-f]{64})\.npz")  # chunk-<uuid>.npz: earlier versions, zip CRCs only


def _npy_shapes(z: zipfile.ZipFile) -> dict[str, tuple]:
    """Shape of each array of an ``.npz`` from its headers alone."""
    shapes = {}
    for member in z.namelist():
        with z.open(member) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shapes[member.removesuffix(".npy")] = read(f)[0]
    return shapes


def _chunk_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _log_fetch(label: str, store: Path, rows: int, computed: int, seconds: float) -> None:
    if not computed:
        log.info("%s: %d rows cached (%s)", label, rows, store)
        return
    cached = f", {rows - computed} cached" if computed < rows else ""
    log.info("%s: %d rows computed in %.1fs%s (%s)", label, computed, seconds, cached, store)


class FeatureCache:
    """Per-row feature vectors on disk, one store per encoder setting, shared safely between processes.

    A store is keyed by a digest of everything that determines the numbers except the rows
    (weights, preprocessing, pooling, flipping); inside it each row is keyed by what it reads
    (an image file's bytes; a caption's text). Any subset of known rows (a validation split, a
    second CSV over the same images) is served from the store, and only rows never seen are
    computed, ``chunk_rows`` at a time, each chunk saved as soon as it is done.

        features/<key>/chunk-<sha256>.npz   immutable: row_keys plus one array per output, same length
        features/<key>/.lock                lock: merging and removing chunks exclude readers
        features/<key>/.chunk-<sha256>.npz.<random>.tmp   a chunk being written (locked by its writer); never read
    """

    def __init__(self, cache_dir=None, chunk_rows: int | None = None, poll_s: float = 0.2):
        self.root = default_cache_dir(cache_dir) / "features"
        self.chunk_rows = int(chunk_rows or os.environ.get("FUSELABEL_CACHE_CHUNK_ROWS") or CHUNK_ROWS)
        self.poll_s = poll_s
        self._keys: dict[Path, np.ndarray] = {}  # chunk -> its row keys (chunks never change once written)

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def fetch(
        self, key: str, row_keys: list[str], compute, label: str, *, rank: int = 0, world: int = 1
    ) -> dict[str, np.ndarray]:
        """Arrays for ``row_keys`` in order; ``compute(indices)`` supplies the rows the store lacks.

        ``compute`` is called once per chunk of missing rows (indices into ``row_keys``) and returns a
        dict of arrays, one row per index. The ``world`` processes of one run pass the same
        ``row_keys`` and each its ``rank``: each computes only its own shares, then waits for the rest.
        """
        store = self.root / key
        store.mkdir(parents=True, exist_ok=True)
        start, computed = time.time(), 0
        # The first row of each distinct key: a repeated caption is computed once.
        first = sorted({k: i for i, k in reversed(list(enumerate(row_keys)))}.values())
        shares = [first[lo : lo + self.chunk_rows] for lo in range(0, len(first), self.chunk_rows)]
        mine = shares[rank::world]
        waited = None
        while True:
            index = self._index(store)  # listed once; again only before computing, to see others' chunks
            for share in mine:
                if not any(row_keys[i] not in index for i in share):
                    continue
                index = self._index(store)
                todo = [i for i in share if row_keys[i] not in index]
                if todo:
                    writers.reached("cache-chunk-listed")
                    self._save_chunk(store, [row_keys[i] for i in todo], compute(todo), label)
                    computed += len(todo)
                    writers.reached("cache-chunk-saved")
            index = self._index(store)
            if any(row_keys[i] not in index for i in first):
                if waited is None or time.time() - waited > WAIT_LOG_S:
                    log.info("%s: waiting for the rows the other %d processes of this run compute", label, world - 1)
                    waited = time.time()
                time.sleep(self.poll_s)  # another rank's share, or one of ours found damaged and removed
                continue
            try:
                with file_lock(store / ".lock"):
                    arrays = self._read(store, row_keys)
                break
            except _BadChunk as err:  # unreadable data found late: drop that chunk and compute its rows again
                if str(err):
                    self._discard(store, Path(str(err)))
                if world > 1:
                    mine = shares  # whose share it was is unknown: whoever gets there first computes it
        _log_fetch(label, store, len(row_keys), computed, time.time() - start)
        self._compact(store)
        return arrays

    def _save_chunk(self, store: Path, keys: list[str], arrays: dict, label: str) -> None:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        wrong = {k: len(v) for k, v in arrays.items() if len(v) != len(keys)}
        if wrong or "row_keys" in arrays:
            raise ValueError(f"{label}: compute returned {wrong or 'a row_keys array'} for {len(keys)} rows")
        self._write(store, {"row_keys": np.asarray(keys, dtype=str), **arrays}, stage="cache-chunk-write")

    @staticmethod
    def _write(store: Path, arrays: dict, stage: str | None = None) -> Path:
        """A chunk named by the hash of its bytes, so that reading it can check every byte."""
        remove_abandoned(store)
        data = _chunk_bytes(arrays)
        path = store / f"chunk-{hashlib.sha256(data).hexdigest()}.npz"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
            if stage:
                writers.reached(stage)
        return path

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
        """The chunk's row keys, once its bytes match its name's hash and its arrays agree in length."""
        data = path.read_bytes()
        named = _HASHED.fullmatch(path.name)
        if named and hashlib.sha256(data).hexdigest() != named.group(1):
            raise _BadChunk(f"its bytes do not match its hash: {len(data)} bytes, damaged or cut short")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                shapes = _npy_shapes(z)
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                keys = arrays["row_keys"]
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
            written = self._write(store, {k: np.concatenate(v) for k, v in merged.items()})
            for path in small:  # a kill before these go leaves duplicates only: the index keeps the first
                if path != written:
                    path.unlink(missing_ok=True)
                    self._keys.pop(path, None)
            log.info("%s: %d chunks merged into one", store, len(small))
