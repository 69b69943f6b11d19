"""Rows to encoder features: photos decoded and encoded in fixed windows of rows on worker threads.

The engine protocol (what runs a model's encoders and heads), the worker count this machine allows,
and the loops every path shares: prediction (``runtime.Predictor``), training's frozen features
(``features``) and int8 calibration. Torch-free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from .images import ImageInput, eval_uint8, normalise, open_image, pixel_table
from .preprocess import Preprocess

# Encoders and heads see rows in fixed windows of the input's row positions, so the numbers a row gets
# never depend on how the rows were chunked or shared among processes (batch composition changes the
# last bits of a float). Chunks are whole windows.
WINDOW = 64
# Photos a run of an image encoder in onnxruntime on one thread. One photo's activations stay in the core's
# caches: with both cores busy, Lite2 at 320 px encoded 1.19x the photos a second in runs of 1 as in runs of 16
# in float32, 1.11x in int8 (benchmarks/image_batch.py), with the same numbers (a photo's features do not depend
# on the photos beside it). Eager torch (a GPU) takes larger runs.
ORT_IMAGE_BATCH = 1
TORCH_IMAGE_BATCH = 16
# Rows of photos one prediction task encodes, a multiple of every image batch: a window's photos in four tasks,
# so the cores finish a chunk's last tasks nearly together instead of one waiting on the other's whole window.
PIECE = 16


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
    image_batch: int  # photos a run of the image encoder (a divisor of PIECE)

    def image_features(self, pixels: np.ndarray) -> np.ndarray: ...

    def text_features(self, captions: list[str]) -> np.ndarray: ...

    def heads(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


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


def image_features(engine: Engine, pixels: np.ndarray) -> np.ndarray:
    """Features of one run of normalised photos (N, 3, H, W); a ``tta_flip`` model's average with their mirror
    images (flipping commutes with the per-pixel normalisation)."""
    f = engine.image_features(pixels)
    if engine.tta_flip:
        f = (f + engine.image_features(np.ascontiguousarray(pixels[..., ::-1]))) / 2
    return f


def image_window(
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
        f = image_features(engine, normalise(np.stack([pixels[i] for i in idx]), table))
        if out is None:
            out = np.zeros((n, f.shape[1]), dtype=np.float32)
        out[idx] = f
    return out, present, errors


def encode_images(
    engine: Engine,
    images: Sequence[ImageInput],
    image_dir=None,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray | None, np.ndarray, list[str | None]]:
    """The one image feature loop: (features (n, d), zeros where unusable; present (n,) bool; errors).

    The rows are cut into windows of ``WINDOW``; ``workers`` threads (default: the usable cores) each
    decode and encode whole windows with single-thread sessions, so decoding overlaps encoding and a
    window's numbers never depend on the number of workers. Memory holds a few windows of photos.
    """
    n = len(images)
    batch_size = batch_size or engine.image_batch
    out: np.ndarray | None = None
    present = np.zeros(n, bool)
    errors: list[str | None] = [None] * n
    table = pixel_table(engine.data_config)
    bar = progress_bar(n, "image features", "photo", progress)
    for lo, (f, p, e) in over_windows(
        lambda a, b: image_window(engine, images[a:b], image_dir, batch_size, table), n, workers
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


def progress_bar(total: int, desc: str, unit: str, show: bool = True, initial: int = 0):
    """The one kind of progress bar: tqdm's, which stays quiet when standard error is not a terminal (a log file, a
    pipe) and is a widget in a notebook. From ``tqdm.autonotebook`` rather than ``tqdm.auto``, whose asyncio
    mixin nothing here uses and whose import costs every command 0.015 s."""
    import warnings

    from tqdm import TqdmExperimentalWarning

    with warnings.catch_warnings():  # autonotebook's note that it is experimental, silenced as tqdm.auto does
        warnings.simplefilter("ignore", TqdmExperimentalWarning)
        from tqdm.autonotebook import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if show else True, leave=False)


def over_windows(work, n: int, workers: int | None, size: int = WINDOW) -> Iterator[tuple[int, object]]:
    """(start, ``work(start, stop)``) for each span of ``size`` rows (a window, or a ``PIECE``) of ``n`` rows, in
    order, run on ``workers`` threads.

    Encoders release the GIL (onnxruntime, PIL, torch), so threads over different spans keep that
    many cores busy; at most two spans a worker are in flight, which bounds memory.
    """
    bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
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
