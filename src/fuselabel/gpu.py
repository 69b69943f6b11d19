"""The fast data path: decode images once, make pixels on the device.

Two uses, one set of tensor operations that run on any device (the tests run them on a CPU):

* **Fine-tuning** (``image_cache="memory"``): every image is decoded once, resized so its short
  side is ``S = round(input_size / crop_pct)`` and centre-cropped to ``S x S`` uint8, and kept on
  the GPU (or in pinned host memory when the GPU has no room); with crop_pct >= 1 the whole photo
  is squashed to ``input_size`` instead, as data.build_transform does. The DataLoader then yields only
  row indices and tokenised captions; ``FuseLabelModule.on_after_batch_transfer`` turns the
  indices into pixels on the device: a per-sample random resized crop (scale (0.5, 1), ratio
  (3/4, 4/3)) done for the whole batch in one ``torchvision.ops.roi_align`` call, a per-sample
  horizontal flip, float conversion, the backbone's normalisation and channels-last layout.
  Validation rows take the evaluation centre crop from the same cache.
* **Prediction / feature extraction** (``extract_image_features`` on a GPU): DataLoader workers
  only read file bytes; JPEGs are decoded in batches with nvJPEG
  (``torchvision.io.decode_jpeg(list, device="cuda")``), resized on the device (antialiased),
  centre-cropped and normalised. Files nvJPEG should not take (not a JPEG, CMYK/YCCK, arithmetic
  coding) are decoded with PIL in the worker; files it fails on fall back to PIL one by one;
  missing or unreadable files follow the ``missing_images`` policy exactly like the PIL path.

``FUSELABEL_GPU_DECODE`` overrides the choice of decoder: ``0`` = the PIL path, ``1`` = nvJPEG
(GPU only, the default there), ``force`` = this tensor path even on a CPU (for tests / dry runs).
"""

from __future__ import annotations

import functools
import io
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .data import ImageError, TextCollate, default_workers, single_process

