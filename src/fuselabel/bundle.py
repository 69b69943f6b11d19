"""The model folder: everything predict needs, and nothing it must download.

    MODEL_DIR/
      fuselabel.json       folder format version and the fuselabel version that wrote it
      config.json          what the model is: the ``model`` group of fuselabel.config.Config
      run.json             how it was trained: the ``run`` group (no machine's paths, no devices)
      labels.json          label vocabulary (order of the output columns) and display names
      thresholds.json      the chosen decision rule plus the alternatives tuned beside it
      preprocessing.json   image preprocessing from the backbone's config
      text/                Hugging Face config + tokenizer of the text encoder
      model.safetensors    all weights (fp16 by default)
      split.json           ImageIDs of the train and validation sides
      metrics.json         validation report;  history.csv  per-epoch log

A folder is written beside its destination and renamed into place only once complete and
within the size budget, so a failed save never destroys an earlier model.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import pause_for_test, remove_stale_temporaries, temporary_name
from .config import Config, group_of
from .encoders import create_tokenizer
from .network import FuseLabelNet

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
FORMAT_FILE = "fuselabel.json"
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


def save_bundle(out: str | Path, bundle: Bundle, extra_files: dict[str, str | Path] | None = None) -> int:
    """Write ``bundle`` to ``out`` atomically; returns the folder's size in bytes."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_folder_beside(out)
    try:
        from . import __version__

        cfg = bundle.config
        saved = cfg.saved()
        _write_json(tmp / FORMAT_FILE, {"format_version": FORMAT_VERSION, "fuselabel": __version__})
        _write_json(tmp / "config.json", saved["model"])
        _write_json(tmp / "run.json", saved["run"])
        _write_json(tmp / "labels.json", {"labels": bundle.labels, "names": bundle.label_names})
        _write_json(tmp / "thresholds.json", bundle.thresholds)
        if bundle.preprocessing is not None:
            _write_json(tmp / "preprocessing.json", bundle.preprocessing)
        if bundle.net.text_encoder is not None:
            bundle.net.text_encoder.backbone.config.save_pretrained(tmp / "text")
            bundle.tokenizer.save_pretrained(tmp / "text")
        for name, data in bundle.extra.items():
            _write_json(tmp / name, data)
        for name, src in (extra_files or {}).items():
            if src and Path(src).exists():
                shutil.copyfile(src, tmp / name)
        save_file(_state_for_saving(bundle.net, cfg.save_dtype), str(tmp / WEIGHTS),
                  metadata={"format": "pt", "dtype": cfg.save_dtype})
        size = folder_size(tmp)
        if size > cfg.max_size_mb * 1e6:
            raise BundleError(
                f"model folder would be {size / 1e6:.1f} MB, over the budget of {cfg.max_size_mb:g} MB "
                f"(--max-size-mb); try save_dtype=fp16 or a smaller encoder. Nothing was written to {out}.")
        pause_for_test("bundle-write")
        replace_folder(tmp, out)
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_folder_beside(out: Path) -> Path:
    """An empty folder beside ``out`` to build its replacement in; those of writers that died are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, prefix=f".{out.name}.tmp.")
    tmp = out.parent / temporary_name(f".{out.name}.tmp.")
    tmp.mkdir()
    return tmp


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
    """
    old = _set_aside(out)
    if not out.exists() and old.is_dir():  # a save was killed between its renames: the previous folder back
        os.replace(old, out)
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
        return
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        pause_for_test("bundle-swap")
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


