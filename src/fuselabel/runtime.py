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

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .images import ImageError, ImageInput, eval_uint8, normalise, open_image, pixel_table
from .preprocess import Preprocess
from .thresholds import apply_argmax, apply_thresholds

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

    probs: np.ndarray  # (n, L) fused probabilities; NaN where a row had no usable input
    parts: dict[str, np.ndarray]  # per-head probabilities: image / text (late), early, or one head
    predicted: np.ndarray  # (n, L) bool: the label sets
    image_present: np.ndarray  # (n,) bool
    caption_present: np.ndarray  # (n,) bool
    status: list[str]  # ok | caption_only | image_only | no_input
    image_errors: list[str | None] = field(default_factory=list)  # why a photo was unusable
    texts_cut: int = 0  # captions longer than the model's text length, cut to it

    def __len__(self) -> int:
        return len(self.status)

    @classmethod
    def concat(cls, chunks: Sequence[Prediction]) -> Prediction:
        first = chunks[0]
        return cls(
            probs=np.concatenate([c.probs for c in chunks]),
            parts={k: np.concatenate([c.parts[k] for c in chunks]) for k in first.parts},
            predicted=np.concatenate([c.predicted for c in chunks]),
            image_present=np.concatenate([c.image_present for c in chunks]),
            caption_present=np.concatenate([c.caption_present for c in chunks]),
            status=[s for c in chunks for s in c.status],
            image_errors=[e for c in chunks for e in c.image_errors],
            texts_cut=sum(c.texts_cut for c in chunks),
        )


def fuse(
    parts: dict[str, np.ndarray], combine: str, weight: float, image_present: np.ndarray, caption_present: np.ndarray
) -> np.ndarray:
    """One probability per label from per-head probabilities: late fusion's two rules and missing inputs.

    Rows missing an input are judged by the head that saw the other one; a head that saw nothing
    gives NaN, so such a row can never pass a threshold by accident.
    """
    image_present = np.asarray(image_present, bool)[:, None]
    caption_present = np.asarray(caption_present, bool)[:, None]
    if len(parts) == 1:
        ((name, p),) = parts.items()
        seen = {"image": image_present, "text": caption_present}.get(name, image_present | caption_present)
        return np.where(seen, p, np.nan).astype(np.float32)
    p_img, p_txt = parts["image"], parts["text"]
    # The union of two thresholded sets under one threshold t is exactly {max(p_img, p_txt) >= t},
    # so the max lets thresholds be tuned and stored like any other model's.
    both = np.maximum(p_img, p_txt) if combine == "union" else weight * p_img + (1 - weight) * p_txt
    fused = np.where(
        image_present & caption_present, both, np.where(image_present, p_img, np.where(caption_present, p_txt, np.nan))
    )
    return fused.astype(np.float32)


def decide(probs: np.ndarray, thresholds: np.ndarray, ensure_nonempty: bool, task: str = "multilabel") -> np.ndarray:
    """Label sets from probabilities; rows without probabilities get no labels.

    ``task="multiclass"``: the most probable label alone, whatever the thresholds (the max of two
    softmaxes under ``union`` can put two labels over any threshold).
    """
    known = ~np.isnan(probs).any(axis=1)
    out = np.zeros(probs.shape, dtype=bool)
    if known.any():
        out[known] = (
            apply_argmax(probs[known])
            if task == "multiclass"
            else apply_thresholds(probs[known], thresholds, ensure_nonempty)
        )
    return out


def caption_given(caption) -> bool:
    return isinstance(caption, str) and bool(caption.strip())


