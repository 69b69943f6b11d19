"""Frozen-encoder features for training, computed once and cached on disk.

On a CPU the encoders cost far more than the heads, so the frozen regime runs each encoder
over the data once and trains heads on the stored vectors. The cache key covers everything
that changes the numbers: the encoder's weights and structure, the preprocessing, test-time
flipping, and each row's input (the photo file's bytes; the caption's text). The encoders run
through the same engine and image loop as prediction (``engines``, ``encoding.encode_images``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import encoding
from .cache import FeatureCache, image_row_keys, text_row_keys
from .encoding import encode_images, encode_texts
from .engines import TorchEngine, calibrate_image_int8, weights_digest
from .images import ImageError
from .preprocess import INT8_CALIBRATION

log = logging.getLogger(__name__)


def extract_image_features(
    engine,
    records,
    image_dir,
    *,
    missing_images: str = "error",
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
):
    """Pooled image features for training rows: (features float32 (n, d), image_present float32 (n,)).

    A photo that cannot be used is an error naming its row and CSV line, unless
    ``missing_images="caption_only"``: then its features are zeros and its row is caption-only.
    """
    feats, present, errors = encode_images(
        engine, [r.image_id for r in records], image_dir, batch_size=batch_size, workers=num_workers, progress=progress
    )
    if not present.all():
        bad = [i for i, ok in enumerate(present) if not ok]
        first = records[bad[0]]
        if missing_images == "error":
            more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
            raise ImageError(
                f"{errors[bad[0]]}: row {first.image_id} (CSV line {first.line}){more}; "
                "fix or remove the row, or pass --missing-images caption_only to train such rows "
                "on their caption alone"
            )
        log.warning(
            "%d of %d rows have no usable photo and train on their caption alone (first: %s, CSV line %d: %s)",
            len(bad),
            len(records),
            first.image_id,
            first.line,
            errors[bad[0]],
        )
    if feats is None:
        feats = np.zeros((len(records), engine.feature_dims["image"]), np.float32)
    return feats, present.astype(np.float32)


def run_shares() -> tuple[int, int]:
    """(rank, world) of this process in a run launched as several by torchrun (RANK, WORLD_SIZE); else (0, 1).

    The ranks of one run split the rows to compute between them by these. A Lightning-spawned rank
    starts after rank 0 has extracted everything, so it only reads; under other launchers (srun) each
    rank computes what the cache lacks, as separate runs do.
    """
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return 0, 1
    return (rank, world) if 0 <= rank < world else (0, 1)


def frozen_features(
    net,
    tokenizer,
    data_config,
    records,
    image_dir,
    config,
    *,
    device=None,
    progress=True,
    image=True,
    text=True,
    timings=None,
):
    """Features for ``records`` from the network's frozen encoders, through the cache.

    ``timings`` (a ``tracking.StageTimes``), when given, adds up the seconds of work (summed over the worker
    threads) spent decoding photos (``decode_s``) and in each encoder (``image_encoder_s``, ``text_encoder_s``),
    and the wall seconds of the int8 calibration (``int8_calibration_s``).
    """
    out: dict[str, np.ndarray] = {}
    present = np.ones(len(records), dtype=np.float32)
    engine = TorchEngine(
        net,
        tokenizer,
        data_config,
        tta_flip=config.tta_flip,
        text_max_length=config.text_max_length,
        device=device,
        encoders=config.feature_engine,
        cache_dir=config.cache_dir,
    )
    decoding = contextlib.nullcontext()
    if timings is not None:
        timings.timed(engine, "image_features", "image_encoder_s")
        timings.timed(engine, "text_features", "text_encoder_s")
        decoding = timings.timing(encoding, "read_photos_uint8", "decode_s")
    images = image and net.image_encoder is not None
    calibrating = None
    with ThreadPoolExecutor(1, thread_name_prefix="fuselabel-calibrate") as beside:
        if images and config.image_quant == "int8" and INT8_CALIBRATION not in data_config:
            # Calibrated on the training photos while the captions are encoded (the histograms keep one core
            # busy, the text encoder the rest), and kept with the preprocessing the model folder saves, so
            # prediction rebuilds the very encoder the heads learn from (and the feature cache keys on it).
            calibrating = beside.submit(_calibrate, net, data_config, records, image_dir, config, timings)
        if text and net.text_encoder is not None:
            out["text"] = _text_features(engine, net, records, config)
        if calibrating is not None:
            data_config[INT8_CALIBRATION] = calibrating.result()  # before the engine's first photo
    if images:
        engine.image_runner()  # built before the photos, so the encoder's recorded seconds are its work alone
        with decoding:
            out["image"], present = _image_features(engine, net, data_config, records, image_dir, config, progress)
    return out, present


def _calibrate(net, data_config, records, image_dir, config, timings) -> dict:
    with timings.stage("int8_calibration_s") if timings is not None else contextlib.nullcontext():
        return calibrate_image_int8(
            net.image_encoder, data_config, [r.image_id for r in records], image_dir, config.cache_dir
        )


def _image_features(engine, net, data_config, records, image_dir, config, progress):
    cache = FeatureCache(config.cache_dir)
    key = cache.key(
        kind="image",
        weights=weights_digest(net.image_encoder),
        model=config.image_model,
        data_config=data_config,
        flip=config.tta_flip,
        pool=[config.image_pool, config.image_layers, config.image_tokens],
        missing=config.missing_images,
    )

    def compute_images(idx):
        feats, pres = extract_image_features(
            engine,
            [records[i] for i in idx],
            image_dir,
            missing_images=config.missing_images,
            num_workers=config.num_workers,
            progress=progress,
        )
        return {"features": feats, "present": pres}

    rank, world = run_shares()
    arrays = cache.fetch(
        key, image_row_keys(records, image_dir), compute_images, "image features", rank=rank, world=world
    )
    return arrays["features"], arrays["present"]


def _text_features(engine, net, records, config):
    cache = FeatureCache(config.cache_dir)
    # Keyed on the quantisation only when there is one, so float features keep the keys they had.
    quant = {"quant": config.text_quant} if config.text_quant != "none" else {}
    key = cache.key(
        kind="text",
        weights=weights_digest(net.text_encoder),
        model=config.text_model,
        max_length=config.text_max_length,
        **quant,
    )
    captions = [r.caption for r in records]
    rank, world = run_shares()
    arrays = cache.fetch(
        key,
        text_row_keys(captions),
        lambda idx: {"features": encode_texts(engine, [captions[i] for i in idx], config.num_workers)},
        "text features",
        rank=rank,
        world=world,
    )
    return arrays["features"]
