"""The image encoder's preprocessing as one value, and the arithmetic every photo path shares.

``Preprocess`` is built once from the backbone's own data config (``timm.data.resolve_data_config``)
and the model's settings, saved in the model folder, and read back from it. Every path that turns a
photo into encoder input asks it the same questions: how large the resize is (``resize``,
``resized``), where the crop sits (``crop_box``), which filter weights the resize uses
(``resample_weights``) and what each uint8 level becomes (``table``). The PIL path (``images``) runs
Pillow's own resize; the tensor path (``geometry``, for the device decoder and image cache) runs the
same integer arithmetic from ``resample_weights``, so both give the same bytes. Torch-free: the ONNX
runtime path uses it without PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# Pillow's resampling keeps filter weights as integers of this many fractional bits (Resample.c), and
# every output value is the rounded, clipped sum of weight x pixel over the taps.
PRECISION_BITS = 22
FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
DEFAULT_CROP_PCT = 0.875  # timm's default when a config names none
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _filter(kind: str, x: float) -> float:
    """Pillow's filter functions (bicubic with a = -0.5), in the same double-precision steps."""
    x = -x if x < 0.0 else x
    if kind == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=256)
def resample_weights(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """(in_size, out_size) int64: the fixed-point weight of every input pixel in every output pixel of one
    resampling pass, exactly as Pillow computes it (``precompute_coeffs`` + ``normalize_coeffs_8bpc``).

    An output value is ``clip((2**21 + sum(weight * pixel)) >> 22, 0, 255)``; each pass ends in uint8
    (see ``columns_first`` for their order).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = FILTER_SUPPORT[interpolation] * filterscale
    ss = 1.0 / filterscale
    out = np.zeros((in_size, out_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = [_filter(interpolation, (x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in taps:
            total += w
        for x, w in enumerate(taps):
            w = w / total if total != 0.0 else w
            scaled = w * (1 << PRECISION_BITS)
            out[xmin + x, xx] = int(scaled - 0.5) if w < 0 else int(scaled + 0.5)  # C's truncating casts
    return out


def columns_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """Whether a resize runs its vertical pass (along columns) before the horizontal one: Pillow 13's rule,
    when the height shrinks by more than twice as many pixels as the width. The order changes a few
    pixels by one level, so every path follows this one rule (``images.eval_uint8`` runs the passes
    one by one, so the result does not depend on which Pillow is installed)."""
    return height - new_h > 0 and height - new_h > (width - new_w) * 2


def _centre(length: int, crop: int) -> int:
    """Where a centred ``crop`` starts in ``length`` (torchvision's ``CenterCrop`` rounding)."""
    return int(round((length - crop) / 2.0))


# The key under which a static int8 image encoder's activation ranges travel with the preprocessing (kept in
# their own file of the model folder, int8_ranges.json)
INT8_CALIBRATION = "int8_calibration"


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes the image encoder's input, the same on every path.

    ``size``: the square input side. ``crop_pct``: below 1, the short side is resized to
    ``round(size / crop_pct)`` and the centre ``size`` x ``size`` cropped; 1 or more, the whole photo is
    squashed to ``size`` x ``size`` (an object at the edge still counts in multi-label data).
    ``interpolation``: the resize filter, ``bicubic`` or ``bilinear`` (Pillow's). ``mean``/``std``: the
    per-channel normalisation ``(x / 255 - mean) / std`` in float32, whose value for every uint8 level
    is ``table``. ``extra`` keeps other keys of the saved config (the int8 calibration) untouched.
    """

    size: int
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_config(cls, config: Mapping) -> Preprocess:
        """From a timm data config (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``), as
        ``preprocessing.json`` holds it. A filter Pillow's two do not cover (timm's ``random``) is bicubic,
        timm's evaluation default."""
        if "input_size" not in config:
            raise ValueError(f"image preprocessing names no input_size (it holds {sorted(config)})")
        interpolation = str(config.get("interpolation", "bicubic"))
        known = ("input_size", "crop_pct", "interpolation", "mean", "std", "crop_mode")
        return cls(
            size=int(config["input_size"][-1]),
            crop_pct=float(config.get("crop_pct") or DEFAULT_CROP_PCT),
            interpolation=interpolation if interpolation in FILTER_SUPPORT else "bicubic",
            mean=tuple(float(m) for m in config.get("mean", IMAGENET_MEAN)),
            std=tuple(float(s) for s in config.get("std", IMAGENET_STD)),
            extra={k: v for k, v in config.items() if k not in known},
        )

    @classmethod
    def of(cls, value: Preprocess | Mapping) -> Preprocess:
        """``value`` itself, or the Preprocess of a data config (a model folder's ``preprocessing.json``)."""
        return value if isinstance(value, Preprocess) else cls.from_config(value)

    @classmethod
    def from_backbone(cls, model, image_size: int | None = None, crop_pct: float | None = None) -> Preprocess:
        """The backbone's own pretrained config (``timm.data.resolve_data_config``), with the model's
        settings (``image_size``, ``image_crop_pct``) over it where they are given."""
        import timm.data

        config = dict(timm.data.resolve_data_config({}, model=model))
        if image_size:
            config["input_size"] = (3, image_size, image_size)
        if crop_pct:
            config["crop_pct"] = crop_pct
        return cls.from_config(config)

    def to_config(self) -> dict:
        """The timm data config this stands for (JSON-ready), with ``extra`` kept: what the model folder saves."""
        return {
            **self.extra,
            "input_size": [3, self.size, self.size],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
        }

    @property
    def squash(self) -> bool:
        """Whether the whole photo is resized to the input square (no crop)."""
        return self.crop_pct >= 1.0

    @property
    def resize(self) -> int:
        """The side the resize makes: the input side when squashed, else the short side before the crop.
        Photos are never decoded below it."""
        return self.size if self.squash else int(round(self.size / self.crop_pct))

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: the square, or the short side at ``resize`` and the long one
        truncated (torchvision's ``Resize(int)``)."""
        if self.squash:
            return self.size, self.size
        short = self.resize
        if width <= height:
            return short, int(short * height / width)
        return int(short * width / height), short

    def crop_box(self, width: int, height: int, side: int | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a ``side`` x ``side`` square (default: the input side) in a photo
        resized to ``width`` x ``height``.

        The input square is torchvision's ``CenterCrop``. A larger square (the device cache keeps
        ``resize`` x ``resize``) is placed so that its own centre crop is exactly that input square,
        whatever the rounding of odd margins.
        """
        top, left = _centre(height, self.size), _centre(width, self.size)
        if side is not None and side != self.size:
            top, left = top - _centre(side, self.size), left - _centre(side, self.size)
        side = side or self.size
        return left, top, left + side, top + side

    def photo_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a ``width`` x ``height`` photo the encoder sees, in the photo's own pixels."""
        new_w, new_h = self.resized(width, height)
        left, top, right, bottom = self.crop_box(new_w, new_h)
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, right * sx, bottom * sy

    @functools.cached_property
    def table(self) -> np.ndarray:
        """(3, 256) float32: each channel's normalised value of every uint8 level.

        Computed with the float32 arithmetic of ``(x / 255 - mean) / std``, so a look-up gives exactly
        those numbers on every path (a fused multiply-add, ``x * a + b``, differs in the last bit for
        about four levels in ten).
        """
        levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        table = np.ascontiguousarray(((levels - mean) / std).T)
        table.setflags(write=False)
        return table
