"""Frozen-encoder features, computed once and cached on disk.

On a CPU the encoders cost far more than the heads, so the frozen regime runs each encoder
over the data once and trains heads on the stored vectors. The cache key covers everything
that changes the numbers: the encoder's weights, the preprocessing, test-time flipping, and
each row's input (image file path, size and time; caption text). Images run through onnxruntime when it
is installed (several times faster than eager PyTorch on a CPU), else through PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import onnxrt
from .data import PairDataset, TextCollate, build_transform, default_workers


def default_cache_dir(cache_dir: str | None = None) -> Path:
    base = cache_dir or os.environ.get("FUSELABEL_CACHE") or Path.home() / ".cache" / "fuselabel"
    return Path(base)


def weights_digest(module: torch.nn.Module) -> str:
    # Values and shapes only: renaming a wrapper's attributes does not change a single feature.
    h = hashlib.sha256()
    for tensor in module.state_dict().values():
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _save_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def graph_digest(module: torch.nn.Module) -> str:
    """Weights and structure: the same weights pooled another way are another graph."""
    return hashlib.sha256(repr(module).encode()).hexdigest()[:8] + weights_digest(module)


def _cached_graph(encoder: torch.nn.Module, cache_dir, name: str, export) -> Path:
    path = default_cache_dir(cache_dir) / "onnx" / f"{name}-{graph_digest(encoder)}.onnx"
    if not path.exists():
        export(path)
    return path


def image_session(encoder: torch.nn.Module, input_shape, cache_dir=None, threads: int | None = None):
    """An onnxruntime session for an image encoder, exported once per weights, structure and input size."""
    size = "x".join(map(str, input_shape))
    path = _cached_graph(encoder, cache_dir, f"image-{size}",
                         lambda p: onnxrt.export_image_encoder(encoder, p, input_shape))
    return onnxrt.session(path, threads)


def text_session(encoder: torch.nn.Module, tokenizer, cache_dir=None, max_length: int = 64,
                 threads: int | None = None):
    path = _cached_graph(encoder, cache_dir, "text",
                         lambda p: onnxrt.export_text_encoder(encoder, tokenizer, p, max_length))
    return onnxrt.session(path, threads)


def use_onnx(engine: str, device: torch.device) -> bool:
    if engine == "torch" or device.type != "cpu":
        return False
    if not onnxrt.available():
        if engine == "onnx":
            raise ImportError("engine 'onnx' needs onnxruntime: pip install onnxruntime")
        return False
    return True


@torch.inference_mode()
def extract_image_features(encoder, data_config, records, image_dir, *, batch_size=64, num_workers=None,
                           flip_tta=False, missing_images="error", engine="auto", device=None,
                           cache_dir=None, progress=True, gpu_decode=None):
    """Pooled image features for every row: (features float32 (n, d), image_present float32 (n,))."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # --- fast data path (fuselabel.gpu): on a GPU, workers read bytes and nvJPEG decodes; FUSELABEL_GPU_DECODE=0 off
    if engine != "onnx":
        from .gpu import extract_image_features_gpu, gpu_decode_enabled

        if gpu_decode_enabled(gpu_decode, device):
            return extract_image_features_gpu(encoder, data_config, records, image_dir, batch_size=batch_size,
                                              num_workers=num_workers, flip_tta=flip_tta,
                                              missing_images=missing_images, device=device, progress=progress)
    # --- end fast data path ---
    encoder = encoder.eval()
    transform = build_transform(data_config, train=False)
    ds = PairDataset(records, image_dir, transform, missing_images=missing_images)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=default_workers(num_workers),
                        collate_fn=TextCollate(None), pin_memory=device.type == "cuda")
    if use_onnx(engine, device):
        session = image_session(encoder, tuple(data_config["input_size"]), cache_dir)
        run = lambda x: torch.from_numpy(session.run(None, {"pixels": x.numpy()})[0])  # noqa: E731
    else:
        encoder = encoder.to(device)
        run = lambda x: encoder(x.to(device, non_blocking=True)).float().cpu()  # noqa: E731
    feats, present = [], []
    start, done = time.time(), 0
    for batch in loader:
        x = batch["pixels"]
        f = run(x)
        if flip_tta:
            f = (f + run(x.flip(-1))) / 2
        feats.append(f.numpy().astype(np.float32))
        present.append(batch["image_present"].numpy())
        done += len(x)
        if progress:
            rate = done / max(time.time() - start, 1e-9)
            print(f"\r  image features {done}/{len(ds)} ({rate:.0f}/s)", end="", flush=True)
    if progress:
        print()
    return np.concatenate(feats), np.concatenate(present).astype(np.float32)


