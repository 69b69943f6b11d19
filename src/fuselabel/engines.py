"""Engines for a PyTorch model: what runs the encoders (eager torch or onnxruntime) and the heads.

A ``runtime.Predictor`` drives an engine; the engine only turns numbers into numbers. On a CPU
the encoders run in onnxruntime by default (EfficientNet-Lite several times faster than eager
PyTorch, MiniLM about twice): each encoder is exported once per weights, structure and input
size into the cache folder. The heads are small and run in PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from . import onnxrt
from .cache import default_cache_dir
from .encoders import text_length_limit, token_counts
from .encoding import ORT_IMAGE_BATCH, TORCH_IMAGE_BATCH, encode_by_length
from .losses import probabilities
from .preprocess import INT8_CALIBRATION
from .sessions import session

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
    return onnxrt.cached_graph(path, export)  # checked on every use; exported again when cut short or damaged


def image_graph(encoder: torch.nn.Module, input_shape, cache_dir=None, int8: dict | None = None) -> Path:
    """An image encoder's ONNX graph in the cache, exported once per weights, structure and input size; with
    ``int8`` calibration ranges, its static int8 form (built once per graph and ranges)."""
    size = "x".join(map(str, input_shape))
    path = _cached_graph(
        encoder, cache_dir, f"image-{size}", lambda p: onnxrt.export_image_encoder(encoder, p, input_shape)
    )
    if int8 is None:
        return path
    quantized = path.with_name(f"{path.stem}-int8-{onnxrt.ranges_digest(int8)}.onnx")
    return onnxrt.cached_graph(quantized, lambda p: onnxrt.quantize_int8_static(path, p, int8))


def image_session(
    encoder: torch.nn.Module, input_shape, cache_dir=None, threads: int | None = None, int8: dict | None = None
):
    return session(image_graph(encoder, input_shape, cache_dir, int8), threads, cache_dir)


# Photos the int8 ranges are measured on. Their histograms cost about 0.9 s a photo on one core; on the course
# photos, ranges from 8, 16, 32 or 64 of them gave int8 features of the same cosine with the float32 ones on 192
# other photos (0.9654, 0.9653, 0.9652, 0.9656), so more photos buy only time.
CALIBRATION_PHOTOS = 16


def calibrate_image_int8(
    encoder: torch.nn.Module,
    data_config: dict,
    images,
    image_dir=None,
    cache_dir=None,
    photos: int = CALIBRATION_PHOTOS,
    batch_size: int = 4,
) -> dict:
    """Activation ranges for the static int8 image encoder, measured on up to ``photos`` of ``images`` spread
    evenly over them (unusable ones skipped). Deterministic: the same photos give the same ranges."""
    from .encoding import read_photos_uint8
    from .images import normalise, pixel_table

    step = max(1, len(images) // photos)
    pixels, _ = read_photos_uint8(list(images)[::step][:photos], image_dir, data_config, workers=None)
    pixels = [p for p in pixels if p is not None]
    if not pixels:
        raise ValueError("image_quant='int8' needs usable training photos to calibrate on; none could be read")
    table = pixel_table(data_config)
    batches = [normalise(np.stack(pixels[i : i + batch_size]), table) for i in range(0, len(pixels), batch_size)]
    ranges = onnxrt.calibrate_int8(image_graph(encoder, tuple(data_config["input_size"]), cache_dir), batches)
    return {
        "method": f"static QDQ, per-channel int8 weights, uint8 activations, {onnxrt.PERCENTILE}th-percentile ranges",
        "photos": len(pixels),
        "ranges": ranges,
    }


def text_graph(encoder: torch.nn.Module, tokenizer, cache_dir=None, max_length: int = 64, int8: bool = False) -> Path:
    """A text encoder's ONNX graph in the cache, exported once per weights and structure; with ``int8``, its
    dynamic int8 form (the one ``fuselabel export`` writes for such a model)."""
    path = _cached_graph(
        encoder, cache_dir, "text", lambda p: onnxrt.export_text_encoder(encoder, tokenizer, p, max_length)
    )
    if not int8:
        return path
    return onnxrt.cached_graph(
        path.with_name(f"{path.stem}-int8.onnx"), lambda p: onnxrt.quantize_int8_dynamic(path, p, onnxrt.INT8_TEXT_OPS)
    )


def text_session(
    encoder: torch.nn.Module,
    tokenizer,
    cache_dir=None,
    max_length: int = 64,
    threads: int | None = None,
    int8: bool = False,
):
    return session(text_graph(encoder, tokenizer, cache_dir, max_length, int8), threads, cache_dir)


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

    def __init__(
        self,
        net,
        tokenizer,
        data_config: dict | None,
        *,
        tta_flip: bool = False,
        text_max_length: int | None = 64,
        device=None,
        encoders: str = "auto",
        cache_dir=None,
    ):
        self.device = resolve_device(device)
        self.net = net.eval().to(self.device)
        cfg = net.config
        self.kind, self.late_combine, self.task = cfg.kind, cfg.late_combine, cfg.task
        self.late_weight = float(net.late_weight)
        self.data_config = data_config
        self.tta_flip = tta_flip
        if text_max_length is None and net.text_encoder is not None:  # not chosen yet: all the encoder takes
            text_max_length = text_length_limit(tokenizer, net.text_encoder.backbone.config)
        self.tokenizer, self.max_length = tokenizer, text_max_length
        self.texts_cut = 0  # captions longer than max_length, over every call so far
        self._lock = threading.Lock()
        self._image_lock = threading.Lock()
        self.onnx = use_onnx(encoders, self.device)
        self.feature_dims = {}
        self._text_run = None
        self._image = None  # how photos are encoded, settled on the first photo (image_runner)
        self._cache_dir = cache_dir
        if net.image_encoder is not None:
            self.feature_dims["image"] = net.image_encoder.num_features
        # Dynamic int8 quantises each run's activations with one scale, so such a text encoder runs one caption
        # a run: a caption's features never depend on the captions beside it.
        self.text_batch = 1 if cfg.text_quant == "int8" else None
        if net.text_encoder is not None:
            self.feature_dims["text"] = net.text_encoder.num_features
            # Like the image encoder: an int8 text encoder runs in onnxruntime whatever the engine asked for.
            if self.onnx or cfg.text_quant == "int8":
                text_sess = text_session(
                    net.text_encoder, tokenizer, cache_dir, text_max_length, int8=cfg.text_quant == "int8"
                )
                self._text_run = lambda ids, mask: text_sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        self.name = ("onnxruntime encoders, " if self.onnx else "torch encoders, ") + f"torch heads ({self.device})"

    def _int8_ranges(self) -> dict | None:
        return (self.data_config or {}).get(INT8_CALIBRATION)

    def _photos_in_onnxruntime(self) -> bool:
        # An int8 model's heads were trained on its int8 features: its image encoder runs in onnxruntime whatever
        # the engine asked for.
        return self.onnx or self._int8_ranges() is not None

    @property
    def image_batch(self) -> int:
        """Photos a run: small in onnxruntime, larger in eager torch (see ``encoding.ORT_IMAGE_BATCH``)."""
        return ORT_IMAGE_BATCH if self._photos_in_onnxruntime() else TORCH_IMAGE_BATCH

    def image_runner(self):
        """The onnxruntime session photos run through, or None (eager torch), settled on the first photo: a
        training run calibrates the int8 encoder while its captions are encoded, and the ranges reach this
        engine's ``data_config`` before the first photo does."""
        with self._image_lock:
            if self._image is None:
                int8 = self._int8_ranges()
                sess = None
                if self._photos_in_onnxruntime():
                    sess = image_session(
                        self.net.image_encoder,
                        tuple(self.data_config["input_size"]),
                        self._cache_dir,
                        int8=int8["ranges"] if int8 else None,
                    )
                self._image = (sess,)
            return self._image[0]

    @torch.inference_mode()
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        sess = self.image_runner()
        if sess is not None:
            return sess.run(None, {"pixels": np.asarray(pixels, dtype=np.float32)})[0]
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        return self.net.image_encoder(x).float().cpu().numpy()

    @torch.inference_mode()
    def text_features(self, captions: list[str]) -> np.ndarray:
        def encode(batch: list[str]) -> np.ndarray:
            with self._lock:  # a fast tokenizer set up per call is not safe from several threads at once
                tok = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
                )
                self.texts_cut += count_cut(tok, self.tokenizer, batch, self.max_length)
            ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
            if self._text_run is not None:
                return self._text_run(ids, mask)
            return (
                self.net.text_encoder(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
                .float()
                .cpu()
                .numpy()
            )

        # A GPU wants large batches; on a CPU moderate ones keep padding and memory small.
        batch = self.text_batch or (256 if self.device.type == "cuda" else 64)
        return encode_by_length(encode, captions, batch_size=batch)

    @torch.inference_mode()
    def heads(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {k: torch.as_tensor(v, device=self.device) for k, v in feats.items()}
        with self._one_thread():
            logits = self.net.head(self.net.encode(batch))
            return {k: probabilities(v, self.task).cpu().numpy() for k, v in logits.items()}

    @contextlib.contextmanager
    def _one_thread(self):
        """A 64-row window of the small heads is slower on several threads than on one, far slower under
        outside load; the thread count is the process's, so it is restored after."""
        if self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def count_cut(encoded, tokenizer, texts: list[str], max_length: int) -> int:
    """How many of ``texts`` truncation cut, from a tokenizer call's output (no second pass where it can be told)."""
    encodings = getattr(encoded, "encodings", None)
    if encodings is not None:  # a fast tokenizer keeps what it cut off in each encoding
        return sum(bool(e.overflowing) for e in encodings)
    return int((token_counts(tokenizer, texts) > max_length).sum())


def engine_for_bundle(bundle, *, engine: str = "auto", device=None, cache_dir=None) -> TorchEngine:
    cfg = bundle.config
    return TorchEngine(
        bundle.net,
        bundle.tokenizer,
        bundle.preprocessing,
        tta_flip=cfg.tta_flip,
        text_max_length=cfg.text_max_length,
        device=device,
        encoders=engine,
        cache_dir=cache_dir or cfg.cache_dir,
    )
