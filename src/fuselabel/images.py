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
from PIL import Image, UnidentifiedImageError

from .preprocess import Preprocess, columns_first

ImageInput = Union[str, PathLike, bytes, Image.Image, np.ndarray, None]
# What a photo is decoded for: the encoder's input side (int), a (width, height) box, or the encoder's
# preprocessing (a Preprocess or its data config); None decodes every pixel.
DecodeTarget = Union[int, tuple, list, dict, Preprocess, None]
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}

# A large photo is decoded (JPEG: DCT scaling) or reduced (other formats: integer box averaging) only
# down to twice the size the evaluation resize needs, and that resize does the rest. This is Pillow's
# ``reducing_gap``: with a gap of 2 the result is close to resampling every pixel, and a photo under twice
# the needed size -- every course photo, for any encoder input from 121 px up -- decodes exactly as it
# did before, so its pixels and predictions do not change.
REDUCING_GAP = 2
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Modes Image.reduce takes; others (palette, 1-bit, 16-bit grey) are converted to RGB first.
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "CMYK", "I", "F", "YCbCr", "La", "RGBa"}
_BAND_ROWS = 256  # rows reduced at a time: a few MB for the widest photo under the pixel limit


# Photos above this many pixels are refused before they are decoded: a 20,000 x 20,000 PNG of a few
# kilobytes would take 1.2 GB to decode. The course photos are under 0.2 megapixels; a 60-megapixel camera
# photo still opens. Pass ``max_pixels`` to load_rgb for another limit.
MAX_PIXELS = 64_000_000

# What PIL raises on files it cannot parse besides OSError: broken chunks, short headers, bad tables.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
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
    return _image_error(
        label,
        f"too large: {size}, over the {limit / 1e6:.0f}-megapixel limit",
        "shrink the photo, or pass a larger max_pixels to fuselabel.images.load_rgb",
    )


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


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable: the pixels are still good)."""
    try:
        value = img.getexif().get(0x0112, 1)
        return value if value in _TRANSPOSE else 1
    except (SyntaxError, ValueError, struct.error, TypeError, KeyError, OSError):
        return 1


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation of a photo's bytes (1-8), from its header alone: what every decoder must apply."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _orientation(img)
    except _DECODE_ERRORS:
        return 1


def decode_box(target: DecodeTarget) -> tuple[int, int] | None:
    """The smallest upright (width, height) a photo may be decoded at for ``target`` (see DecodeTarget).

    For the preprocessing both sides must stay >= its ``resize`` side.
    """
    if target is None:
        return None
    if isinstance(target, (dict, Preprocess)):
        side = Preprocess.of(target).resize
        return side, side
    if isinstance(target, (tuple, list)):
        return max(1, int(target[0])), max(1, int(target[1]))
    return max(1, int(target)), max(1, int(target))


def _reduced(img: Image.Image, box: tuple[int, int] | None, orientation: int) -> Image.Image:
    """``img`` shrunk by the largest whole factor that keeps it REDUCING_GAP x ``box`` (upright) or more."""
    if box is None:
        return img
    w, h = box if orientation < 5 else box[::-1]  # the box is upright; the pixels are as stored
    factor = min(img.width // (REDUCING_GAP * w), img.height // (REDUCING_GAP * h))
    if factor < 2:
        return img
    # In bands of rows: reducing RGBA (premultiplied first) or converting a palette image would each
    # make a full-size copy. Bands start on multiples of the factor, and every step is per pixel or per
    # block, so the result is that of reducing the whole image at once.
    out = None
    step = factor * max(1, _BAND_ROWS // factor)
    for top in range(0, img.height, step):
        band = img.crop((0, top, img.width, min(img.height, top + step)))
        band = (band if band.mode in _REDUCIBLE else _to_rgb(band)).reduce(factor)
        if out is None:
            out = Image.new(band.mode, (band.width, -(-img.height // factor)))
        out.paste(band, (0, top // factor))
    return out


def _upright_rgb(img: Image.Image, box: tuple[int, int] | None = None) -> Image.Image:
    """A new RGB image, reduced for ``box`` and turned as its EXIF orientation says (the source may be
    closed afterwards).

    The orientation is read before reducing: the reduced copy carries no EXIF.
    """
    orientation = _orientation(img)
    out = _reduced(img, box, orientation)
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        out = out.transpose(method)
    elif out is img:
        out = img.copy()
    return _to_rgb(out)


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
    if isinstance(source, np.ndarray):
        return "photo array"
    return "photo bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def load_rgb(
    source, *, max_pixels: int | None = MAX_PIXELS, name: str | None = None, size: DecodeTarget = None
) -> Image.Image:
    """Open a photo as an upright RGB image: the one door every photo comes in by.

    ``source`` is a path, the file's bytes, or a PIL image. The format is read from the contents, not
    the name (a PNG or WebP named ``.jpg`` opens); the EXIF orientation is applied; every mode becomes
    RGB: greyscale, CMYK, 16-bit greyscale (scaled, not clipped) and transparent images (palette with
    transparency, LA, RGBA), which are laid on white. ``name`` labels the photo in errors (default: the
    path, or "photo bytes").

    ``size`` says what the photo is for (the encoder's input side, a (width, height) box, or its data
    config): a photo larger than twice that is then not decoded in full. A JPEG is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= twice the needed size, so a 12-megapixel
    phone photo decodes at 1/4 or 1/8 of each side; other formats (PNG, WebP, ...) are decoded once in
    their own mode and then reduced by a whole factor to the same bound before any turn or colour
    conversion, so a photo costs its decoded size once plus the reduced copy (a quarter of the pixels
    or fewer), instead of several full-size copies. Photos up to twice the needed size come out pixel for pixel as without
    ``size``.

    Raises:
        ImageError: the photo is missing, empty, a folder, not readable, not an image, truncated or
            corrupt, or larger than ``max_pixels`` (``MAX_PIXELS``, 64 megapixels; None: no limit). The
            message names the photo, the problem and what to do; ``reason`` and ``advice`` hold the parts.
    """
    label = _label(source, name)
    box = decode_box(size)
    if isinstance(source, np.ndarray):
        source = _from_array(source, label)
    if isinstance(source, Image.Image):
        try:
            return _upright_rgb(source, box)
        except _DECODE_ERRORS as err:
            raise _explain(err, None, label, max_pixels) from None
    with _opened(source, label, max_pixels) as img:
        draft = img.size  # the full size still lets JPEG skip a colour conversion
        if box is not None and img.format in ("JPEG", "MPO"):
            # The DCT scale applies to the pixels as stored, so a box for the upright photo is turned
            # for orientations 5-8 (stored sideways).
            w, h = box if _orientation(img) < 5 else box[::-1]
            draft = (REDUCING_GAP * w, REDUCING_GAP * h)
        img.draft("RGB", draft)
        img.load()
        return _upright_rgb(img, box)


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    """A photo given as pixels: HxW (grey) or HxWx3 / HxWx4 (RGB, RGBA) uint8, as numpy and OpenCV users hold
    them (OpenCV's BGR order is the caller's to turn)."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(
            f"{label}: an array of shape {array.shape} and type {array.dtype} is not a photo; give "
            "HxW or HxWx3 (or HxWx4) uint8 pixels",
            "unreadable: not a photo array",
            "convert it with np.asarray(img, dtype=np.uint8)",
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))


