"""The model folder: everything predict needs, and nothing it must download.

    MODEL_DIR/
      fuselabel.json       folder format version and the fuselabel version that wrote it
      config.json          what the model is: the ``model`` group of fuselabel.config.Config
      run.json             how it was trained: the ``run`` group (no machine's paths, no devices)
      labels.json          label vocabulary (order of the output columns), display names, and the
                           training table's column names and label separator
      thresholds.json      the chosen decision rule plus the alternatives tuned beside it
      preprocessing.json   image preprocessing from the backbone's config
      int8_ranges.json     activation ranges of a static int8 image encoder (only then), as calibrated
      text/                Hugging Face config + tokenizer of the text encoder
      model.safetensors    all weights (fp16 by default)
      split.json           ImageIDs of the train and validation sides
      metrics.json         validation report;  history.csv  per-epoch log
      sha256.json          a hash of every other file, written last

A folder is written beside its destination and renamed into place only once complete and
within the size budget, so a failed save never destroys an earlier model; it replaces only a model
folder (``outputs``). A folder is loaded as one snapshot: every file is read through one open
descriptor of the folder, so a load that races a replacement gets the old model or the new one,
never one's thresholds with the other's weights.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import writers
from .config import Config, group_of
from .onnxrt import INT8_CALIBRATION
from .outputs import OutputError, kind_of, output_lock
from .preprocess import Preprocess
from .writers import TEMPORARY_SUFFIX, ordinary_permissions, temporary_beside

if TYPE_CHECKING:  # torch, the network and the tokenizer load with the weights: reading a folder's records
    import torch  # (settings, size, files) and replacing folders need none of them

    from .network import FuseLabelNet

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


@dataclass
class Bundle:
    net: FuseLabelNet
    config: Config
    labels: list[str]
    label_names: dict[str, str]
    thresholds: dict
    preprocessing: dict | None
    tokenizer: object | None
    path: Path | None = None
    extra: dict = field(default_factory=dict)
    table: dict = field(default_factory=dict)  # the training table's columns and label separator (tables.py)

    @property
    def threshold_vector(self):
        import numpy as np

        return np.asarray(self.thresholds["thresholds"], dtype=np.float32)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


SCALE_SUFFIX = ".__int8_scale"


def _state_for_saving(net: torch.nn.Module, dtype: str) -> dict:
    """Weights as stored: fp32, fp16, or int8 matrices (weight-only, one fp16 scale per row) with the rest fp16.

    int8 storage shrinks the folder; the weights are expanded back to floats on loading, so
    inference runs at full precision on the rounded weights.
    """
    import torch

    state = {}
    for name, tensor in net.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and dtype in ("fp16", "int8"):
            if dtype == "int8" and tensor.ndim == 2 and tensor.numel() >= 4096:
                scale = tensor.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
                state[name] = torch.round(tensor.float() / scale).clamp(-127, 127).to(torch.int8)
                state[name + SCALE_SUFFIX] = scale.half()
                continue
            tensor = tensor.half()
        state[name] = tensor.contiguous()
    return state


def _state_for_loading(state: dict) -> dict:
    out = {}
    for name, tensor in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name + SCALE_SUFFIX)
        out[name] = tensor.float() * scale.float() if scale is not None else tensor
    return out


def stored_state(net: torch.nn.Module, dtype: str) -> dict:
    """The weights a folder saved as ``dtype`` gives back on loading (rounded to fp16, or int8 and expanded)."""
    return _state_for_loading(_state_for_saving(net, dtype))


def save_bundle(out: str | Path, bundle: Bundle, extra_files: dict[str, str | Path] | None = None) -> int:
    """Write ``bundle`` to ``out`` atomically; returns the folder's size in bytes."""
    out = Path(out)
    with output_lock(out):
        return _save_bundle(out, bundle, extra_files)


