"""The one prediction path: rows of (photo, caption) -> features -> per-head probabilities -> fusion -> label sets.

Torch-free. What runs the encoders and the heads is an *engine*: eager PyTorch or onnxruntime
over a trained model folder (``fuselabel.engines``), or onnxruntime over an exported ONNX folder
(``OnnxFolderEngine`` below, which needs neither torch nor torchvision). Everything else is here,
written once: reading photos, caption handling, flip averaging, missing inputs, fusion and
thresholds, in chunks of bounded size so memory does not grow with the number of rows.

A row whose photo is missing or unreadable is predicted from its caption, a row with an empty
caption from its photo; each is flagged in ``Prediction.status``. A row with neither has no
probabilities (NaN) and no labels. ``strict=True`` makes any missing input an error naming the row.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from .images import ImageError, ImageInput, eval_pixels, open_image
from .thresholds import apply_thresholds

log = logging.getLogger(__name__)

ONNX_FORMAT = "fuselabel-onnx"
ONNX_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STATUSES = ("ok", "caption_only", "image_only", "no_input")
# Encoders and heads see rows in fixed windows of the input's row positions, so the numbers a row gets
# never depend on how the rows were chunked or shared among processes (batch composition changes the
# last bits of a float). Chunks are whole windows.
WINDOW = 64


@dataclass
class Prediction:
    """What the model says about a batch of rows; every array has one row per input row."""

    probs: np.ndarray                   # (n, L) fused probabilities; NaN where a row had no usable input
    parts: dict[str, np.ndarray]        # per-head probabilities: image / text (late), early, or one head
    predicted: np.ndarray               # (n, L) bool: the label sets
    image_present: np.ndarray           # (n,) bool
    caption_present: np.ndarray         # (n,) bool
    status: list[str]                   # ok | caption_only | image_only | no_input
    image_errors: list[str | None] = field(default_factory=list)   # why a photo was unusable

    def __len__(self) -> int:
        return len(self.status)

    @classmethod
    def concat(cls, chunks: Sequence["Prediction"]) -> "Prediction":
        first = chunks[0]
        return cls(probs=np.concatenate([c.probs for c in chunks]),
                   parts={k: np.concatenate([c.parts[k] for c in chunks]) for k in first.parts},
                   predicted=np.concatenate([c.predicted for c in chunks]),
                   image_present=np.concatenate([c.image_present for c in chunks]),
                   caption_present=np.concatenate([c.caption_present for c in chunks]),
                   status=[s for c in chunks for s in c.status],
                   image_errors=[e for c in chunks for e in c.image_errors])


def fuse(parts: dict[str, np.ndarray], combine: str, weight: float, image_present: np.ndarray,
         caption_present: np.ndarray) -> np.ndarray:
    """One probability per label from per-head probabilities: late fusion's two rules and missing inputs.

    Rows missing an input are judged by the head that saw the other one; a head that saw nothing
    gives NaN, so such a row can never pass a threshold by accident.
    """
    image_present = np.asarray(image_present, bool)[:, None]
    caption_present = np.asarray(caption_present, bool)[:, None]
    if len(parts) == 1:
        (name, p), = parts.items()
        seen = {"image": image_present, "text": caption_present}.get(name, image_present | caption_present)
        return np.where(seen, p, np.nan).astype(np.float32)
    p_img, p_txt = parts["image"], parts["text"]
    # The union of two thresholded sets under one threshold t is exactly {max(p_img, p_txt) >= t},
    # so the max lets thresholds be tuned and stored like any other model's.
    both = np.maximum(p_img, p_txt) if combine == "union" else weight * p_img + (1 - weight) * p_txt
    fused = np.where(image_present & caption_present, both,
                     np.where(image_present, p_img, np.where(caption_present, p_txt, np.nan)))
    return fused.astype(np.float32)


def decide(probs: np.ndarray, thresholds: np.ndarray, ensure_nonempty: bool) -> np.ndarray:
    """Label sets from probabilities; rows without probabilities get no labels."""
    known = ~np.isnan(probs).any(axis=1)
    out = np.zeros(probs.shape, dtype=bool)
    if known.any():
        out[known] = apply_thresholds(probs[known], thresholds, ensure_nonempty)
    return out


def caption_given(caption) -> bool:
    return isinstance(caption, str) and bool(caption.strip())


class Engine(Protocol):
    """Runs a model's encoders and heads on numbers; a Predictor does everything around them."""

    kind: str                  # image | text | early | late
    late_combine: str
    late_weight: float
    data_config: dict | None   # image preprocessing (timm data config); None for text-only models
    tta_flip: bool
    feature_dims: dict         # {"image": d, "text": d} for the modalities the model uses
    name: str                  # which runtime, for the user: "onnxruntime", "torch (cpu)", ...

    def image_features(self, pixels: np.ndarray) -> np.ndarray: ...

    def text_features(self, captions: list[str]) -> np.ndarray: ...

    def heads(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def uses_image(kind: str) -> bool:
    return kind in ("image", "early", "late")


def uses_text(kind: str) -> bool:
    return kind in ("text", "early", "late")


def _workers(workers: int | None) -> int:
    return workers if workers is not None else min(8, os.cpu_count() or 1)


def read_photos(images: Sequence[ImageInput], image_dir, data_config: dict, workers: int | None = None
                ) -> tuple[list, list[str | None]]:
    """Decoded, preprocessed photos (None where unusable) and why each unusable one is."""
    def one(item):
        img, err = open_image(item, image_dir)
        return (eval_pixels(img, data_config), None) if img is not None else (None, err)

    workers = _workers(workers)
    if workers > 1 and len(images) > 1:
        # PIL decodes and resizes with the GIL released, so threads keep every core busy.
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(one, images))
    else:
        done = [one(item) for item in images]
    return [d[0] for d in done], [d[1] for d in done]


