"""Engines for a PyTorch model: what runs the encoders (eager torch or onnxruntime) and the heads.

A ``runtime.Predictor`` drives an engine; the engine only turns numbers into numbers. On a CPU
the encoders run in onnxruntime by default (EfficientNet-Lite several times faster than eager
PyTorch, MiniLM about twice): each encoder is exported once per weights, structure and input
size into the cache folder. The heads are small and run in PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from . import onnxrt
from .cache import default_cache_dir
from .runtime import encode_by_length, session

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnx", "torch")


def weights_digest(module: torch.nn.Module) -> str:
    # Values and shapes only: renaming a wrapper's attributes does not change a single feature.
    h = hashlib.sha256()
    for tensor in module.state_dict().values():
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def graph_digest(module: torch.nn.Module) -> str:
    """Weights and structure: the same weights pooled another way are another graph."""
    return hashlib.sha256(repr(module).encode()).hexdigest()[:8] + weights_digest(module)


def _cached_graph(encoder: torch.nn.Module, cache_dir, name: str, export) -> Path:
    path = default_cache_dir(cache_dir) / "onnx" / f"{name}-{graph_digest(encoder)}.onnx"
    if not path.exists():
        export(path)   # written beside and renamed into place, so a concurrent reader never sees half
    return path


def image_session(encoder: torch.nn.Module, input_shape, cache_dir=None, threads: int | None = None):
    """An onnxruntime session for an image encoder, exported once per weights, structure and input size."""
    size = "x".join(map(str, input_shape))
    path = _cached_graph(encoder, cache_dir, f"image-{size}",
                         lambda p: onnxrt.export_image_encoder(encoder, p, input_shape))
    return session(path, threads)


def text_session(encoder: torch.nn.Module, tokenizer, cache_dir=None, max_length: int = 64,
                 threads: int | None = None):
    path = _cached_graph(encoder, cache_dir, "text",
                         lambda p: onnxrt.export_text_encoder(encoder, tokenizer, p, max_length))
    return session(path, threads)


def resolve_device(device=None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def use_onnx(engine: str, device: torch.device) -> bool:
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    return engine != "torch" and device.type == "cpu"


class TorchEngine:
    """A ``FuseLabelNet``'s encoders and heads, for ``runtime.Predictor``.

    ``encoders="auto"`` runs the encoders in onnxruntime on a CPU and eagerly on a GPU;
    ``"torch"`` always eagerly; ``"onnx"`` always in onnxruntime (CPU).
    """

    def __init__(self, net, tokenizer, data_config: dict | None, *, tta_flip: bool = False,
                 text_max_length: int = 64, device=None, encoders: str = "auto", cache_dir=None):
        self.device = resolve_device(device)
        self.net = net.eval().to(self.device)
        cfg = net.config
        self.kind, self.late_combine = cfg.kind, cfg.late_combine
        self.late_weight = float(net.late_weight)
        self.data_config = data_config
        self.tta_flip = tta_flip
        self.tokenizer, self.max_length = tokenizer, text_max_length
        self.onnx = use_onnx(encoders, self.device)
        self.feature_dims = {}
        self._image_run = self._text_run = None
        if net.image_encoder is not None:
            self.feature_dims["image"] = net.image_encoder.num_features
            if self.onnx:
                image_sess = image_session(net.image_encoder, tuple(data_config["input_size"]), cache_dir)
                self._image_run = lambda x: image_sess.run(None, {"pixels": x})[0]
        if net.text_encoder is not None:
            self.feature_dims["text"] = net.text_encoder.num_features
            if self.onnx:
                text_sess = text_session(net.text_encoder, tokenizer, cache_dir, text_max_length)
                self._text_run = lambda ids, mask: text_sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        self.name = ("onnxruntime encoders, " if self.onnx else "torch encoders, ") + f"torch heads ({self.device})"

    @torch.inference_mode()
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        if self._image_run is not None:
            return self._image_run(pixels.astype(np.float32))
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        return self.net.image_encoder(x).float().cpu().numpy()

    @torch.inference_mode()
    def text_features(self, captions: list[str]) -> np.ndarray:
        def encode(batch: list[str]) -> np.ndarray:
            tok = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="np")
            ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
            if self._text_run is not None:
                return self._text_run(ids, mask)
            return self.net.text_encoder(torch.from_numpy(ids).to(self.device),
                                         torch.from_numpy(mask).to(self.device)).float().cpu().numpy()

        # A GPU wants large batches; on a CPU moderate ones keep padding and memory small.
        return encode_by_length(encode, captions, batch_size=256 if self.device.type == "cuda" else 64)

    @torch.inference_mode()
    def heads(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {k: torch.as_tensor(v, device=self.device) for k, v in feats.items()}
        logits = self.net.head(self.net.encode(batch))
        return {k: torch.sigmoid(v.float()).cpu().numpy() for k, v in logits.items()}


def engine_for_bundle(bundle, *, engine: str = "auto", device=None, cache_dir=None) -> TorchEngine:
    cfg = bundle.config
    return TorchEngine(bundle.net, bundle.tokenizer, bundle.preprocessing, tta_flip=cfg.tta_flip,
                       text_max_length=cfg.text_max_length, device=device, encoders=engine,
                       cache_dir=cache_dir or cfg.cache_dir)
