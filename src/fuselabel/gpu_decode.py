"""Image decoding for the device image cache: file bytes -> uint8 tensors on the device.

DataLoader workers only read file bytes; JPEGs are decoded in batches with nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``), resized on the device (antialiased) and
cropped (fuselabel.geometry.resize_crop, the PIL path's own arithmetic). Files nvJPEG should not take (not a JPEG, CMYK/YCCK,
arithmetic coding) are decoded with PIL in the worker; files it fails on fall back to PIL one by
one; missing or unreadable files follow the ``missing_images`` policy exactly like the PIL path.

``FUSELABEL_GPU_DECODE`` overrides the choice of decoder: ``0`` = the PIL path, ``1`` = nvJPEG
(GPU only, the default there), ``force`` = this tensor path even on a CPU (for tests / dry runs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import ImageError, default_workers
from .geometry import resize_crop
from .images import eval_uint8, exif_orientation
from .preprocess import Preprocess

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_codecs():
    """torchvision >= 0.29 marks its JPEG codecs deprecated (in favour of TorchCodec); they still work."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The image decoding and encoding capabilities of TorchVision",
            category=DeprecationWarning,
        )
        yield


def jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, colour components) of a JPEG, or None when ``data`` is not a parsable JPEG."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (marker, data[i + 9]) if i + 9 < n else None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def nvjpeg_friendly(data: bytes) -> bool:
    """Baseline, extended or progressive Huffman JPEG with 1 or 3 components (not CMYK/YCCK, not arithmetic)."""
    frame = jpeg_frame(data)
    return frame is not None and frame[0] in (0xC0, 0xC1, 0xC2) and frame[1] in (1, 3)


def _pil_rgb(data: bytes):
    from .images import load_rgb  # the one safe door: pixel limit, EXIF orientation, every mode to RGB

    return load_rgb(data)


def _pil_to_chw(img) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


class _ReadDataset(Dataset):
    """What a worker does per row: read the bytes (``mode="bytes"``) or decode and crop with PIL (``"pil"``).

    bytes mode returns the raw file for nvJPEG when it can take it, else the full-size PIL decode.
    pil mode returns uint8 ``side`` x ``side`` (``images.eval_uint8``).
    Errors travel back as strings; the main process applies the missing-images policy. Items hold
    bytes and numpy arrays, not tensors: a batch of tensors would cost one shared-memory file each.
    """

    def __init__(self, records, image_dir, mode: str, preprocess: Preprocess, side: int):
        self.records, self.image_dir, self.mode = list(records), Path(image_dir), mode
        self.preprocess, self.side = preprocess, side

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        item = {"pos": i, "data": None, "pixels": None, "final": False, "error": None}
        path = self.image_dir / self.records[i].image_id
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            item["error"] = "missing"
            return item
        except OSError as err:
            item["error"] = f"unreadable ({err})"
            return item
        # nvJPEG knows nothing of EXIF: a photo stored turned goes the PIL way, which turns it upright.
        if self.mode == "bytes" and nvjpeg_friendly(data) and exif_orientation(data) == 1:
            item["data"] = data
            return item
        try:
            img = _pil_rgb(data)
            if self.mode == "pil":
                item["pixels"], item["final"] = eval_uint8(img, self.preprocess, self.side), True
            else:
                item["pixels"] = _pil_to_chw(img)
        except Exception as err:  # PIL raises several types for a broken file
            item["error"] = f"unreadable ({err})"
        return item


def _collate_read(items: list[dict]) -> dict:
    """One tensor for the batch's final-geometry pixels (one shared-memory file), the rest as pickled items."""
    final = [k for k, it in enumerate(items) if it["final"] and it["error"] is None]
    stacked = torch.from_numpy(np.stack([items[k]["pixels"] for k in final])) if final else None
    for k in final:
        items[k]["pixels"] = None
    return {"items": items, "final": final, "pixels": stacked}


def _decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG byte tensors on ``device`` (batched on CUDA); None where one fails on its own."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    with _quiet_codecs():
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except Exception:  # one bad file fails the whole batch: decode one by one to find it
            out = []
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except Exception:
                    out.append(None)
            return out


