"""What a command may write, and to where: checked before any work, held while it writes.

Every command names its outputs (``--out``, ``--proba``, ``--json``, a work folder). Before any
work :func:`check_output` refuses, with the path and what to do instead, an output that

- is one of the run's inputs (the same file, or a folder holding or inside an input model folder),
- is another output of the same run,
- exists and is something else: a model folder replaces only a model folder, an ONNX folder only
  an ONNX folder, a report only a report, a file only a file (never a folder of the user's data),
- lies in a folder that cannot be written.

:func:`output_lock` holds the lock of ``writers.file_lock`` on ``.NAME.lock`` beside the output while
a command writes it, so a second writer is refused at once, naming the first. The lock goes when its
process dies, whatever the clocks or host names say; the pid and host in the file are only for the
message. :func:`explain_error` turns the machine's limits (a full disk, a read-only
folder, a path that is a folder where a file was meant) into one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from pathlib import Path

from .writers import LockHeld, file_lock

# What each kind of output is recognised by, when it already exists.
MODEL, ONNX, REPORT, FILE, WORK = "model", "onnx", "report", "file", "work"
MODEL_MARKER = "fuselabel.json"  # format 2 model folders; format 1 had config.json + model.safetensors
ONNX_MARKER = "manifest.json"  # runtime.MANIFEST of ``fuselabel export``
REPORT_MARKERS = ('<meta name="generator" content="fuselabel report">', "<title>fuselabel report")
WORK_MARKER = "run.json"  # a training run's work folder (train.default_work_dir)
ONNX_IN_MODEL = "onnx"  # ``fuselabel export``'s default place: MODEL/onnx
KIND_NAMES = {
    MODEL: "a fuselabel model folder",
    ONNX: "an exported ONNX folder",
    REPORT: "a fuselabel report",
    FILE: "a file",
    WORK: "a training work folder",
    "folder": "a folder that is none of fuselabel's",
    "other": "neither a file nor a folder",
}


class OutputError(ValueError):
    """An output that would destroy something, or that cannot be written; the message says what to do."""


def kind_of(path: str | os.PathLike) -> str | None:
    """What is at ``path`` now: None (nothing, or an empty folder), a kind above, ``folder`` or ``other``."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return FILE
    if not path.is_dir():
        return "other"
    if (path / MODEL_MARKER).is_file() or ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        return MODEL
    if (path / ONNX_MARKER).is_file():
        return ONNX
    if (path / "index.html").is_file() and is_report_page(path / "index.html"):
        return REPORT
    if (path / WORK_MARKER).is_file():  # a model folder has one too, but is recognised above
        return WORK
    try:
        return "folder" if any(path.iterdir()) else None
    except OSError:
        return "folder"


def is_report_page(path: Path) -> bool:
    """Whether the HTML file at ``path`` is a page ``fuselabel report`` wrote (its head carries the marker)."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    return any(marker in head for marker in REPORT_MARKERS)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child.resolve().is_relative_to(parent.resolve())


def _writable_parent(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a folder this process can write."""
    parent = path.absolute().parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is a file, not a folder; choose an output inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{path}: the folder {parent} cannot be written (read-only or not yours); "
            "choose an output in a folder you can write"
        )


def check_output(path: str | os.PathLike, kind: str, inputs=(), other_outputs=()) -> Path:
    """Refuse ``path`` as an output of ``kind`` (``model``, ``onnx``, ``report``, ``file``, ``work``) if writing it
    would destroy an input, another output or something of another kind, or cannot succeed; returns it."""
    path = Path(path)
    for other in other_outputs:
        if other is not None and (path.absolute() == Path(other).absolute() or _same(path, Path(other))):
            raise OutputError(f"{path}: named for two outputs of the same command; give each its own path")
    for given in inputs:
        if given is None:
            continue
        given = Path(given)
        if (
            os.path.lexists(path)
            and os.path.lexists(given)
            and _same(path, given)
            or path.absolute() == given.absolute()
        ):
            raise OutputError(
                f"{path}: is an input of this command; writing it would replace what is being read: "
                "choose another output path"
            )
        if kind_of(given) in (MODEL, ONNX):
            if _inside(given, path):
                raise OutputError(
                    f"{path}: holds the input model folder {given}; writing it would delete that "
                    "model: choose another output path"
                )
            # export's default, MODEL/onnx, is the one thing a command writes inside a model folder
            if _inside(path, given) and not (kind == ONNX and path.absolute() == (given / ONNX_IN_MODEL).absolute()):
                raise OutputError(f"{path}: lies inside the input model folder {given}; choose an output outside it")
    found = kind_of(path)
    if found is not None and found != kind:
        what = KIND_NAMES.get(kind, kind)
        raise OutputError(
            f"{path}: already exists and is {KIND_NAMES[found]}, which {what} may not replace "
            "(its contents would be deleted): choose a new path, or move it away first"
        )
    _writable_parent(path)
    return path