class Engine(Protocol):
    """Runs a model's encoders and heads on numbers; a Predictor does everything around them."""

    kind: str  # image | text | early | late
    task: str  # multilabel | multiclass (softmax heads, one label a row)
    late_combine: str
    late_weight: float
    data_config: dict | None  # image preprocessing (timm data config); None for text-only models
    tta_flip: bool
    feature_dims: dict  # {"image": d, "text": d} for the modalities the model uses
    name: str  # which runtime, for the user: "onnxruntime", "torch (cpu)", ...
    texts_cut: int  # captions so far longer than the text length (cut to it)

    def image_features(self, pixels: np.ndarray) -> np.ndarray: ...

    def text_features(self, captions: list[str]) -> np.ndarray: ...

    def heads(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def uses_image(kind: str) -> bool:
    return kind in ("image", "early", "late")


def uses_text(kind: str) -> bool:
    return kind in ("text", "early", "late")


def gpu_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded, told without importing torch: where one is, torch's default device
    is cuda, so a model runs there rather than from its exported copy on the CPU."""
    return os.path.exists("/proc/driver/nvidia/version")


def usable_cores() -> int:
    """How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cfs_quota_us``); None: no limit."""
    candidates = [
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ]
    for quota_file, period_file in candidates:
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            return int(fields[0]) / int(fields[1])
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _workers(workers: int | None) -> int:
    """Worker threads: None follows the usable cores; 0 (no extra workers, as for a DataLoader) means one."""
    return usable_cores() if workers is None else max(1, workers)


def read_photos_uint8(
    images: Sequence[ImageInput], image_dir, data_config: dict, workers: int | None = 1
) -> tuple[list, list[str | None]]:
    """Decoded photos as the encoder's (3, H, W) uint8 pixels (None where unusable), and why each unusable one is."""

    preprocess = Preprocess.of(data_config)

    def one(item):
        img, err = open_image(item, image_dir, size=preprocess)  # no more pixels than the encoder uses
        return (eval_uint8(img, preprocess), None) if img is not None else (None, err)

    workers = _workers(workers)
    if workers > 1 and len(images) > 1:
        # PIL decodes and resizes with the GIL released, so threads keep every core busy.
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(one, images))
    else:
        done = [one(item) for item in images]
    return [d[0] for d in done], [d[1] for d in done]


def _image_window(
    engine: Engine, images: Sequence[ImageInput], image_dir, batch_size: int, table
) -> tuple[np.ndarray | None, np.ndarray, list[str | None]]:
    """One window of rows: decode, then encode in batches at fixed positions (missing photos left out)."""
    pixels, errors = read_photos_uint8(images, image_dir, engine.data_config, workers=1)
    n = len(images)
    present = np.array([p is not None for p in pixels], bool)
    out: np.ndarray | None = None
    for start in range(0, n, batch_size):
        idx = [i for i in range(start, min(start + batch_size, n)) if pixels[i] is not None]
        if not idx:
            continue
        x = np.stack([pixels[i] for i in idx])
        f = engine.image_features(normalise(x, table))
        if engine.tta_flip:
            # Flipping commutes with the per-pixel normalisation, so the uint8 photo is flipped.
            f = (f + engine.image_features(normalise(x[..., ::-1], table))) / 2
        if out is None:
            out = np.zeros((n, f.shape[1]), dtype=np.float32)
        out[idx] = f
    return out, present, errors


def encode_images(
    engine: Engine,
    images: Sequence[ImageInput],
    image_dir=None,
    *,
    batch_size: int = 16,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray | None, np.ndarray, list[str | None]]:
    """The one image feature loop: (features (n, d), zeros where unusable; present (n,) bool; errors).

    The rows are cut into windows of ``WINDOW``; ``workers`` threads (default: the usable cores) each
    decode and encode whole windows with single-thread sessions, so decoding overlaps encoding and a
    window's numbers never depend on the number of workers. Memory holds a few windows of photos.
    """
    from tqdm.auto import tqdm

    n = len(images)
    out: np.ndarray | None = None
    present = np.zeros(n, bool)
    errors: list[str | None] = [None] * n
    table = pixel_table(engine.data_config)
    # disable=None: tqdm stays quiet when output is not a terminal (a log file, a pipe).
    bar = tqdm(total=n, desc="image features", unit="photo", disable=None if progress else True, leave=False)
    for lo, (f, p, e) in _over_windows(
        lambda a, b: _image_window(engine, images[a:b], image_dir, batch_size, table), n, workers
    ):
        errors[lo : lo + len(e)] = e
        present[lo : lo + len(p)] = p
        if f is not None:
            if out is None:
                out = np.zeros((n, f.shape[1]), dtype=np.float32)
            out[lo : lo + len(f)] = f
        bar.update(len(p))
    bar.close()
    return out, present, errors