@functools.lru_cache(maxsize=4)
def _nvjpeg_works(device: str) -> bool:
    """Whether this torchvision decodes JPEGs on ``device`` (built with nvJPEG, driver usable)."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    try:
        with _quiet_codecs():
            probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
            decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception as err:
        logger.warning(
            "JPEG decoding on %s is not available (%s: %s); using PIL in DataLoader workers",
            device,
            type(err).__name__,
            err,
        )
        return False


def gpu_decode_enabled(requested: bool | None, device) -> bool:
    """Whether to decode with the tensor path: ``FUSELABEL_GPU_DECODE`` first, then ``requested``, then CUDA or not."""
    device = torch.device(device)
    env = os.environ.get("FUSELABEL_GPU_DECODE", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env == "force":
        return True
    if requested is False or device.type != "cuda":
        return False
    return _nvjpeg_works(str(device))


def _policy_error(record, image_dir, reason: str) -> ImageError:
    path = Path(image_dir) / record.image_id
    return ImageError(
        f"{path}: image {reason} for row {record.image_id} (CSV line {record.line}); "
        "pass --missing-images caption_only to train such rows on their caption alone"
    )


def _decode_bytes(items: list[dict], device: torch.device) -> None:
    """Items that came as JPEG bytes get their pixels decoded on ``device`` (PIL where that fails)."""
    jpegs = [it for it in items if it["data"] is not None]
    datas = [torch.frombuffer(bytearray(it["data"]), dtype=torch.uint8) for it in jpegs]
    for it, img in zip(jpegs, _decode(datas, device)):
        if img is None:  # nvJPEG refused it: PIL, in this process (rare)
            try:
                img = _pil_to_chw(_pil_rgb(it["data"]))
            except Exception as err:
                it["error"] = f"unreadable ({err})"
        it["pixels"] = img


def _batch_pixels(batch: dict, preprocess: Preprocess, side: int, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, side, side): the workers' finished crops, and the rest resized and cropped on ``device``."""
    items, final = batch["items"], batch["final"]
    out = torch.zeros((len(items), 3, side, side), dtype=torch.uint8, device=device)
    if final:
        out[final] = batch["pixels"].to(device, non_blocking=True)
    done = set(final)
    todo = [k for k, it in enumerate(items) if it["error"] is None and k not in done]
    if todo:
        pixels = [torch.as_tensor(items[k]["pixels"]).to(device, non_blocking=True) for k in todo]
        out[todo] = resize_crop(pixels, preprocess, side)
    return out


def iter_uint8(
    records,
    image_dir,
    preprocess: Preprocess | dict,
    side: int | None = None,
    *,
    device,
    gpu_decode: bool,
    num_workers: int | None = None,
    batch_size: int = 256,
    missing_images: str = "error",
):
    """Yield (positions (B,) int64, pixels uint8 (B, 3, side, side) on ``device``, present float32 (B,)) in row order.

    ``gpu_decode``: workers read bytes and JPEGs are decoded on ``device`` (nvJPEG on CUDA); else
    workers decode, resize and crop with PIL. Either way the pixels are ``images.eval_uint8``'s for
    ``side`` (default the input side; see ``Preprocess.crop_box``). Unusable images raise ImageError,
    or with ``missing_images="caption_only"`` come back as zeros, present 0.
    """
    device = torch.device(device)
    preprocess = Preprocess.of(preprocess)
    side = side or preprocess.size
    records = list(records)
    ds = _ReadDataset(records, image_dir, "bytes" if gpu_decode else "pil", preprocess, side)
    workers = default_workers(num_workers)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate_read,
        prefetch_factor=4 if workers > 0 else None,
    )
    for batch in loader:
        items = batch["items"]
        _decode_bytes(items, device)
        out = _batch_pixels(batch, preprocess, side, device)
        present = torch.ones(len(items), dtype=torch.float32)
        for k, it in enumerate(items):
            if it["error"] is not None:
                if missing_images != "caption_only":
                    raise _policy_error(records[it["pos"]], image_dir, it["error"])
                present[k] = 0.0
        yield torch.tensor([it["pos"] for it in items], dtype=torch.int64), out, present