def encode_images(engine: Engine, images: Sequence[ImageInput], image_dir=None, *, batch_size: int = 16,
                  workers: int | None = None, progress: bool = False, read_ahead: int = 256
                  ) -> tuple[np.ndarray | None, np.ndarray, list[str | None]]:
    """The one image feature loop: (features (n, d), zeros where unusable; present (n,) bool; errors).

    Photos are read ``read_ahead`` at a time, so memory holds a bounded number of decoded photos.
    """
    from tqdm.auto import tqdm

    n = len(images)
    out: np.ndarray | None = None
    present = np.zeros(n, bool)
    errors: list[str | None] = [None] * n
    # disable=None: tqdm stays quiet when output is not a terminal (a log file, a pipe).
    bar = tqdm(total=n, desc="image features", unit="photo", disable=None if progress else True, leave=False)
    for lo in range(0, n, read_ahead):
        pixels, errs = read_photos(images[lo:lo + read_ahead], image_dir, engine.data_config, workers)
        errors[lo:lo + len(errs)] = errs
        for start in range(0, len(pixels), batch_size):
            idx = [i for i in range(start, min(start + batch_size, len(pixels))) if pixels[i] is not None]
            if not idx:
                continue
            x = np.stack([pixels[i] for i in idx])
            f = engine.image_features(x)
            if engine.tta_flip:
                f = (f + engine.image_features(np.ascontiguousarray(x[..., ::-1]))) / 2
            if out is None:
                out = np.zeros((n, f.shape[1]), dtype=np.float32)
            out[[lo + i for i in idx]] = f
            present[[lo + i for i in idx]] = True
        bar.update(len(pixels))
    bar.close()
    return out, present, errors


