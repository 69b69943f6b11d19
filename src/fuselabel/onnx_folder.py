"""Exported ONNX folders (``fuselabel export``): their format, and the engine that runs one in onnxruntime.

Torch-free: an exported folder needs neither torch nor torchvision nor transformers to predict.
A model folder's exported copy is kept in the cache folder under the hashes of the model's files
(``exported_location``), so `predict`, `evaluate` and `serve` on a CPU start without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .cache import default_cache_dir
from .config import Config
from .encoding import ORT_IMAGE_BATCH, encode_by_length
from .runtime import Predictor
from .sessions import session

ONNX_FORMAT = "fuselabel-onnx"
ONNX_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# The model settings an exported folder records (beside its labels, thresholds and preprocessing).
EXPORTED_SETTINGS = ("kind", "late_combine", "task", "text_max_length")


class OnnxFolderEngine:
    """An exported folder (``fuselabel export``) in onnxruntime: no torch, no torchvision."""

    def __init__(self, folder, threads: int | None = None):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no {MANIFEST}; not an exported fuselabel ONNX folder")
        m = json.loads(path.read_text())
        if m.get("format") != ONNX_FORMAT or m.get("version") != ONNX_FORMAT_VERSION:
            raise ValueError(
                f"{path}: ONNX folder format {m.get('format')} version {m.get('version')}; this "
                f"fuselabel reads {ONNX_FORMAT} version {ONNX_FORMAT_VERSION}: export the model again "
                f"with `fuselabel export MODEL_DIR`"
            )
        self.manifest = m
        self.kind, self.late_combine, self.late_weight = m["kind"], m["late_combine"], float(m["late_weight"])
        self.task = m.get("task", "multilabel")  # folders exported before multiclass models are multilabel
        self.texts_cut = 0
        self._lock = threading.Lock()
        self.data_config = m["preprocessing"]
        self.tta_flip = bool(m["tta_flip"])
        self.image_batch = ORT_IMAGE_BATCH
        self.feature_dims = m["feature_dims"]
        # Building a session is mostly outside the GIL: the encoders' and the heads' are built side by side.
        with ThreadPoolExecutor(len(m["files"])) as pool:
            built = {
                part: pool.submit(session, self.folder / info["path"], threads) for part, info in m["files"].items()
            }
            self.sessions = {part: future.result() for part, future in built.items()}
        self.tokenizer = None
        # A dynamically quantised text encoder runs one caption a run (see ``onnxrt.quantize_int8_dynamic``).
        text_quant = (m["files"].get("text_encoder") or {}).get("quantized") or ""
        self.text_batch = 1 if text_quant.startswith("dynamic") else 64
        if "text_encoder" in self.sessions:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.folder / m["tokenizer"]))
            self.tokenizer.enable_truncation(m["text_max_length"])
            self.tokenizer.enable_padding(pad_id=m["pad_id"], pad_token=m["pad_token"])
        self.name = "onnxruntime (exported folder)"

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["image_encoder"].run(None, {"pixels": np.asarray(pixels, dtype=np.float32)})[0]

    def text_features(self, captions: list[str]) -> np.ndarray:
        return encode_by_length(self._encode_text, captions, batch_size=self.text_batch)

    def _encode_text(self, captions: list[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(captions)
        with self._lock:  # workers count from several threads
            self.texts_cut += sum(bool(e.overflowing) for e in enc)  # truncation keeps what it cut there
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        return self.sessions["text_encoder"].run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def heads(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions["head"]
        # The exporter drops inputs a graph never reads (a flag early fusion ignores, say).
        names = [i.name for i in sess.get_inputs()]
        outs = sess.run(None, {k: np.ascontiguousarray(feats[k], np.float32) for k in names})
        return dict(zip(self.manifest["head"]["outputs"], outs))

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]


def is_onnx_folder(path) -> bool:
    return (Path(path) / MANIFEST).is_file() and not (Path(path) / "model.safetensors").exists()


def exported_location(model_dir, cache_dir=None) -> Path | None:
    """Where a model folder's exported ONNX copy is kept in the cache folder (``cache.default_cache_dir``), named by
    the hashes of the model's files (``sha256.json``) and the ONNX folder format; None for a model folder without
    file hashes (too old to be recognised later)."""
    hashes = Path(model_dir) / "sha256.json"
    if not hashes.is_file():
        return None
    key = hashlib.sha256(hashes.read_bytes() + f":{ONNX_FORMAT_VERSION}".encode()).hexdigest()[:20]
    return default_cache_dir(cache_dir) / "exported" / key


def load_onnx_predictor(folder, *, threads: int | None = None, **options) -> tuple[Predictor, OnnxFolderEngine]:
    engine = OnnxFolderEngine(folder, threads)
    m = engine.manifest
    return Predictor(engine, m["labels"], m["thresholds"], m["ensure_nonempty"], **options), engine


def read_exported(folder, runtime: dict | None = None) -> Bundle:
    """An exported folder's records as a ``Bundle`` without a network: it predicts and evaluates through
    onnxruntime, but holds no PyTorch weights to save, fine-tune or explain with. ``runtime``: where it runs."""
    folder = Path(folder)
    m = json.loads((folder / MANIFEST).read_text())
    model = {k: m[k] for k in EXPORTED_SETTINGS if m.get(k) is not None}
    return Bundle(
        config=Config.from_dict({**model, **(runtime or {})}, source=str(folder)),
        labels=list(m["labels"]),
        label_names=m.get("label_names") or {},
        thresholds={"thresholds": m["thresholds"], "ensure_nonempty": m["ensure_nonempty"]},
        preprocessing=m.get("preprocessing"),
        path=folder,
        table=m.get("table") or {},
    )


def describe_exported(folder) -> str:
    """What ``fuselabel info`` prints of an exported ONNX folder: its files, the model and its decision rule."""
    folder = Path(folder)
    m = json.loads((folder / MANIFEST).read_text())
    lines = [f"{folder}: exported ONNX folder ({m.get('format')} version {m.get('version')}), runs without PyTorch"]
    for part, info in m.get("files", {}).items():
        path = folder / info["path"]
        size = path.stat().st_size / 1e6 if path.is_file() else 0.0
        lines.append(f"  {part:<14} {info['path']:<24} {size:8.1f} MB" + (" (int8)" if info.get("quantized") else ""))
    lines.append(
        f"model: {m.get('kind')} ({m.get('late_combine')}), task {m.get('task', 'multilabel')}, "
        f"text length {m.get('text_max_length')}"
    )
    names = m.get("label_names") or {}
    labels = [names.get(t, t) if names.get(t, t) == t else f"{t} ({names[t]})" for t in m["labels"]]
    lines.append(f"labels ({len(labels)}): {', '.join(labels)}")
    lines.append(f"rule: {m.get('head', {}).get('rule', '')}")
    return "\n".join(lines)
