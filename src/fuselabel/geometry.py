"""Geometry and augmentation on uint8 image tensors, on any device (the tests run them on a CPU).

The evaluation preprocessing of ``fuselabel.preprocess.Preprocess`` as tensor operations (resize,
crop, normalisation) that give the same bytes as the PIL path (``images.eval_uint8``) on any device,
and the training augmentation done for a whole batch at once: a per-sample random resized crop (scale
(0.5, 1), ratio (3/4, 4/3)) in one ``torchvision.ops.roi_align`` call, a per-sample horizontal flip,
the shared normalisation and channels-last layout.
"""

from __future__ import annotations

import functools
import math

import torch

from .preprocess import PRECISION_BITS, Preprocess, columns_first, resample_weights

RRC_SCALE = (0.5, 1.0)  # as data.build_transform's RandomResizedCrop
RRC_RATIO = (3 / 4, 4 / 3)
_CHUNK = 32  # photos resized at a time: float64 copies of a batch of full-size photos are large


@functools.lru_cache(maxsize=64)
def _weights(in_size: int, out_size: int, interpolation: str, device: str) -> torch.Tensor:
    return torch.from_numpy(resample_weights(in_size, out_size, interpolation)).to(device, torch.float64)


def _resample(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One Pillow resampling pass along the last axis of float64 whole numbers 0..255.

    The weights are integers, so every product and sum is an exact float64 integer (under 2**40), on
    any device and in any summation order; rounding and clipping then follow Pillow's ``clip8``.
    """
    half = float(1 << (PRECISION_BITS - 1))
    return torch.floor_((x @ weights + half) / float(1 << PRECISION_BITS)).clamp_(0, 255)


def resize_uint8(x: torch.Tensor, width: int, height: int, interpolation: str) -> torch.Tensor:
    """uint8 (B, 3, height, width) from uint8 (B, 3, H, W): Pillow's resize, pass by pass in the order
    ``columns_first`` gives (``images.eval_uint8``), byte for byte."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    device = str(x.device)
    y = x.to(torch.float64)
    passes = ["columns", "rows"] if columns_first(w, h, width, height) else ["rows", "columns"]
    for axis in passes:
        if axis == "rows" and w != width:
            y = _resample(y, _weights(w, width, interpolation, device))
        elif axis == "columns" and h != height:
            y = _resample(y.transpose(-1, -2), _weights(h, height, interpolation, device)).transpose(-1, -2)
    return y.to(torch.uint8)


def resize_crop(images: list[torch.Tensor], preprocess: Preprocess, side: int | None = None) -> torch.Tensor:
    """uint8 (B, 3, side, side) from uint8 CHW images of any sizes: ``images.eval_uint8`` on tensors.

    ``side`` (default the input side) is the square kept (``Preprocess.crop_box``). Images of one size
    are resized together, a few at a time.
    """
    if not images:
        raise ValueError("no images")
    side = side or preprocess.size
    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8, device=images[0].device)
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    for (h, w), idx in groups.items():
        new_w, new_h = preprocess.resized(w, h)
        left, top, right, bottom = preprocess.crop_box(new_w, new_h, side)
        for start in range(0, len(idx), _CHUNK):
            part = idx[start : start + _CHUNK]
            x = resize_uint8(torch.stack([images[i] for i in part]), new_w, new_h, preprocess.interpolation)
            out[part] = x[:, :, top:bottom, left:right]
    return out


@functools.lru_cache(maxsize=16)
def _table(preprocess: Preprocess, device: str) -> torch.Tensor:
    """``preprocess.table`` flattened on ``device``: channel c's level v at c * 256 + v."""
    return torch.from_numpy(preprocess.table.copy()).reshape(-1).to(device)


def normalize(x: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """float32 channels-last encoder input from uint8 (B, 3, H, W): ``preprocess.table`` looked up, the
    same numbers as the PIL path's ``images.normalise``."""
    table = _table(preprocess, str(x.device))
    offsets = torch.arange(0, 3 * 256, 256, device=x.device, dtype=torch.int32).view(1, 3, 1, 1)
    index = (x.to(torch.int32) + offsets).reshape(-1)
    out = table.index_select(0, index).view(x.shape)
    return out.contiguous(memory_format=torch.channels_last)


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
    preprocess: Preprocess,
    *,
    generator: torch.Generator | None = None,
    scale=RRC_SCALE,
    ratio=RRC_RATIO,
    flip_p: float = 0.5,
    return_params: bool = False,
):
    """Training pixels from uint8 (B, 3, S, S): per-sample random resized crop + flip, normalised, channels-last.

    The crops are rounded to uint8, as the PIL training path's are, and normalised by the one table.
    """
    n, _, height, width = images.shape
    boxes = random_resized_crop_boxes(n, height, width, scale, ratio, generator, images.device)
    x = crop_resize(images.float(), boxes, preprocess.size).round_().clamp_(0, 255).to(torch.uint8)
    flips = torch.rand(n, generator=generator, device=images.device) < flip_p
    x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    x = normalize(x, preprocess)
    return (x, boxes, flips) if return_params else x


def center_batch(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Evaluation pixels from the cache's uint8 (B, 3, S, S): the input square, normalised."""
    left, top, right, bottom = preprocess.crop_box(images.shape[-1], images.shape[-2])
    return normalize(images[:, :, top:bottom, left:right], preprocess)
