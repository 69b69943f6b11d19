"""A model folder's files on disk: replaced whole, read as one snapshot.

A folder is built beside its destination and renamed into place only once complete
(``replace_folder``), so at every moment the path holds the old folder or the new one. A load
reads every file through one open descriptor of the folder (``snapshot``), so a load that races a
replacement gets the old model or the new one, never one's thresholds with the other's weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from . import writers
from .outputs import OutputError, kind_of
from .writers import TEMPORARY_SUFFIX, temporary_beside

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
FORMAT_FILE = "fuselabel.json"
CHECKSUMS = "sha256.json"
TEXT_DIR = "text"
# The int8 image encoder's calibration ranges, in a file of their own (older folders keep them in preprocessing.json)
INT8_RANGES = "int8_ranges.json"
# What a load reads: one snapshot of these (and of text/), never the rest of the folder (e.g. an onnx/ export)
LOADED_FILES = (
    FORMAT_FILE,
    "config.json",
    "run.json",
    "labels.json",
    "thresholds.json",
    "preprocessing.json",
    INT8_RANGES,
    "split.json",
    "metrics.json",
    WEIGHTS,
    CHECKSUMS,
)
# 2: config.json holds the model settings only, run.json the run's; 1 (no fuselabel.json): every setting in config.json
FORMAT_VERSION = 2


class BundleError(RuntimeError):
    """A model folder that is missing, incomplete, or over its size budget."""


def json_of(files: dict[str, bytes], path: Path, name: str):
    if name not in files:
        raise BundleError(f"{path}: not a fuselabel model folder ({name} is missing)")
    try:
        return json.loads(files[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path / name}: not valid JSON ({err})") from None


def new_folder_beside(out: Path) -> Path:
    """An empty folder beside ``out`` to build its replacement in.

    Called under ``out``'s lock (``outputs.output_lock``): no other writer of ``out`` lives, so any
    temporary of ``out`` there (``writers.temporary_beside``) was left by one that died, and is removed.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    for left in _temporaries(out):
        shutil.rmtree(left, ignore_errors=True)
    tmp = temporary_beside(out)
    tmp.mkdir()
    return tmp


def _temporaries(out: Path):
    """The folders replacements of ``out`` are built in (a name like ``m[1]`` matched as written); ``.OUT.tmp.*``:
    those of earlier versions."""
    name = glob.escape(out.name)
    return [*out.parent.glob(f".{name}.*{TEMPORARY_SUFFIX}"), *out.parent.glob(f".{name}.tmp.*")]