def encode_texts(
    engine: Engine, captions: Sequence[str], workers: int | None = None, batch_size: int = 64
) -> np.ndarray:
    """Text features of many captions (training's frozen features): batches of similar length, as
    ``encode_by_length`` makes them, spread over ``workers`` threads (default: the usable cores)."""
    captions = list(captions)
    if not captions:
        return np.zeros((0, engine.feature_dims.get("text", 0)), dtype=np.float32)
    return encode_by_length(engine.text_features, captions, batch_size, workers=_workers(workers))


def _over_windows(work, n: int, workers: int | None) -> Iterator[tuple[int, object]]:
    """(start, ``work(start, stop)``) for each window of ``n`` rows, in order, run on ``workers`` threads.

    Encoders release the GIL (onnxruntime, PIL, torch), so threads over different windows keep that
    many cores busy; at most two windows a worker are in flight, which bounds memory.
    """
    bounds = [(lo, min(lo + WINDOW, n)) for lo in range(0, n, WINDOW)]
    workers = min(_workers(workers), max(1, len(bounds)))
    if workers == 1:
        for lo, hi in bounds:
            yield lo, work(lo, hi)
        return
    from collections import deque

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for lo, hi in bounds:
            pending.append((lo, pool.submit(work, lo, hi)))
            if len(pending) >= 2 * workers:
                start, fut = pending.popleft()
                yield start, fut.result()
        while pending:
            start, fut = pending.popleft()
            yield start, fut.result()


