"""Photos in: open any input a user gives (path, bytes, PIL image) as RGB, and the evaluation preprocessing.

Torch-free on purpose: the ONNX runtime, the service and the training data path all open photos
and prepare them for the encoder through these two functions, so a photo is read one way everywhere.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, PathLike, bytes, Image.Image, None]


# Photos above this many pixels are refused before they are decoded: a 20,000 x 20,000 PNG of a few
# kilobytes would take 1.2 GB to decode. The course photos are under 0.2 megapixels; a 60-megapixel camera
# photo still opens. Pass ``max_pixels`` to load_rgb for another limit.
MAX_PIXELS = 64_000_000

# What PIL raises on files it cannot parse besides OSError: broken chunks, short headers, bad tables.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)
_REPAIR = "re-save it as a JPEG or PNG, or replace it"


class ImageError(RuntimeError):
    """A missing or unreadable image, named by file (and CSV line where there is one).

    ``reason`` is the problem in a few words ("missing", "unreadable: empty file (0 bytes)", ...) and
    ``advice`` what to do about it, so a caller can name its own row around them.
    """

    def __init__(self, message: str, reason: str | None = None, advice: str | None = None):
        super().__init__(message)
        self.reason = reason or message
        self.advice = advice or _REPAIR


def _image_error(label: str, reason: str, advice: str = _REPAIR) -> ImageError:
    return ImageError(f"{label}: image {reason}; {advice}", reason, advice)


def _explain(err: BaseException, source, label: str, max_pixels: int | None) -> ImageError:
    """The ImageError for whatever opening or decoding ``source`` raised."""
    if isinstance(err, FileNotFoundError):
        return _image_error(label, "missing", "check the image folder (--data) and the row's ImageID")
    if isinstance(err, IsADirectoryError):
        return _image_error(label, "unreadable: a folder, not a photo", "remove or rename the folder")
    if isinstance(err, PermissionError):
        return _image_error(label, "unreadable: permission denied", "make the file readable (chmod a+r)")
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # PIL refuses before we see the size; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "too many pixels"
        return _too_large(label, size, max_pixels)
    if isinstance(err, UnidentifiedImageError):
        if _byte_size(source) == 0:
            return _image_error(label, "unreadable: empty file (0 bytes)", "replace it with the photo")
        return _image_error(label, "unreadable: not an image format PIL can read", _REPAIR)
    detail = str(err) or type(err).__name__
    return _image_error(label, f"unreadable: truncated or corrupt ({detail})", _REPAIR)


def _too_large(label: str, size: str, max_pixels: int | None) -> ImageError:
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS * 2  # then PIL's own refusal
    return _image_error(label, f"too large: {size}, over the {limit / 1e6:.0f}-megapixel limit",
                        "shrink the photo, or pass a larger max_pixels to fuselabel.images.load_rgb")


def _byte_size(source) -> int | None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    try:
        return Path(source).stat().st_size
    except (OSError, TypeError, ValueError):
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode; transparent pixels are laid on white, as a viewer shows them."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        # 16- and 32-bit greyscale: convert("RGB") would clip every value above 255 to white.
        values = np.asarray(img, dtype=np.float64)
        top = values.max(initial=0.0)
        if mode.startswith("I;16") or top > 255:
            values = np.clip(values, 0, 65535) / 257.0
        elif mode == "F" and top <= 1.0:
            values = values * 255.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _upright_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image, turned as its EXIF orientation says (the source may be closed afterwards)."""
    try:
        upright = ImageOps.exif_transpose(img)  # always a new image
    except (SyntaxError, ValueError, struct.error, TypeError, KeyError):
        upright = img.copy()  # unreadable EXIF: the pixels are still good, only their orientation is unknown
    return _to_rgb(upright)


@contextlib.contextmanager
def _opened(source, label: str, max_pixels: int | None):
    """The photo opened lazily (header read, pixels not yet decoded) after the pixel limit; errors as ImageError."""
    raw = isinstance(source, (bytes, bytearray, memoryview))
    try:
        # PIL refuses above twice its own limit and warns between; both sit above MAX_PIXELS, so the
        # check below normally decides. (warnings.catch_warnings would silence the warning, but it is
        # not thread-safe, and photos are opened from threads.)
        opened = Image.open(io.BytesIO(source) if raw else source)
        with opened as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise _too_large(label, f"{width} x {height} = {width * height / 1e6:.0f} megapixels", max_pixels)
            yield img
    except ImageError:
        raise
    except _DECODE_ERRORS as err:
        raise _explain(err, source, label, max_pixels) from None


def _label(source, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, Image.Image):
        return "image"
    return "photo bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def load_rgb(source, *, max_pixels: int | None = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open a photo as an upright RGB image: the one door every photo comes in by.

    ``source`` is a path, the file's bytes, or a PIL image. The format is read from the contents, not
    the name (a PNG or WebP named ``.jpg`` opens); the EXIF orientation is applied; every mode becomes
    RGB: greyscale, CMYK, 16-bit greyscale (scaled, not clipped) and transparent images (palette with
    transparency, LA, RGBA), which are laid on white. ``name`` labels the photo in errors (default: the
    path, or "photo bytes").

    Raises:
        ImageError: the photo is missing, empty, a folder, not readable, not an image, truncated or
            corrupt, or larger than ``max_pixels`` (``MAX_PIXELS``, 64 megapixels; None: no limit). The
            message names the photo, the problem and what to do; ``reason`` and ``advice`` hold the parts.
    """
    label = _label(source, name)
    if isinstance(source, Image.Image):
        try:
            return _upright_rgb(source)
        except _DECODE_ERRORS as err:
            raise _explain(err, None, label, max_pixels) from None
    with _opened(source, label, max_pixels) as img:
        img.draft("RGB", img.size)  # lets JPEG skip a colour conversion
        img.load()
        return _upright_rgb(img)


def check_image(source, *, decode: bool = False, max_pixels: int | None = MAX_PIXELS,
                name: str | None = None) -> tuple[int, int]:
    """(width, height) of a photo that :func:`load_rgb` would open, else its ImageError.

    Without ``decode`` only the header is read (fast: the file's format, size and the pixel limit);
    with it the pixels are decoded too, which also finds truncated or corrupt files.
    """
    with _opened(source, _label(source, name), max_pixels) as img:
        if decode:
            img.load()
        return img.size


def open_image(item: ImageInput, image_dir: str | PathLike | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, why it is unusable): a missing photo is an answer, not an exception."""
    if item is None:
        return None, "no photo given"
    if isinstance(item, (str, PathLike)):
        item = Path(image_dir) / item if image_dir is not None else Path(item)
    try:
        return load_rgb(item), None
    except ImageError as err:
        return None, str(err)


def eval_pixels(img: Image.Image, data_config: dict) -> np.ndarray:
    """The encoder's input at evaluation: (3, H, W) float32, normalised, from one RGB image.

    ``crop_pct >= 1`` squashes the whole photo to a square (an object at the edge still counts
    in multi-label data); otherwise the short side is resized and the centre cropped, as the
    backbone was evaluated. Same arithmetic as torchvision's Resize / CenterCrop on PIL images.
    """
    size = data_config["input_size"][-1]
    resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(
        data_config.get("interpolation", "bicubic"), Image.BICUBIC)
    crop_pct = data_config.get("crop_pct", 0.875)
    if crop_pct >= 1.0:
        img = img.resize((size, size), resample)
    else:
        short = int(round(size / crop_pct))
        w, h = img.size
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(data_config["mean"], dtype=np.float32)
    std = np.asarray(data_config["std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))