def check_image(
    source, *, decode: bool = False, max_pixels: int | None = MAX_PIXELS, name: str | None = None
) -> tuple[int, int]:
    """(width, height) of a photo that :func:`load_rgb` would open, else its ImageError.

    Without ``decode`` only the header is read (fast: the file's format, size and the pixel limit);
    with it the pixels are decoded too, which also finds truncated or corrupt files.
    """
    with _opened(source, _label(source, name), max_pixels) as img:
        if decode:
            img.load()
        return img.size


def resolve_image(item: str | PathLike, image_dir: str | PathLike | None = None) -> Path:
    """Where a table's image entry points: relative to ``image_dir`` (nested folders allowed, as in
    ``shoes/red/1.webp``), or an absolute path used as it is."""
    path = Path(item)
    if image_dir is None or path.is_absolute():
        return path
    return Path(image_dir) / path


def open_image(
    item: ImageInput, image_dir: str | PathLike | None = None, *, size: DecodeTarget = None
) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, why it is unusable): a missing photo is an answer, not an exception.

    A path is resolved by :func:`resolve_image`; ``size`` is passed to :func:`load_rgb`.
    """
    if item is None or (isinstance(item, str) and not item.strip()):
        return None, "no photo given"
    if isinstance(item, (str, PathLike)):
        item = resolve_image(item, image_dir)
    try:
        return load_rgb(item, size=size), None
    except ImageError as err:
        return None, str(err)


def eval_pixels(img: Image.Image, preprocess: Preprocess | dict) -> np.ndarray:
    """The encoder's input at evaluation: (3, H, W) float32, normalised, from one RGB image."""
    preprocess = Preprocess.of(preprocess)
    return normalise(eval_uint8(img, preprocess), preprocess.table)


def eval_uint8(img: Image.Image, preprocess: Preprocess | dict, side: int | None = None) -> np.ndarray:
    """The resized, cropped photo of :func:`eval_pixels` before normalisation: (3, side, side) uint8.

    ``side`` (default the input side) is the square kept (see ``Preprocess.crop_box``). The resize is
    Pillow's, one pass at a time in the order ``preprocess.columns_first`` gives, so the result does not
    depend on the Pillow version and ``geometry.resize_crop`` can repeat its integer arithmetic exactly
    on a device.
    """
    preprocess = Preprocess.of(preprocess)
    new_w, new_h = preprocess.resized(*img.size)
    resample = _FILTERS[preprocess.interpolation]
    if columns_first(img.width, img.height, new_w, new_h):
        img = img.resize((img.width, new_h), resample)
    if new_w != img.width:
        img = img.resize((new_w, img.height), resample)
    if new_h != img.height:
        img = img.resize((new_w, new_h), resample)
    left, top, right, bottom = preprocess.crop_box(new_w, new_h, side)
    if (left, top, right, bottom) != (0, 0, new_w, new_h):
        img = img.crop((left, top, right, bottom))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def pixel_table(preprocess: Preprocess | dict) -> np.ndarray:
    """(3, 256) float32: each channel's normalised value of every uint8 level (``Preprocess.table``)."""
    return Preprocess.of(preprocess).table


def normalise(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """float32 encoder input from uint8 photos, (3, H, W) or (N, 3, H, W): one table look-up a pixel."""
    out = np.empty(pixels.shape, dtype=np.float32)
    for c in range(3):  # indexing per channel is about 3x faster than np.take or one 3-D gather
        out[..., c, :, :] = table[c][pixels[..., c, :, :]]
    return out