def _set_aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # e.g. NFS, FUSE
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished folder onto ``out``; at every moment ``out`` is the old folder or the new one.

    Where the file system can swap two folders atomically (Linux: ext4, xfs, btrfs, tmpfs) it does;
    elsewhere the old folder is set aside (``.OUT.old``) for the instant between two renames, and a
    kill in that instant is healed by the next save, while readers load the set-aside copy.

    Only a folder of the same kind as ``tmp`` (``outputs.kind_of``: a model folder, an ONNX folder, a
    report), or an empty one, is replaced: never a file, nor a folder of anything else.
    """
    old = _set_aside(out)
    if not out.exists() and old.is_dir():  # a save was killed between its renames: the previous folder back
        os.replace(old, out)
    found, new = kind_of(out), kind_of(tmp)
    if found is not None and found != new:
        raise OutputError(
            f"{out}: already exists and is not a folder of the kind being written ({found}, not "
            f"{new}); it was left as it is: choose a new path, or move it away first"
        )
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
        return
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        writers.reached("bundle-swap")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def readable_folder(path: str | Path) -> Path:
    """``path``, or the previous folder set aside there when a save was killed between its two renames."""
    path = Path(path)
    old = _set_aside(path)
    if not path.exists() and old.is_dir():
        log.warning("%s: missing while %s exists (a save was interrupted); reading the previous folder", path, old)
        return old
    return path


class _Moved(Exception):
    """The folder was replaced while it was being read: read the new one."""


def _read_at(dir_fd: int, names) -> dict[str, bytes]:
    """The files of ``names`` that the open folder ``dir_fd`` holds, read through it (never by path).

    Every file is opened before any is read: an open file stays readable when a replacement removes the folder, so
    only the opening must fall between two replacements, not the reading of the weights. (Read one by one, loads of
    a folder replaced in a tight loop could lose every race for ten seconds.)"""
    present = set(os.listdir(dir_fd))
    with contextlib.ExitStack() as stack:
        handles = {}
        for name in names:
            if name not in present:
                continue
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:  # listed a moment ago: the folder is being removed after a replacement
                raise _Moved() from None
            handles[name] = stack.enter_context(os.fdopen(fd, "rb"))
        return {name: f.read() for name, f in handles.items()}


def _snapshot_at(path: Path) -> dict[str, bytes]:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        files = _read_at(dir_fd, LOADED_FILES)
        if TEXT_DIR in os.listdir(dir_fd):
            try:
                text_fd = os.open(TEXT_DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
            except FileNotFoundError:
                raise _Moved() from None
            try:
                names = [n for n in os.listdir(text_fd) if not n.startswith(".")]
                files.update({f"{TEXT_DIR}/{n}": data for n, data in _read_at(text_fd, names).items()})
            finally:
                os.close(text_fd)
        # A folder replaced and already being removed may lack files: then what is at the path now is read.
        if not {"config.json", WEIGHTS} <= set(files) and os.stat(path).st_ino != os.fstat(dir_fd).st_ino:
            raise _Moved()
        return files
    finally:
        os.close(dir_fd)


def _snapshot_by_path(path: Path) -> dict[str, bytes]:
    """Where folders cannot be opened as descriptors: by path, checked against ``sha256.json`` below."""
    files = {n: (path / n).read_bytes() for n in LOADED_FILES if (path / n).is_file()}
    if (path / TEXT_DIR).is_dir():
        files.update({f"{TEXT_DIR}/{p.name}": p.read_bytes() for p in (path / TEXT_DIR).iterdir() if p.is_file()})
    return files


def _checked(files: dict[str, bytes], path: Path) -> dict[str, bytes]:
    """``files``, if each matches its hash in ``sha256.json`` (folders saved before it existed are not checked)."""
    if CHECKSUMS not in files:
        # A folder without the record: one saved before it existed, or one being removed while it was read
        # (the set-aside old folder of a replacement). Which, the same bytes on a second read tell (snapshot).
        absent = [name for name in ESSENTIAL if name not in files]
        if absent:
            raise _Moved(f"{', '.join(absent)} missing")
        return files
    hashes = json_of(files, path, CHECKSUMS)
    wrong = [
        name for name, data in files.items() if name in hashes and hashlib.sha256(data).hexdigest() != hashes[name]
    ]
    missing = [name for name in hashes if name not in files and (name in LOADED_FILES or name.startswith(TEXT_DIR))]
    if wrong or missing:
        raise _Moved(f"{', '.join(wrong + missing)} do not match {CHECKSUMS}")
    return files


# What every model folder has, whatever version wrote it.
ESSENTIAL = ("config.json", "labels.json", "thresholds.json", WEIGHTS)

# Folders opened as descriptors, files read relative to them: Linux and macOS (not Windows).
_BY_FD = os.open in os.supports_dir_fd and os.listdir in os.supports_fd and hasattr(os, "O_DIRECTORY")


def _being_replaced(path: Path) -> bool:
    """Whether a save of ``path`` is under way: its replacement being built beside it, or the old one set aside."""
    return _set_aside(path).exists() or any(_temporaries(path))


def snapshot(path: str | Path, attempts: int = 5, patience_s: float = 10.0) -> tuple[Path, dict[str, bytes]]:
    """(folder, {name: bytes}) of the files a load reads, all from one version of the folder.

    A read that a replacement interrupts is read again: ``attempts`` times at least, and for up to
    ``patience_s`` seconds while replacements keep coming (a folder re-saved in a loop, say), since any
    version read whole will do.
    """
    last: Exception | None = None
    previous = files = None
    deadline = time.monotonic() + patience_s
    attempt = 0
    while attempt < attempts or (isinstance(last, (_Moved, FileNotFoundError)) and time.monotonic() < deadline):
        attempt += 1
        folder = readable_folder(path)
        if not folder.is_dir():
            # Between the two renames of a replacement where folders cannot be swapped: the new folder is
            # being built beside it, or the old one set aside. Anything else is a folder that is not there.
            if last is None and not _being_replaced(Path(path)):
                raise BundleError(f"{folder}: model folder not found")
            last = last or NotADirectoryError(f"{folder} missing while it was replaced")
            time.sleep(0.01 * attempt)
            continue
        try:
            files = _snapshot_at(folder) if _BY_FD else _snapshot_by_path(folder)
            return folder, _checked(files, folder)
        except (_Moved, FileNotFoundError) as err:
            if isinstance(err, _Moved) and err.args and files == previous:
                # The same bytes twice: no replacement under way; the files were changed after the save.
                log.warning("%s: %s (edited since it was saved?); loading it as it is", folder, err)
                return folder, files
            last, previous, files = err, (files if isinstance(err, _Moved) and err.args else None), None
    raise BundleError(
        f"{path}: the folder changed on every one of {attempt} reads ({last or 'replaced'}); "
        "if nothing is writing it, it is damaged: save or train the model again"
    )