# torchvision >= 0.29 marks its JPEG codecs deprecated (in favour of TorchCodec); they still work, and the
# GPU machine's torchvision 0.26 has no such notice.
warnings.filterwarnings("ignore", message=r"The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

RRC_SCALE = (0.5, 1.0)          # as data.build_transform's RandomResizedCrop
RRC_RATIO = (3 / 4, 4 / 3)
CACHE_AUGMENTS = ("seed", "none")  # augmentations the cache path reproduces; others use the PIL path


# ---------------------------------------------------------------------------------------------------------------
# Geometry and the per-batch tensor operations


@dataclass(frozen=True)
class Geometry:
    """The backbone's evaluation preprocessing, as data.build_transform does it.

    Resize the short side to ``resize`` and centre-crop ``size``; with ``squash`` (crop_pct >= 1) the
    whole photo is resized to ``size`` x ``size`` instead (and ``resize == size``).
    """

    size: int
    resize: int
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"   # bicubic | bilinear (others are treated as bilinear)
    squash: bool = False

    @classmethod
    def from_data_config(cls, data_config: dict) -> "Geometry":
        size = int(data_config["input_size"][-1])
        crop_pct = data_config.get("crop_pct", 0.875)
        squash = crop_pct >= 1.0
        resize = size if squash else max(int(round(size / crop_pct)), size)
        interp = data_config.get("interpolation", "bicubic")
        return cls(size, resize, tuple(float(m) for m in data_config["mean"]),
                   tuple(float(s) for s in data_config["std"]),
                   interp if interp in ("bicubic", "bilinear") else "bilinear", squash)


def resized_hw(height: int, width: int, short: int) -> tuple[int, int]:
    """Output size of torchvision's ``Resize(short)``: the short side becomes ``short``, the long one truncates."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(crop)``."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def resize_center_crop(images: list[torch.Tensor], resize: int, crop: int, interpolation: str = "bicubic",
                       squash: bool = False) -> torch.Tensor:
    """uint8 (B, 3, crop, crop) from uint8 CHW images of any sizes: antialiased resize of the short side, centre crop.

    ``squash``: resize the whole image to ``crop`` x ``crop`` instead. Images of one size are resized
    in one call; values are rounded to uint8 as PIL's resize does.
    """
    if not images:
        raise ValueError("no images")
    device = images[0].device
    out = torch.empty((len(images), 3, crop, crop), dtype=torch.uint8, device=device)
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    for (h, w), idx in groups.items():
        nh, nw = (crop, crop) if squash else resized_hw(h, w, resize)
        x = torch.stack([images[i] for i in idx]).float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=interpolation, antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
        top, left = center_offsets(nh, nw, crop)
        out[idx] = x[:, :, top:top + crop, left:left + crop].to(torch.uint8)
    return out


@functools.lru_cache(maxsize=16)
def _norm_consts(mean: tuple, std: tuple, device: str):
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x / 255 - mean) / std as float32 channels-last, from uint8 or float 0..255 pixels (B, 3, H, W)."""
    scale, shift = _norm_consts(tuple(mean), tuple(std), str(x.device))
    return (x.float() * scale + shift).contiguous(memory_format=torch.channels_last)


def random_resized_crop_boxes(n: int, height: int, width: int, scale=RRC_SCALE, ratio=RRC_RATIO,
                              generator: torch.Generator | None = None, device=None,
                              attempts: int = 10) -> torch.Tensor:
    """Boxes (n, 4) as x1, y1, x2, y2 in pixels, drawn per sample as ``RandomResizedCrop.get_params`` does.

    Ten tries per sample at a random area share and log-uniform aspect ratio; the first that fits
    is taken, else the whole image cropped to the nearest allowed ratio (torchvision's fallback).
    Boxes are continuous (roi_align samples between pixels), not rounded to whole pixels.
    """
    u = torch.rand((n, attempts, 4), generator=generator, device=device)
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(target * aspect)
    h = torch.sqrt(target / aspect)
    fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    ok = fits.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    ux, uy = u[..., 2].gather(1, first).squeeze(1), u[..., 3].gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = float(width), width / min(ratio)
    elif in_ratio > max(ratio):
        fw, fh = height * max(ratio), float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(ok, w, torch.full_like(w, fw))
    h = torch.where(ok, h, torch.full_like(h, fh))
    ux = torch.where(ok, ux, torch.full_like(ux, 0.5))
    uy = torch.where(ok, uy, torch.full_like(uy, 0.5))
    x1 = (width - w).clamp(min=0) * ux
    y1 = (height - h).clamp(min=0) * uy
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """One box per sample of float (B, C, H, W), each resized to ``size`` x ``size`` bilinearly, in one roi_align call.

    ``aligned=True`` puts pixel centres at half-integers, so the box (0, 0, W, H) at output size W x H
    returns the image unchanged; ``sampling_ratio=-1`` averages several samples per output pixel
    when a box is shrunk (a light antialias).
    """
    from torchvision.ops import roi_align

    index = torch.arange(len(x), device=x.device, dtype=x.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(device=x.device, dtype=x.dtype)], 1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def augment_batch(images: torch.Tensor, size: int, mean, std, *, generator: torch.Generator | None = None,
                  scale=RRC_SCALE, ratio=RRC_RATIO, flip_p: float = 0.5, return_params: bool = False):
    """Training pixels from uint8 (B, 3, S, S): per-sample random resized crop + flip, normalised, channels-last."""
    n, _, height, width = images.shape
    boxes = random_resized_crop_boxes(n, height, width, scale, ratio, generator, images.device)
    x = crop_resize(images.float(), boxes, size)
    flips = torch.rand(n, generator=generator, device=images.device) < flip_p
    x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    x = normalize(x, mean, std)
    return (x, boxes, flips) if return_params else x


def center_batch(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Evaluation pixels from uint8 (B, 3, S, S): the centre ``size`` x ``size`` crop, normalised."""
    top, left = center_offsets(images.shape[-2], images.shape[-1], size)
    return normalize(images[:, :, top:top + size, left:left + size], mean, std)


# ---------------------------------------------------------------------------------------------------------------
# Reading and decoding


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
        if marker == 0xFF:                      # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):              # end of image / start of scan before any frame header
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
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (img.width, img.height))
        return img.convert("RGB")


def _pil_to_chw(img) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


class _ReadDataset(Dataset):
    """What a worker does per row: read the bytes (``mode="bytes"``) or decode and crop with PIL (``"pil"``).

    bytes mode returns the raw file for nvJPEG when it can take it, else the full-size PIL decode.
    pil mode returns uint8 at the final geometry (resize ``resize``, centre crop ``crop``).
    Errors travel back as strings; the main process applies the missing-images policy. Items hold
    bytes and numpy arrays, not tensors: a batch of tensors would cost one shared-memory file each.
    """

    def __init__(self, records, image_dir, mode: str, geometry: Geometry, crop: int):
        self.records, self.image_dir, self.mode, self.geometry, self.crop = list(records), Path(image_dir), mode, \
            geometry, crop

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
        if self.mode == "bytes" and nvjpeg_friendly(data):
            item["data"] = data
            return item
        try:
            img = _pil_rgb(data)
            if self.mode == "pil":
                from torchvision import transforms as T

                interp = T.InterpolationMode.BICUBIC if self.geometry.interpolation == "bicubic" \
                    else T.InterpolationMode.BILINEAR
                if self.geometry.squash:
                    img = T.Resize((self.crop, self.crop), interpolation=interp)(img)
                else:
                    img = T.CenterCrop(self.crop)(T.Resize(self.geometry.resize, interpolation=interp)(img))
                item["final"] = True
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
        probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception as err:
        print(f"  fuselabel.gpu: JPEG decoding on {device} is not available ({type(err).__name__}: {err}); "
              "using PIL in DataLoader workers")
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
    return ImageError(f"{path}: image {reason} for row {record.image_id} (CSV line {record.line}); "
                      "pass --missing-images caption_only to predict from the caption alone")


def iter_uint8(records, image_dir, geometry: Geometry, crop: int, *, device, gpu_decode: bool,
               num_workers: int | None = None, batch_size: int = 256, missing_images: str = "error"):
    """Yield (positions (B,) int64, pixels uint8 (B, 3, crop, crop) on ``device``, present float32 (B,)) in row order.

    ``gpu_decode``: workers read bytes and JPEGs are decoded on ``device`` (nvJPEG on CUDA); else
    workers decode, resize and crop with PIL. Either way the pixels follow the evaluation geometry
    (short side ``geometry.resize``, centre crop ``crop``; or squashed whole to ``crop``). Unusable
    images raise ImageError, or with ``missing_images="caption_only"`` come back as zeros, present 0.
    """
    device = torch.device(device)
    records = list(records)
    ds = _ReadDataset(records, image_dir, "bytes" if gpu_decode else "pil", geometry, crop)
    workers = default_workers(num_workers)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate_read,
                        prefetch_factor=4 if workers > 0 else None)
    for batch in loader:
        items, final = batch["items"], batch["final"]
        jpegs = [it for it in items if it["data"] is not None]
        datas = [torch.frombuffer(bytearray(it["data"]), dtype=torch.uint8) for it in jpegs]
        for it, img in zip(jpegs, _decode(datas, device)):
            if img is None:  # nvJPEG refused it: PIL, in this process (rare)
                try:
                    img = _pil_to_chw(_pil_rgb(it["data"]))
                except Exception as err:
                    it["error"] = f"unreadable ({err})"
            it["pixels"] = img
        out = torch.zeros((len(items), 3, crop, crop), dtype=torch.uint8, device=device)
        present = torch.ones(len(items), dtype=torch.float32)
        done = set(final)
        todo = [k for k, it in enumerate(items) if it["error"] is None and k not in done]
        if final:
            out[final] = batch["pixels"].to(device, non_blocking=True)
        if todo:
            out[todo] = resize_center_crop([torch.as_tensor(items[k]["pixels"]).to(device, non_blocking=True)
                                            for k in todo],
                                           geometry.resize, crop, geometry.interpolation, geometry.squash)
        for k, it in enumerate(items):
            if it["error"] is not None:
                if missing_images != "caption_only":
                    raise _policy_error(records[it["pos"]], image_dir, it["error"])
                present[k] = 0.0
        yield torch.tensor([it["pos"] for it in items], dtype=torch.int64), out, present


# ---------------------------------------------------------------------------------------------------------------
# Prediction / feature extraction


@torch.inference_mode()
def extract_image_features_gpu(encoder, data_config, records, image_dir, *, batch_size=64, num_workers=None,
                               flip_tta=False, missing_images="error", device=None, progress=True):
    """``features.extract_image_features`` with nvJPEG decoding and device-side resize/crop/normalise.

    Same outputs: (features float32 (n, d), image_present float32 (n,)); caption-only rows get the
    features of an all-zero (normalised) input, as on the PIL path.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    geo = Geometry.from_data_config(data_config)
    encoder = encoder.eval().to(device)
    # Pixels in the encoder's own layout, so this path differs from the PIL one in decoding alone.
    conv = next((p for p in encoder.parameters() if p.dim() == 4), None)
    layout = torch.channels_last if conv is not None and not conv.is_contiguous() and conv.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    n = len(records)
    feats: list[torch.Tensor] = []     # kept on the device: no sync per batch, so the next batch's decode
    present: list[np.ndarray] = []     # (nvJPEG's Huffman stage runs on this thread) overlaps this one's forward
    start, done = time.time(), 0
    for _, pixels, pres in iter_uint8(records, image_dir, geo, geo.size, device=device, gpu_decode=True,
                                      num_workers=num_workers, batch_size=max(batch_size, 1),
                                      missing_images=missing_images):
        x = normalize(pixels, geo.mean, geo.std).contiguous(memory_format=layout)
        if not bool(pres.all()):
            x = x * pres.to(device).view(-1, 1, 1, 1)
        f = encoder(x).float()
        if flip_tta:
            f = (f + encoder(x.flip(-1)).float()) / 2
        feats.append(f)
        present.append(pres.numpy())
        done += len(pres)
        if progress:
            rate = done / max(time.time() - start, 1e-9)
            print(f"\r  image features {done}/{n} ({rate:.0f}/s, {device.type} decode)", end="", flush=True)
    if progress:
        print()
    if not feats:
        return np.zeros((0, encoder.num_features), np.float32), np.zeros(0, np.float32)
    return torch.cat(feats).cpu().numpy().astype(np.float32), np.concatenate(present).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning: the image cache


class ImageCache:
    """Every row's image as uint8 (n, 3, S, S), on the GPU or in (pinned) host memory, plus ``present`` (n,)."""

    def __init__(self, images: torch.Tensor, present: np.ndarray, geometry: Geometry, augment: str = "seed",
                 seed: int = 0):
        self.images, self.present, self.geometry, self.augment, self.seed = images, present, geometry, augment, seed
        self.all_present = bool(np.all(present > 0))    # then batches need no masking (and no device sync)
        self._generators: dict[str, torch.Generator] = {}

    @staticmethod
    def placement(n: int, side: int, device: torch.device) -> torch.device:
        """The GPU when the cache leaves room for training (a quarter of the card, at least 8 GiB), else the host."""
        if device.type != "cuda":
            return torch.device("cpu")
        need = n * 3 * side * side
        free, total = torch.cuda.mem_get_info(device)
        return device if need + max(8 << 30, total // 4) < free else torch.device("cpu")

    @classmethod
    def build(cls, records, image_dir, data_config, *, device, gpu_decode: bool = True, num_workers=None,
              missing_images: str = "error", augment: str = "seed", seed: int = 0, batch_size: int = 256,
              progress: bool = True, place: torch.device | None = None) -> "ImageCache":
        device = torch.device(device)
        geo = Geometry.from_data_config(data_config)
        n, side = len(records), geo.resize
        where = place if place is not None else cls.placement(n, side, device)
        images = torch.empty((n, 3, side, side), dtype=torch.uint8, device=where,
                             pin_memory=where.type == "cpu" and device.type == "cuda")
        present = np.ones(n, dtype=np.float32)
        use_gpu = gpu_decode_enabled(gpu_decode, device)
        start = shown = time.time()
        for pos, pixels, pres in iter_uint8(records, image_dir, geo, side, device=device, gpu_decode=use_gpu,
                                            num_workers=num_workers, batch_size=batch_size,
                                            missing_images=missing_images):
            images[pos.to(where)] = pixels.to(where)
            present[pos.numpy()] = pres.numpy()
            if progress and (time.time() - shown > 2 or int(pos[-1]) + 1 == n):
                done, shown = int(pos[-1]) + 1, time.time()
                print(f"\r  image cache {done}/{n} ({done / max(time.time() - start, 1e-9):.0f}/s)", end="",
                      flush=True)
        if progress:
            print()
        decoder = ("nvJPEG" if device.type == "cuda" else "torchvision.io") if use_gpu else \
            "PIL in DataLoader workers"
        print(f"  image cache: {n} images at {side}x{side} uint8 ({images.numel() / 2**30:.2f} GiB) on {where}"
              f"{' (pinned)' if images.is_pinned() else ''}, decoded with {decoder} in {time.time() - start:.1f}s")
        return cls(images, present, geo, augment, seed)

    def __len__(self) -> int:
        return len(self.images)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def take(self, index: torch.Tensor, device=None) -> torch.Tensor:
        """uint8 (B, 3, S, S) of cache rows ``index``, on ``device`` (default: the index's)."""
        device = torch.device(device) if device is not None else index.device
        rows = self.images.index_select(0, index.to(self.images.device))
        return rows.to(device, non_blocking=True)

    def pixels(self, index: torch.Tensor, train: bool, device=None) -> torch.Tensor:
        images = self.take(index, device)
        g = self.geometry
        if train and self.augment != "none":
            return augment_batch(images, g.size, g.mean, g.std, generator=self._generator(images.device))
        return center_batch(images, g.size, g.mean, g.std)

    def materialize(self, batch: dict, train: bool) -> dict:
        """``batch`` with ``pixels`` made from its ``cache_index`` on the batch's device (rows without an image: 0)."""
        index = batch["cache_index"]
        pixels = self.pixels(index, train, index.device)
        present = batch.get("image_present")
        if present is not None and not self.all_present:
            pixels = pixels * present.to(pixels.device, pixels.dtype).view(-1, 1, 1, 1)
        batch = dict(batch)
        batch["pixels"] = pixels
        return batch

    def with_pixels(self, loader, device) -> "PixelBatches":
        """Evaluation batches of ``loader`` moved to ``device`` with pixels, for loops outside Lightning."""
        return PixelBatches(loader, self, torch.device(device))


class PixelBatches:
    def __init__(self, loader, cache: ImageCache, device: torch.device):
        self.loader, self.cache, self.device = loader, cache, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            yield self.cache.materialize(batch, train=False)


class CachedRows(Dataset):
    """Rows as (cache index, caption, labels, image_present): what the DataLoader carries when pixels are cached."""

    def __init__(self, rows, records, labels: np.ndarray, cache: ImageCache):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.captions = [records[i].caption for i in self.rows]
        self.labels = torch.as_tensor(labels[self.rows], dtype=torch.float32)
        self.present = cache.present[self.rows].astype(np.float32)
        self.image_source = cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"cache_index": int(self.rows[i]), "caption": self.captions[i], "labels": self.labels[i],
                "image_present": float(self.present[i])}

    def __getstate__(self):  # workers never touch pixels: don't ship the cache to them
        state = dict(self.__dict__)
        state["image_source"] = None
        return state


def cache_supported(config, net) -> bool:
    return net.image_encoder is not None and getattr(config, "image_cache", "none") == "memory" \
        and config.augment in CACHE_AUGMENTS


def cached_loaders(config, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir, device,
                   sampler=None):
    """The fine-tuning loaders of ``train._loaders`` when ``image_cache="memory"``: index + caption batches.

    ``loader.dataset.image_source`` is the ImageCache that the LightningModule's
    ``on_after_batch_transfer`` turns indices into pixels with.
    """

    device = torch.device(device)
    # Several processes (DDP) would each hold a copy on one GPU: keep the cache in host memory then.
    place = None if single_process(config) else torch.device("cpu")
    cache = ImageCache.build(records, image_dir, data_config, device=device,
                             gpu_decode=getattr(config, "gpu_decode", True), num_workers=config.num_workers,
                             missing_images=config.missing_images, augment=config.augment, seed=config.seed,
                             place=place)
    if device.type == "cuda":
        net.image_encoder.to(memory_format=torch.channels_last)
    collate = TextCollate(tokenizer, config.text_max_length)
    dropout = getattr(config, "word_dropout", 0.0)
    train_collate = TextCollate(tokenizer, config.text_max_length, word_dropout=dropout, seed=config.seed) \
        if dropout > 0 else collate
    train_ds = CachedRows(train_idx, records, labels, cache)
    val_ds = CachedRows(val_idx, records, labels, cache)
    workers = min(default_workers(config.num_workers), 4)   # only tokenising is left for them
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return (DataLoader(train_ds, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=len(train_ds) > config.batch_size, collate_fn=train_collate, **common),
            DataLoader(val_ds, batch_size=config.batch_size * 2, collate_fn=collate, **common))