# ---- one writer per output ----


def _lock_path(path: Path) -> Path:
    return path.absolute().parent / f".{path.name}.lock"


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


_held: dict[Path, int] = {}  # locks this process holds -> depth: re-entering (the CLI, then save_bundle) is fine


def _is_rank_zero() -> bool:
    """The first process of a multi-process run (the one that writes outputs); as Lightning reads its rank."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return os.environ[key].strip() in ("", "0")
    return True


@contextlib.contextmanager
def output_lock(path: str | os.PathLike):
    """Hold ``.NAME.lock`` beside ``path`` while writing it; another process holding it is an OutputError at once.

    Other ranks of a multi-process run write nothing: they take no lock.
    """
    path = Path(path)
    lock = _lock_path(path)
    if lock in _held or not _is_rank_zero():
        _held[lock] = _held.get(lock, 0) + 1
        try:
            yield path
        finally:
            _held[lock] -= 1
            if not _held[lock]:
                del _held[lock]
        return
    _writable_parent(path)
    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock(lock, wait=False))
    except LockHeld:
        raise OutputError(
            f"{path}: {_holder(lock)} is writing it now; wait for it to finish, or choose "
            f"another output path (the lock is {lock}, held by a live process)"
        ) from None
    with held:
        try:
            with open(lock, "w") as f:  # for the message of a second writer; the lock is the lock itself
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            _held[lock] = 1
            yield path
        finally:
            _held.pop(lock, None)
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still held: a writer waiting on it takes the next file at the path


@contextlib.contextmanager
def output_locks(*paths):
    """:func:`output_lock` on each path given (None: none)."""
    with contextlib.ExitStack() as stack:
        for path in paths:
            if path is not None:
                stack.enter_context(output_lock(path))
        yield


# ---- the machine's limits, as one line ----

_LIMITS = {
    errno.ENOSPC: "the disk is full: free space (or point the output, --work-dir or --cache-dir elsewhere) and run "
    "the command again",
    errno.EDQUOT: "the disk quota is used up: free space, or write elsewhere, and run the command again",
    errno.EROFS: "the file system is read-only: write the output to another folder",
    errno.EACCES: "permission denied: write to a folder you own, or fix its permissions",
    errno.EPERM: "operation not permitted: write to a folder you own, or fix its permissions",
    errno.EISDIR: "is a folder where a file was expected: name a file path",
    errno.ENOTDIR: "a part of the path is a file where a folder was expected: fix the path",
}


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, one it was raised from, or one a safetensors error carries."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _LIMITS:
            return err
        if type(err).__name__ == "SafetensorError":  # e.g. "IoError(Os { code: 28, kind: StorageFull, ... })"
            code = re.search(r"code: (\d+)", str(err))
            if code and int(code.group(1)) in _LIMITS:
                return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        err = err.__cause__ or err.__context__
    return None


def explain_error(err: BaseException) -> str | None:
    """One line for an error the machine caused (full disk, read-only or forbidden folder, file/folder mix-up,
    an unreadable weights file); None for anything else (a bug, which keeps its traceback)."""
    found = _os_error(err)
    if found is not None:
        where = found.filename or getattr(err, "filename", None)
        return f"{where or 'a file'}: {_LIMITS[found.errno]} ({found.strerror})"
    if type(err).__name__ == "SafetensorError":
        return (
            f"a weights file cannot be read or written ({err}); the model folder is damaged: save or "
            "train the model again"
        )
    return None