def _save_bundle(out: Path, bundle: Bundle, extra_files) -> int:
    from safetensors.torch import save_file

    tmp = new_folder_beside(out)
    try:
        from . import __version__

        cfg = bundle.config
        saved = cfg.saved()
        _write_json(tmp / FORMAT_FILE, {"format_version": FORMAT_VERSION, "fuselabel": __version__})
        _write_json(tmp / "config.json", saved["model"])
        _write_json(tmp / "run.json", saved["run"])
        _write_json(tmp / "labels.json", {"labels": bundle.labels, "names": bundle.label_names, "table": bundle.table})
        _write_json(tmp / "thresholds.json", bundle.thresholds)
        if bundle.preprocessing is not None:
            preprocessing = Preprocess.of(bundle.preprocessing).to_config()
            ranges = preprocessing.pop(INT8_CALIBRATION, None)
            _write_json(tmp / "preprocessing.json", preprocessing)
            if ranges is not None:
                _write_json(tmp / INT8_RANGES, ranges)
        if bundle.net.text_encoder is not None:
            bundle.net.text_encoder.backbone.config.save_pretrained(tmp / "text")
            bundle.tokenizer.save_pretrained(tmp / "text")
        for name, src in (extra_files or {}).items():
            if src and Path(src).exists():
                shutil.copyfile(src, tmp / name)
        try:
            save_file(
                _state_for_saving(bundle.net, cfg.save_dtype),
                str(tmp / WEIGHTS),
                metadata={"format": "pt", "dtype": cfg.save_dtype},
            )
        except Exception as err:  # safetensors reports a full disk as its own error, without the path
            if type(err).__name__ != "SafetensorError":
                raise
            raise OSError(errno.EIO, f"cannot write the weights ({err})", str(out / WEIGHTS)) from err
        for name, data in bundle.extra.items():  # last, so that a callable (metrics with timings) can time the rest
            _write_json(tmp / name, data() if callable(data) else data)
        _write_json(tmp / CHECKSUMS, {name: _sha256(tmp / name) for name in _files_of(tmp)})
        size = folder_size(tmp)
        if size > cfg.max_size_mb * 1e6:
            raise BundleError(
                f"model folder would be {size / 1e6:.1f} MB, over the budget of {cfg.max_size_mb:g} MB "
                f"(--max-size-mb); try save_dtype=fp16 or a smaller encoder. Nothing was written to {out}."
            )
        ordinary_permissions(tmp)
        writers.reached("bundle-write")
        replace_folder(tmp, out)
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path.parent}: not a fuselabel model folder ({path.name} is missing)") from None
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None


def _json_of(files: dict[str, bytes], path: Path, name: str):
    if name not in files:
        raise BundleError(f"{path}: not a fuselabel model folder ({name} is missing)")
    try:
        return json.loads(files[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path / name}: not valid JSON ({err})") from None


def _preprocessing_of(files: dict[str, bytes], path: Path) -> dict | None:
    """``preprocessing.json`` read through its Preprocess: keys an older folder left out get timm's defaults."""
    if "preprocessing.json" not in files:
        return None
    try:
        return Preprocess.of(_json_of(files, path, "preprocessing.json")).to_config()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise BundleError(f"{path / 'preprocessing.json'}: not an image preprocessing ({err})") from None


def _config_of(files: dict[str, bytes], path: Path) -> Config:
    version = 1
    if FORMAT_FILE in files:
        info = _json_of(files, path, FORMAT_FILE)
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"{path}: model folder format {version!r} was written by fuselabel "
                f"{info.get('fuselabel', '?')}; this fuselabel reads formats 1 to {FORMAT_VERSION}: "
                "upgrade fuselabel to load it"
            )
    values = _json_of(files, path, "config.json")
    if version >= 2 and "run.json" in files:
        values = {**_json_of(files, path, "run.json"), **values}
    # Where a model ran is not part of it: older folders stored devices and cache folders, which are dropped.
    kept = {}
    for key, value in values.items():
        try:
            if group_of(key) != "runtime":
                kept[key] = value
        except KeyError:
            raise BundleError(
                f"{path / 'config.json'}: unknown setting {key!r}; the folder was written by a "
                "different fuselabel version"
            ) from None
    try:
        return Config.from_dict(kept, source=str(path / "config.json"))
    except ValueError as err:
        raise BundleError(str(err)) from None


def read_config(path: Path) -> Config:
    """The settings a model folder was saved with, from any folder format this version reads."""
    names = (FORMAT_FILE, "config.json", "run.json")
    return _config_of({n: (path / n).read_bytes() for n in names if (path / n).is_file()}, path)


class _Moved(Exception):
    """The folder was replaced while it was being read: read the new one."""


def _read_at(dir_fd: int, names) -> dict[str, bytes]:
    """The files of ``names`` that the open folder ``dir_fd`` holds, read through it (never by path)."""
    present = set(os.listdir(dir_fd))
    files = {}
    for name in names:
        if name not in present:
            continue
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:  # listed a moment ago: the folder is being removed after a replacement
            raise _Moved() from None
        with os.fdopen(fd, "rb") as f:
            files[name] = f.read()
    return files


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
    hashes = _json_of(files, path, CHECKSUMS)
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


