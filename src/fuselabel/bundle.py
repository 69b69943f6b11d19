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
folder (``outputs``). A load reads one snapshot of the folder (``fuselabel.snapshot``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import writers
from .config import Config, group_of
from .outputs import output_lock
from .preprocess import INT8_CALIBRATION, Preprocess
from .snapshot import (
    CHECKSUMS,
    FORMAT_FILE,
    FORMAT_VERSION,
    INT8_RANGES,
    TEXT_DIR,
    WEIGHTS,
    BundleError,
    json_of,
    new_folder_beside,
    readable_folder,
    replace_folder,
    snapshot,
)
from .writers import ordinary_permissions

if TYPE_CHECKING:  # torch, the network and the tokenizer load with the weights: reading a folder's records
    import torch  # (settings, size, files) and replacing folders need none of them

    from .network import FuseLabelNet

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    """A model: what it is (``config``, ``labels`` in output order and their display names, the decision
    rule ``thresholds``, the image ``preprocessing``, the training ``table``'s column names and label
    separator), the run's records (``extra``: ``split.json``, ``metrics.json``), and its PyTorch ``net`` and
    ``tokenizer``. Those two are None while only the records are loaded (``load_records``, no torch) and for
    an exported ONNX folder, which has no PyTorch weights. ``path`` is the folder it came from or was saved
    to (None: held in memory only); ``weights_sha256`` the digest of that folder's weights as loaded."""

    config: Config
    labels: list[str]
    label_names: dict[str, str]
    thresholds: dict
    preprocessing: dict | None
    net: FuseLabelNet | None = None
    tokenizer: object | None = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)
    table: dict = field(default_factory=dict)  # the training table's columns and label separator (tables.py)
    weights_sha256: str | None = None

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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path.parent}: not a fuselabel model folder ({path.name} is missing)") from None
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None


def _config_of(files: dict[str, bytes], path: Path) -> Config:
    version = 1
    if FORMAT_FILE in files:
        info = json_of(files, path, FORMAT_FILE)
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"{path}: model folder format {version!r} was written by fuselabel "
                f"{info.get('fuselabel', '?')}; this fuselabel reads formats 1 to {FORMAT_VERSION}: "
                "upgrade fuselabel to load it"
            )
    values = json_of(files, path, "config.json")
    if version >= 2 and "run.json" in files:
        values = {**json_of(files, path, "run.json"), **values}
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


def _preprocessing_of(files: dict[str, bytes], path: Path) -> dict | None:
    """``preprocessing.json`` read through its ``Preprocess`` (keys an older folder left out get timm's defaults),
    with the int8 ranges of their own file (a folder written before keeps them inside)."""
    if "preprocessing.json" not in files:
        return None
    try:
        preprocessing = Preprocess.of(json_of(files, path, "preprocessing.json")).to_config()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise BundleError(f"{path / 'preprocessing.json'}: not an image preprocessing ({err})") from None
    if INT8_RANGES in files:
        preprocessing[INT8_CALIBRATION] = json_of(files, path, INT8_RANGES)
    return preprocessing


def load_records(path: str | Path) -> tuple[Bundle, dict[str, bytes]]:
    """A model folder's records without its network (no torch): a ``Bundle`` whose ``net`` is None, and the
    snapshot of files it was read from (``attach_weights`` builds the network from the same snapshot)."""
    path, files = snapshot(path)
    labels = json_of(files, path, "labels.json")
    if WEIGHTS not in files:
        raise BundleError(f"{path}: {WEIGHTS} is missing")
    hashes = json_of(files, path, CHECKSUMS) if CHECKSUMS in files else {}
    bundle = Bundle(
        config=_config_of(files, path),
        labels=labels["labels"],
        label_names=labels.get("names", {}),
        thresholds=json_of(files, path, "thresholds.json"),
        preprocessing=_preprocessing_of(files, path),
        path=path,
        extra={n: json_of(files, path, n) for n in ("split.json", "metrics.json") if n in files},
        table=labels.get("table") or {},
        weights_sha256=hashes.get(WEIGHTS) or hashlib.sha256(files[WEIGHTS]).hexdigest(),
    )
    return bundle, files


def attach_weights(bundle: Bundle, files: dict[str, bytes], device: str | torch.device = "cpu") -> Bundle:
    """``bundle`` with its network and tokenizer, built from the snapshot ``load_records`` read."""
    from safetensors.torch import load as load_weights

    from .encoders import create_tokenizer
    from .network import FuseLabelNet

    path, config = bundle.path, bundle.config
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
        bundle.tokenizer = create_tokenizer(text_dir) if config.uses_text else None
        # Architectures only: the weights come from model.safetensors, so nothing is downloaded.
        net = FuseLabelNet(config, len(bundle.labels), pretrained=False, text_source=text_dir)
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
    bundle.net = net.float().eval().to(device)
    return bundle


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """A model folder whole: records, network and tokenizer, from one snapshot of its files."""
    bundle, files = load_records(path)
    return attach_weights(bundle, files, device)


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