def read_config(path: Path) -> Config:
    """The settings a model folder was saved with, from any folder format this version reads."""
    version = 1
    if (path / FORMAT_FILE).exists():
        info = _read_json(path / FORMAT_FILE)
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(f"{path}: model folder format {version!r} was written by fuselabel "
                              f"{info.get('fuselabel', '?')}; this fuselabel reads formats 1 to {FORMAT_VERSION}: "
                              "upgrade fuselabel to load it")
    values = _read_json(path / "config.json")
    if version >= 2 and (path / "run.json").exists():
        values = {**_read_json(path / "run.json"), **values}
    # Where a model ran is not part of it: older folders stored devices and cache folders, which are dropped.
    kept = {}
    for key, value in values.items():
        try:
            if group_of(key) != "runtime":
                kept[key] = value
        except KeyError:
            raise BundleError(f"{path / 'config.json'}: unknown setting {key!r}; the folder was written by a "
                              "different fuselabel version") from None
    try:
        return Config.from_dict(kept, source=str(path / "config.json"))
    except ValueError as err:
        raise BundleError(str(err)) from None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    from safetensors.torch import load_file

    path = readable_folder(path)
    if not path.is_dir():
        raise BundleError(f"{path}: model folder not found")
    config = read_config(path)
    labels = _read_json(path / "labels.json")
    thresholds = _read_json(path / "thresholds.json")
    preprocessing = _read_json(path / "preprocessing.json") if (path / "preprocessing.json").exists() else None
    text_dir = path / "text"
    tokenizer = create_tokenizer(str(text_dir)) if config.uses_text else None
    # Architectures only: the weights come from model.safetensors, so nothing is downloaded.
    net = FuseLabelNet(config, len(labels["labels"]), pretrained=False, text_source=str(text_dir))
    if not (path / WEIGHTS).exists():
        raise BundleError(f"{path}: {WEIGHTS} is missing")
    state = _state_for_loading(load_file(str(path / WEIGHTS)))
    expected = net.state_dict()
    wrong = [f"{name} has shape {tuple(t.shape)} where the model expects {tuple(expected[name].shape)}"
             for name, t in state.items() if name in expected and t.shape != expected[name].shape]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise BundleError(f"{path / WEIGHTS}: weights do not fit the model of config.json: tensor {wrong[0]}{more}; "
                          "the folder's files do not belong together: save or train the model again")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(f"{path / WEIGHTS}: weights do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    net = net.float().eval().to(device)
    return Bundle(net=net, config=config, labels=labels["labels"], label_names=labels.get("names", {}),
                  thresholds=thresholds, preprocessing=preprocessing, tokenizer=tokenizer, path=path)


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
            for key in f.keys():
                if key.endswith(SCALE_SUFFIX):
                    continue
                sl = f.get_slice(key)
                part = key.split(".")[0]
                n = 1
                for d in sl.get_shape():
                    n *= d
                counts[part] = counts.get(part, 0) + n
                dtypes.add(str(sl.get_dtype()))
        lines.append("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
                     + f" (stored as {', '.join(sorted(dtypes))})")
    lines.append(f"kind {config['kind']}" + (f" ({config['late_combine']})" if config["kind"] == "late" else "")
                 + f"; image {config['image_model'] if config['kind'] != 'text' else '-'}"
                 + f"; text {config['text_model'] if config['kind'] != 'image' else '-'}; regime {config['regime']}")
    lines.append(f"labels ({len(labels['labels'])}): {' '.join(labels['labels'])}")
    lines.append(f"thresholds: {thresholds['method']}, validation mean F1 {thresholds['val_mean_f1']:.4f}"
                 + (f", late weight {thresholds['late_weight']}" if "late_weight" in thresholds else ""))
    if (path / "metrics.json").exists():
        m = _read_json(path / "metrics.json")
        v = m.get("validation", {})
        lines.append(f"validation: mean F1 {v.get('mean_f1', float('nan')):.4f}, micro F1 "
                     f"{v.get('micro_f1', float('nan')):.4f}, macro F1 {v.get('macro_f1', float('nan')):.4f} "
                     f"on {v.get('rows', '?')} rows; trained in {m.get('timings', {}).get('total_s', 0):.0f}s")
    return "\n".join(lines)


def convert_bundle(src: str | Path, out: str | Path, save_dtype: str, max_size_mb: float | None = None) -> int:
    """Re-save a model folder with other weight storage (e.g. int8 to shrink it); returns the new size."""
    bundle = load_bundle(src)
    changes = {"save_dtype": save_dtype}
    if max_size_mb is not None:
        changes["max_size_mb"] = max_size_mb
    bundle.config = bundle.config.replace(**changes)
    extra_json = ("split.json", "metrics.json")
    bundle.extra = {n: _read_json(Path(src) / n) for n in extra_json if (Path(src) / n).exists()}
    return save_bundle(out, bundle, {"history.csv": Path(src) / "history.csv"})