class Predictor:
    """Chunked prediction over any engine: the only place rows become probabilities and label sets."""

    def __init__(
        self,
        engine: Engine,
        labels: Sequence[str],
        thresholds,
        ensure_nonempty: bool = True,
        *,
        batch_size: int = 16,
        workers: int | None = None,
        strict: bool = False,
        chunk_size: int = 8 * WINDOW,
        task: str | None = None,
    ):
        self.engine = engine
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.ensure_nonempty = ensure_nonempty
        # The decision rule follows the model (its engine) unless a caller says otherwise.
        self.task = task or getattr(engine, "task", "multilabel")
        self.texts_cut = 0  # captions cut to the model's text length, over every call so far
        # Small batches suit onnxruntime on a few CPU cores (measured: 16 beats 64 by ~10 %).
        self.batch_size = batch_size
        self.workers = workers
        self.strict = strict
        if WINDOW % batch_size or chunk_size % WINDOW:
            raise ValueError(
                f"batch_size must divide {WINDOW} and chunk_size be a multiple of it "
                f"(got {batch_size} and {chunk_size})"
            )
        self.chunk_size = chunk_size

    def predict(
        self,
        images: Sequence[ImageInput] | None,
        captions: Sequence[str | None] | None,
        *,
        image_dir=None,
        row_names: Sequence[str] | None = None,
    ) -> Prediction:
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
        caption_present = np.array([caption_given(c) for c in captions], bool)
        if not uses_text(kind):
            caption_present[:] = False
        table = pixel_table(self.engine.data_config) if uses_image(kind) else None
        cut_before = getattr(self.engine, "texts_cut", 0)

        def window(lo: int, hi: int):
            # Photos, then captions, of one window on one worker: the other workers' windows run meanwhile.
            image = (
                _image_window(self.engine, images[lo:hi], image_dir, self.batch_size, table)
                if uses_image(kind)
                else None
            )
            idx = np.flatnonzero(caption_present[lo:hi])
            text = self.engine.text_features([captions[lo + i] for i in idx]) if len(idx) else None
            return image, (idx, text)

        for lo, (image, (idx, text)) in _over_windows(window, n, self.workers):
            if image is not None:
                f, p, e = image
                image_present[lo : lo + len(p)], errors[lo : lo + len(e)] = p, e
                if f is not None:
                    feats.setdefault("image_feat", np.zeros((n, f.shape[1]), np.float32))[lo : lo + len(f)] = f
            if text is not None:
                feats.setdefault("text_feat", np.zeros((n, text.shape[1]), np.float32))[lo + idx] = text
        texts_cut = getattr(self.engine, "texts_cut", 0) - cut_before
        if self.strict:
            self._check_strict(image_present, caption_present, errors, row_names, kind)
        self.texts_cut += texts_cut
        return self.predict_features(feats, image_present, caption_present, image_errors=errors, texts_cut=texts_cut)

    def predict_features(
        self,
        feats: dict[str, np.ndarray],
        image_present,
        caption_present,
        *,
        image_errors: list | None = None,
        texts_cut: int = 0,
    ) -> Prediction:
        """The rest of the path from encoder features on (``image_feat``, ``text_feat``: rows already encoded,
        such as the frozen features training cached): heads in fixed windows, fusion, the decision rule."""
        kind = self.engine.kind
        image_present = np.asarray(image_present, bool)
        caption_present = np.asarray(caption_present, bool)
        n = len(image_present)
        inputs = self._complete(feats, n, image_present, caption_present)
        windows = [self.engine.heads({k: v[lo : lo + WINDOW] for k, v in inputs.items()}) for lo in range(0, n, WINDOW)]
        parts = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]} if n else {}
        probs = (
            fuse(parts, self.engine.late_combine, self.engine.late_weight, image_present, caption_present)
            if n
            else np.zeros((0, len(self.labels)), np.float32)
        )
        status = [_status(i, c, kind) for i, c in zip(image_present, caption_present)]
        return Prediction(
            probs=probs,
            parts=parts,
            predicted=decide(probs, self.thresholds, self.ensure_nonempty, self.task),
            image_present=image_present,
            caption_present=caption_present,
            status=status,
            image_errors=image_errors if image_errors is not None else [None] * n,
            texts_cut=texts_cut,
        )

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
                raise ImageError(
                    f"{name}: {errors[i]} (strict mode: every row needs its photo; drop --strict to "
                    "predict such rows from their caption)"
                )
            if uses_text(kind) and not caption_present[i]:
                raise ValueError(
                    f"{name}: empty caption (strict mode: every row needs its caption; drop --strict "
                    "to predict such rows from their photo)"
                )

    def iter_predict(
        self,
        rows: Iterable[tuple[ImageInput, str | None]],
        *,
        image_dir=None,
        names: Iterable[str] | None = None,
        chunk_size: int | None = None,
    ) -> Iterator[Prediction]:
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
    """An onnxruntime CPU session, single-threaded by default: the cores are kept busy by workers over
    different windows of rows (two 1-thread streams scale better than one 2-thread one, and a window's
    numbers then never depend on how many cores there are)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 1
    opts.inter_op_num_threads = 1
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
        self.feature_dims = m["feature_dims"]
        self.sessions = {part: session(self.folder / info["path"], threads) for part, info in m["files"].items()}
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
        return self.sessions["image_encoder"].run(None, {"pixels": pixels.astype(np.float32)})[0]

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


def encode_by_length(encode, captions: list[str], batch_size: int = 64, workers: int = 1) -> np.ndarray:
    """``encode(list of captions) -> (b, d)`` in batches of similar length (little padding), in input order;
    the batches spread over ``workers`` threads (the same batches whatever their number)."""
    order = np.argsort([len(c) for c in captions], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    run = lambda idx: encode([captions[j] for j in idx])  # noqa: E731
    workers = min(workers, max(1, len(batches)))
    out: np.ndarray | None = None
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for idx, feats in zip(batches, pool.map(run, batches) if pool else map(run, batches)):
            if out is None:
                out = np.zeros((len(captions), feats.shape[1]), dtype=np.float32)
            out[idx] = feats
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def is_onnx_folder(path) -> bool:
    return (Path(path) / MANIFEST).is_file() and not (Path(path) / "model.safetensors").exists()


def exported_location(model_dir, cache_root) -> Path | None:
    """The folder under ``cache_root`` for a model folder's exported ONNX copy, named by the hashes of the model's
    files (``sha256.json``) and the ONNX folder format; None for a model folder without file hashes."""
    hashes = Path(model_dir) / "sha256.json"
    if not hashes.is_file():
        return None
    key = hashlib.sha256(hashes.read_bytes() + f":{ONNX_FORMAT_VERSION}".encode()).hexdigest()[:20]
    return Path(cache_root) / "exported" / key


def load_onnx_predictor(folder, *, threads: int | None = None, **options) -> tuple[Predictor, OnnxFolderEngine]:
    engine = OnnxFolderEngine(folder, threads)
    m = engine.manifest
    return Predictor(engine, m["labels"], m["thresholds"], m["ensure_nonempty"], **options), engine