def _preprocessing_of(files: dict, path: Path) -> dict | None:
    """preprocessing.json with the int8 ranges of their own file (a folder written before keeps them inside)."""
    if "preprocessing.json" not in files:
        return None
    preprocessing = _json_of(files, path, "preprocessing.json")
    if INT8_RANGES in files:
        preprocessing[INT8_CALIBRATION] = _json_of(files, path, INT8_RANGES)
    return preprocessing


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    from safetensors.torch import load as load_weights

    from .encoders import create_tokenizer
    from .network import FuseLabelNet

    path, files = snapshot(path)
    config = _config_of(files, path)
    labels = _json_of(files, path, "labels.json")
    thresholds = _json_of(files, path, "thresholds.json")
    preprocessing = _preprocessing_of(files, path)
    if WEIGHTS not in files:
        raise BundleError(f"{path}: {WEIGHTS} is missing")
    try:
        state = _state_for_loading(load_weights(files[WEIGHTS]))
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise BundleError(
            f"{path / WEIGHTS}: not a readable weights file ({err}); save or train the model again"
        ) from None
    # The tokenizer and text-encoder structure load from a folder: the snapshot's copy, not the live one.
    with tempfile.TemporaryDirectory(prefix="fuselabel-text-") as text_dir:
        for name, data in files.items():
            if name.startswith(TEXT_DIR + "/"):
                (Path(text_dir) / name.split("/", 1)[1]).write_bytes(data)
        tokenizer = create_tokenizer(text_dir) if config.uses_text else None
        # Architectures only: the weights come from model.safetensors, so nothing is downloaded.
        net = FuseLabelNet(config, len(labels["labels"]), pretrained=False, text_source=text_dir)
    expected = net.state_dict()
    wrong = [
        f"{name} has shape {tuple(t.shape)} where the model expects {tuple(expected[name].shape)}"
        for name, t in state.items()
        if name in expected and t.shape != expected[name].shape
    ]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise BundleError(
            f"{path / WEIGHTS}: weights do not fit the model of config.json: tensor {wrong[0]}{more}; "
            "the folder's files do not belong together: save or train the model again"
        )
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(
            f"{path / WEIGHTS}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    net = net.float().eval().to(device)
    extra = {n: _json_of(files, path, n) for n in ("split.json", "metrics.json") if n in files}
    return Bundle(
        net=net,
        config=config,
        labels=labels["labels"],
        label_names=labels.get("names", {}),
        thresholds=thresholds,
        preprocessing=preprocessing,
        tokenizer=tokenizer,
        path=path,
        extra=extra,
        table=labels.get("table") or {},
    )


def describe(path: str | Path) -> str:
    """What ``fuselabel info`` prints: size on disk by part, parameters by part, key settings, validation figures."""
    from safetensors import safe_open

    path = readable_folder(path)
    if not (path / "config.json").exists():
        raise BundleError(f"{path}: not a fuselabel model folder (config.json is missing)")
    config = read_config(path).to_dict()
    labels = _read_json(path / "labels.json")
    thresholds = _read_json(path / "thresholds.json")
    lines = [f"model folder {path}: {folder_size(path) / 1e6:.1f} MB on disk"]
    for p in sorted(path.iterdir()):
        size = folder_size(p) if p.is_dir() else p.stat().st_size
        lines.append(f"  {p.name + ('/' if p.is_dir() else ''):24s} {size / 1e6:8.2f} MB")
    if (path / WEIGHTS).exists():
        counts: dict[str, int] = {}
        dtypes: set[str] = set()
        with safe_open(str(path / WEIGHTS), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.endswith(SCALE_SUFFIX):
                    continue
                sl = f.get_slice(key)
                part = key.split(".")[0]
                n = 1
                for d in sl.get_shape():
                    n *= d
                counts[part] = counts.get(part, 0) + n
                dtypes.add(str(sl.get_dtype()))
        lines.append(
            "parameters: "
            + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
            + f" (stored as {', '.join(sorted(dtypes))})"
        )
    lines.append(
        f"kind {config['kind']}"
        + (f" ({config['late_combine']})" if config["kind"] == "late" else "")
        + f"; image {config['image_model'] if config['kind'] != 'text' else '-'}"
        + f"; text {config['text_model'] if config['kind'] != 'image' else '-'}; regime {config['regime']}"
    )
    lines.append(
        f"task {config['task']}"
        + ("; one label a row, the most probable" if config["task"] == "multiclass" else "")
        + (f"; text length {config['text_max_length']} tokens" if config["kind"] != "image" else "")
    )
    lines.append(f"labels ({len(labels['labels'])}): {' '.join(labels['labels'])}")
    lines.append(
        f"thresholds: {thresholds['method']}, validation mean F1 {thresholds['val_mean_f1']:.4f}"
        + (f", late weight {thresholds['late_weight']}" if "late_weight" in thresholds else "")
    )
    if (path / "metrics.json").exists():
        m = _read_json(path / "metrics.json")
        v = m.get("validation", {})
        lines.append(
            f"validation: mean F1 {v.get('mean_f1', float('nan')):.4f}, micro F1 "
            f"{v.get('micro_f1', float('nan')):.4f}, macro F1 {v.get('macro_f1', float('nan')):.4f} "
            f"on {v.get('rows', '?')} rows; trained in {m.get('timings', {}).get('total_s', 0):.0f}s"
        )
    return "\n".join(lines)


def convert_bundle(src: str | Path, out: str | Path, save_dtype: str, max_size_mb: float | None = None) -> int:
    """Re-save a model folder with other weight storage (e.g. int8 to shrink it); returns the new size."""
    bundle = load_bundle(src)
    changes = {"save_dtype": save_dtype}
    if max_size_mb is not None:
        changes["max_size_mb"] = max_size_mb
    bundle.config = bundle.config.replace(**changes)  # split.json and metrics.json came with the load
    return save_bundle(out, bundle, {"history.csv": bundle.path / "history.csv"})
