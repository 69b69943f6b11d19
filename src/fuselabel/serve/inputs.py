"""A request's inputs, checked and decoded: photos by a few threads, at no more than the model needs."""

import base64
import binascii
from concurrent.futures import ThreadPoolExecutor

from fastapi import HTTPException
from PIL import Image

from ..images import ImageError, load_rgb
from .schemas import MAX_CAPTION_CHARS
from .telemetry import Metrics


def photo_from_bytes(data: bytes, where: str = "image", size=None, max_pixels: int | None = None):
    """An RGB image from uploaded bytes, or 415. Empty bytes mean no photo (a form's empty file field).

    ``size`` (the model's preprocessing) keeps a large photo from being decoded in full.
    """
    if not data:
        return None
    try:
        return load_rgb(data, name=where, size=size, max_pixels=max_pixels)  # refuses bombs by pixel count
    except (ImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise HTTPException(415, f"{err} (send a JPEG, PNG, WebP, GIF or BMP file)") from None


def caption_text(text: str | None, where: str = "caption") -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > MAX_CAPTION_CHARS:
        raise HTTPException(422, f"{where}: {len(text)} characters, over the limit of {MAX_CAPTION_CHARS}")
    return text


def require_input(kind: str, image, caption, where: str = "request") -> None:
    """422 unless the request holds an input this model reads (an image-only model ignores captions)."""
    reads = {"image": ("photo",), "text": ("caption",)}.get(kind, ("photo", "caption"))
    given = [name for name, value in (("photo", image), ("caption", caption)) if value is not None]
    if not set(given) & set(reads):
        what = " or ".join(reads)
        raise HTTPException(
            422,
            f"{where}: send a {what}"
            + (f" (this model reads only its {reads[0]}s)" if len(reads) == 1 else ", or both"),
        )


def decode_base64(text: str | None, where: str) -> bytes:
    if not text:
        return b""
    if text.startswith("data:") and "," in text:  # a data: URL, as browsers write them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{where}: image_base64 is not valid base64") from None


class Decoder:
    """Photos decoded by a few threads, so however many requests arrive, only that many photos are ever
    held at full size at once; each comes out reduced to what the model needs."""

    def __init__(self, workers: int, size, max_pixels: int, metrics: Metrics):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuselabel-decode")
        self.size, self.max_pixels, self.metrics = size, max_pixels, metrics

    def _one(self, data: bytes | str | None, where: str):
        if isinstance(data, str) or data is None:  # base64 is decoded here too: one item's bytes at a time
            data = decode_base64(data, where.split(":")[0])
        photo = photo_from_bytes(data, where, self.size, self.max_pixels)
        if photo is not None:
            self.metrics.photos.inc()
        return photo

    def one(self, data: bytes, where: str = "image"):
        return self.pool.submit(self._one, data, where).result()

    def many(self, items: list[tuple[bytes | str | None, str]]) -> list:
        futures = [self.pool.submit(self._one, data, where) for data, where in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:  # after an error, the rest are not decoded
                f.cancel()