class Predictor:
    """Chunked prediction over any engine: the only place rows become probabilities and label sets."""

    def __init__(self, engine: Engine, labels: Sequence[str], thresholds, ensure_nonempty: bool = True, *,
                 batch_size: int = 16, workers: int | None = None, strict: bool = False,
                 chunk_size: int = 8 * WINDOW):
        self.engine = engine
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.ensure_nonempty = ensure_nonempty
        # Small batches suit onnxruntime on a few CPU cores (measured: 16 beats 64 by ~10 %).
        self.batch_size = batch_size
        self.workers = workers
        self.strict = strict
        if WINDOW % batch_size or chunk_size % WINDOW:
            raise ValueError(f"batch_size must divide {WINDOW} and chunk_size be a multiple of it "
                             f"(got {batch_size} and {chunk_size})")
        self.chunk_size = chunk_size

    def predict(self, images: Sequence[ImageInput] | None, captions: Sequence[str | None] | None, *,
                image_dir=None, row_names: Sequence[str] | None = None) -> Prediction:
        """One chunk of rows (callers keep chunks bounded; ``iter_predict`` does it for them)."""
        kind = self.engine.kind
        n = len(images) if images is not None else len(captions)
        images = list(images) if images is not None else [None] * n
        captions = list(captions) if captions is not None else [None] * n
        if len(images) != len(captions):
            raise ValueError(f"images and captions differ in length ({len(images)} and {len(captions)})")
        feats: dict[str, np.ndarray] = {}
        errors: list[str | None] = [None] * n
        image_present = np.zeros(n, bool)
        if uses_image(kind):
            image_feat, image_present, errors = encode_images(self.engine, images, image_dir,
                                                              batch_size=self.batch_size, workers=self.workers)
            if image_feat is not None:
                feats["image_feat"] = image_feat
        caption_present = np.array([caption_given(c) for c in captions], bool)
        if not uses_text(kind):
            caption_present[:] = False
        elif caption_present.any():
            feats["text_feat"] = np.zeros((n, self.engine.feature_dims["text"]), dtype=np.float32)
            for lo in range(0, n, WINDOW):
                idx = lo + np.flatnonzero(caption_present[lo:lo + WINDOW])
                if len(idx):
                    feats["text_feat"][idx] = self.engine.text_features([captions[i] for i in idx])
        if self.strict:
            self._check_strict(image_present, caption_present, errors, row_names, kind)
        inputs = self._complete(feats, n, image_present, caption_present)
        windows = [self.engine.heads({k: v[lo:lo + WINDOW] for k, v in inputs.items()}) for lo in range(0, n, WINDOW)]
        parts = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]} if n else {}
        probs = fuse(parts, self.engine.late_combine, self.engine.late_weight, image_present, caption_present) \
            if n else np.zeros((0, len(self.labels)), np.float32)
        status = [_status(i, c, kind) for i, c in zip(image_present, caption_present)]
        return Prediction(probs=probs, parts=parts, predicted=decide(probs, self.thresholds, self.ensure_nonempty),
                          image_present=image_present, caption_present=caption_present, status=status,
                          image_errors=errors)

    def _complete(self, feats: dict, n: int, image_present: np.ndarray, caption_present: np.ndarray) -> dict:
        """Every input the heads take, with zeros for what a row lacks (its head's answer is then unused)."""
        out = dict(feats)
        dims = self.engine.feature_dims
        if uses_image(self.engine.kind):
            out.setdefault("image_feat", np.zeros((n, dims["image"]), np.float32))
            out["image_present"] = image_present.astype(np.float32)
        if uses_text(self.engine.kind):
            out.setdefault("text_feat", np.zeros((n, dims["text"]), np.float32))
            out["caption_present"] = caption_present.astype(np.float32)
        return out

    def _check_strict(self, image_present, caption_present, errors, row_names, kind) -> None:
        for i in range(len(image_present)):
            name = row_names[i] if row_names is not None else f"row {i}"
            if uses_image(kind) and not image_present[i]:
                raise ImageError(f"{name}: {errors[i]} (strict mode: every row needs its photo; drop --strict to "
                                 "predict such rows from their caption)")
            if uses_text(kind) and not caption_present[i]:
                raise ValueError(f"{name}: empty caption (strict mode: every row needs its caption; drop --strict "
                                 "to predict such rows from their photo)")

    def iter_predict(self, rows: Iterable[tuple[ImageInput, str | None]], *, image_dir=None,
                     names: Iterable[str] | None = None, chunk_size: int | None = None) -> Iterator[Prediction]:
        """Predictions for a stream of (photo, caption) rows, one bounded chunk at a time, in order."""
        size = chunk_size or self.chunk_size
        names_iter = iter(names) if names is not None else None
        chunk: list = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == size:
                yield self._chunk(chunk, image_dir, names_iter)
                chunk = []
        if chunk:
            yield self._chunk(chunk, image_dir, names_iter)

    def _chunk(self, chunk, image_dir, names_iter) -> Prediction:
        names = [next(names_iter) for _ in chunk] if names_iter is not None else None
        return self.predict([r[0] for r in chunk], [r[1] for r in chunk], image_dir=image_dir, row_names=names)