@torch.inference_mode()
def extract_text_features(encoder, tokenizer, captions, *, max_length=64, batch_size=256, device=None,
                          engine="auto", cache_dir=None, progress=True):
    """Mean-pooled caption features (n, d), through onnxruntime on a CPU when available."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if use_onnx(engine, device):
        sess = text_session(encoder, tokenizer, cache_dir, max_length)
        return onnxrt.run_text_encoder(sess, tokenizer, list(captions), max_length=max_length,
                                       batch_size=batch_size, progress=progress)
    encoder = encoder.eval().to(device)

    def encode(ids, mask):
        return encoder(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float().cpu().numpy()

    return onnxrt.encode_in_length_order(encode, tokenizer, list(captions), max_length=max_length,
                                         batch_size=batch_size, progress=progress)


class FeatureCache:
    """Per-row feature vectors on disk, one store per encoder setting.

    A store is keyed by a digest of everything that determines the numbers except the rows
    (weights, preprocessing, pooling, flipping); inside it each row is keyed by what it reads
    (an image file's bytes; a caption's text). Any subset of known rows (a
    validation split, a second CSV over the same images) is served from the store, and only
    rows never seen are computed.
    """

    def __init__(self, cache_dir=None):
        self.root = default_cache_dir(cache_dir) / "features"

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def fetch(self, key: str, row_keys: list[str], compute, label: str) -> dict[str, np.ndarray]:
        """Arrays for ``row_keys`` in order; ``compute(indices)`` supplies rows the store lacks."""
        path = self.root / f"{key}.npz"
        stored: dict[str, np.ndarray] = {}
        if path.exists():
            with np.load(path) as data:
                stored = {k: data[k] for k in data.files}
        index = {k: i for i, k in enumerate(stored.get("row_keys", []))}
        missing = [i for i, k in enumerate(row_keys) if k not in index]
        if missing:
            start = time.time()
            fresh = compute(missing)
            if stored:
                stored = {k: np.concatenate([stored[k], fresh[k] if k != "row_keys" else
                                             np.asarray([row_keys[i] for i in missing])]) for k in stored}
            else:
                stored = dict(fresh, row_keys=np.asarray([row_keys[i] for i in missing]))
            _save_atomic(path, **stored)
            index = {k: i for i, k in enumerate(stored["row_keys"])}
            print(f"  {label}: {len(missing)} rows computed in {time.time() - start:.1f}s"
                  f"{f', {len(row_keys) - len(missing)} cached' if len(missing) < len(row_keys) else ''} ({path})")
        else:
            print(f"  {label}: {len(row_keys)} rows cached ({path})")
        take = np.asarray([index[k] for k in row_keys], dtype=np.int64)
        return {k: v[take] for k, v in stored.items() if k != "row_keys"}


def image_row_keys(records, image_dir) -> list[str]:
    """Each image row keyed by its file's bytes, not its path or time.

    A data set copied to another machine, restored from an archive or moved keeps its features
    (a path-and-time key re-extracted all 20,000 photos after every copy, minutes each time);
    an edited photo misses. Hashing is cheap next to decoding: 0.4 s for the 20,000 course photos
    (217 MB) when the OS has them cached, about 2 s when it has not.
    """
    keys = []
    for rec in records:
        try:
            with open(Path(image_dir) / rec.image_id, "rb") as f:
                keys.append(hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest())
        except OSError:
            keys.append(f"missing|{rec.image_id}")
    return keys


def text_row_keys(captions) -> list[str]:
    return [hashlib.sha1(c.encode()).hexdigest() for c in captions]


def frozen_features(net, tokenizer, data_config, records, image_dir, config, *, device=None, progress=True,
                    image=True, text=True):
    """Features for ``records`` from the network's frozen encoders, through the cache."""
    cache = FeatureCache(config.cache_dir)
    out: dict[str, np.ndarray] = {}
    present = np.ones(len(records), dtype=np.float32)
    if image and net.image_encoder is not None:
        key = cache.key(kind="image", weights=weights_digest(net.image_encoder), model=config.image_model,
                        data_config=data_config, flip=config.tta_flip,
                        pool=[config.image_pool, config.image_layers, config.image_tokens],
                        missing=config.missing_images)

        def compute_images(idx):
            feats, pres = extract_image_features(
                net.image_encoder, data_config, [records[i] for i in idx], image_dir, flip_tta=config.tta_flip,
                missing_images=config.missing_images, num_workers=config.num_workers, device=device,
                engine=config.feature_engine, cache_dir=config.cache_dir, progress=progress,
                gpu_decode=config.gpu_decode)
            return {"features": feats, "present": pres}

        arrays = cache.fetch(key, image_row_keys(records, image_dir), compute_images, "image features")
        out["image"], present = arrays["features"], arrays["present"]
    if text and net.text_encoder is not None:
        key = cache.key(kind="text", weights=weights_digest(net.text_encoder), model=config.text_model,
                        max_length=config.text_max_length)
        captions = [r.caption for r in records]
        arrays = cache.fetch(key, text_row_keys(captions), lambda idx: {"features": extract_text_features(
            net.text_encoder, tokenizer, [captions[i] for i in idx], max_length=config.text_max_length,
            device=device, engine=config.feature_engine, cache_dir=config.cache_dir, progress=progress)},
            "text features")
        out["text"] = arrays["features"]
    return out, present
