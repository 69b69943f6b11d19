"""Geometry and augmentation on uint8 image tensors, on any device (the tests run them on a CPU).

The backbone's evaluation preprocessing as tensor operations (short-side resize, centre crop,
normalisation), and the training augmentation done for a whole batch at once: a per-sample random
resized crop (scale (0.5, 1), ratio (3/4, 4/3)) in one ``torchvision.ops.roi_align`` call, a
per-sample horizontal flip, float conversion, the backbone's normalisation and channels-last layout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RRC_SCALE = (0.5, 1.0)  # as data.build_transform's RandomResizedCrop
RRC_RATIO = (3 / 4, 4 / 3)


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
    interpolation: str = "bicubic"  # bicubic | bilinear (others are treated as bilinear)
    squash: bool = False

    @classmethod
    def from_data_config(cls, data_config: dict) -> Geometry:
        size = int(data_config["input_size"][-1])
        crop_pct = data_config.get("crop_pct", 0.875)
        squash = crop_pct >= 1.0
        resize = size if squash else max(int(round(size / crop_pct)), size)
        interp = data_config.get("interpolation", "bicubic")
        return cls(
            size,
            resize,
            tuple(float(m) for m in data_config["mean"]),
            tuple(float(s) for s in data_config["std"]),
            interp if interp in ("bicubic", "bilinear") else "bilinear",
            squash,
        )


def resized_hw(height: int, width: int, short: int) -> tuple[int, int]:
    """Output size of torchvision's ``Resize(short)``: the short side becomes ``short``, the long one truncates."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(crop)``."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def resize_center_crop(
    images: list[torch.Tensor], resize: int, crop: int, interpolation: str = "bicubic", squash: bool = False
) -> torch.Tensor:
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
        out[idx] = x[:, :, top : top + crop, left : left + crop].to(torch.uint8)
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


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale=RRC_SCALE,
    ratio=RRC_RATIO,
    generator: torch.Generator | None = None,
    device=None,
    attempts: int = 10,
) -> torch.Tensor:
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


def augment_batch(
    images: torch.Tensor,
    size: int,
    mean,
    std,
    *,
    generator: torch.Generator | None = None,
    scale=RRC_SCALE,
    ratio=RRC_RATIO,
    flip_p: float = 0.5,
    return_params: bool = False,
):
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
    return normalize(images[:, :, top : top + size, left : left + size], mean, std)