def _status(image: bool, caption: bool, kind: str) -> str:
    if image and caption or (image and kind == "image") or (caption and kind == "text"):
        return "ok"
    if caption:
        return "caption_only"
    if image:
        return "image_only"
    return "no_input"


# --------------------------------------------------------------------------- exported ONNX folders

def session(path, threads: int | None = None):
    """An onnxruntime CPU session that leaves cores to the photo decoders."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.log_severity_level = 3
    if os.environ.get("FUSELABEL_ORT_SPIN", "0") != "1":
        # Spinning threads burn the cores that the photo decoders need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxFolderEngine:
    """An exported folder (``fuselabel export``) in onnxruntime: no torch, no torchvision."""

    def __init__(self, folder, threads: int | None = None):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no {MANIFEST}; not an exported fuselabel ONNX folder")
        m = json.loads(path.read_text())
        if m.get("format") != ONNX_FORMAT or m.get("version") != ONNX_FORMAT_VERSION:
            raise ValueError(f"{path}: ONNX folder format {m.get('format')} version {m.get('version')}; this "
                             f"fuselabel reads {ONNX_FORMAT} version {ONNX_FORMAT_VERSION}: export the model again "
                             f"with `fuselabel export MODEL_DIR`")
        self.manifest = m
        self.kind, self.late_combine, self.late_weight = m["kind"], m["late_combine"], float(m["late_weight"])
        self.data_config = m["preprocessing"]
        self.tta_flip = bool(m["tta_flip"])
        self.feature_dims = m["feature_dims"]
        self.sessions = {part: session(self.folder / info["path"], threads) for part, info in m["files"].items()}
        self.tokenizer = None
        if "text_encoder" in self.sessions:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.folder / m["tokenizer"]))
            self.tokenizer.enable_truncation(m["text_max_length"])
            self.tokenizer.enable_padding(pad_id=m["pad_id"], pad_token=m["pad_token"])
        self.name = "onnxruntime (exported folder)"

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["image_encoder"].run(None, {"pixels": pixels.astype(np.float32)})[0]

    def text_features(self, captions: list[str]) -> np.ndarray:
        return encode_by_length(self._encode_text, captions, batch_size=64)

    def _encode_text(self, captions: list[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(captions)
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


def encode_by_length(encode, captions: list[str], batch_size: int = 64) -> np.ndarray:
    """``encode(list of captions) -> (b, d)`` in batches of similar length (little padding), in input order."""
    order = np.argsort([len(c) for c in captions], kind="stable")
    out: np.ndarray | None = None
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        feats = encode([captions[j] for j in idx])
        if out is None:
            out = np.zeros((len(captions), feats.shape[1]), dtype=np.float32)
        out[idx] = feats
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def is_onnx_folder(path) -> bool:
    return (Path(path) / MANIFEST).is_file() and not (Path(path) / "model.safetensors").exists()


def load_onnx_predictor(folder, *, threads: int | None = None, **options) -> tuple[Predictor, OnnxFolderEngine]:
    engine = OnnxFolderEngine(folder, threads)
    m = engine.manifest
    return Predictor(engine, m["labels"], m["thresholds"], m["ensure_nonempty"], **options), engine
