"""The device image cache for fine-tuning (``image_cache="memory"``): decode every image once, augment on the device.

Every image is decoded once (fuselabel.gpu_decode), resized as the model's ``Preprocess`` says (short
side ``S = Preprocess.resize``) and cropped to ``S x S`` uint8 around the evaluation crop, and kept on
the GPU (or in pinned host memory when the GPU has no room); with crop_pct >= 1 the whole photo is
squashed to the input size instead, as everywhere else. The DataLoader then yields only row indices
and tokenised captions; ``FuseLabelModule.on_after_batch_transfer`` turns the indices into pixels
on the device (fuselabel.geometry.augment_batch for training rows, the evaluation centre crop for
validation rows).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import default_workers, fit_loaders, single_process
from .encoding import progress_bar
from .geometry import augment_batch, center_batch
from .gpu_decode import gpu_decode_enabled, iter_uint8
from .preprocess import Preprocess

logger = logging.getLogger(__name__)

CACHE_AUGMENTS = ("seed", "none")  # augmentations the cache path reproduces; others use the PIL path


class ImageCache:
    """Every row's image as uint8 (n, 3, S, S), on the GPU or in (pinned) host memory, plus ``present`` (n,),
    the ``Preprocess`` that made them, and the augmentation to apply (``augment``, seeded by ``seed``)."""

    def __init__(
        self, images: torch.Tensor, present: np.ndarray, preprocess: Preprocess, augment: str = "seed", seed: int = 0
    ):
        self.images, self.present, self.augment, self.seed = images, present, augment, seed
        self.preprocess = preprocess
        self.all_present = bool(np.all(present > 0))  # then batches need no masking (and no device sync)
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
    def build(
        cls,
        records,
        image_dir,
        preprocess: Preprocess | dict,
        *,
        device,
        gpu_decode: bool = True,
        num_workers=None,
        missing_images: str = "error",
        augment: str = "seed",
        seed: int = 0,
        batch_size: int = 256,
        progress: bool = True,
        place: torch.device | None = None,
    ) -> ImageCache:
        device = torch.device(device)
        preprocess = Preprocess.of(preprocess)
        n, side = len(records), preprocess.resize
        where = place if place is not None else cls.placement(n, side, device)
        images = torch.empty(
            (n, 3, side, side),
            dtype=torch.uint8,
            device=where,
            pin_memory=where.type == "cpu" and device.type == "cuda",
        )
        present = np.ones(n, dtype=np.float32)
        use_gpu = gpu_decode_enabled(gpu_decode, device)
        start = time.perf_counter()
        bar = progress_bar(n, "image cache", "img", progress)
        for pos, pixels, pres in iter_uint8(
            records,
            image_dir,
            preprocess,
            side,
            device=device,
            gpu_decode=use_gpu,
            num_workers=num_workers,
            batch_size=batch_size,
            missing_images=missing_images,
        ):
            images[pos.to(where)] = pixels.to(where)
            present[pos.numpy()] = pres.numpy()
            bar.update(len(pos))
        bar.close()
        decoder = ("nvJPEG" if device.type == "cuda" else "torchvision.io") if use_gpu else "PIL in DataLoader workers"
        logger.info(
            "image cache: %d images at %dx%d uint8 (%.2f GiB) on %s%s, decoded with %s in %.1fs",
            n,
            side,
            side,
            images.numel() / 2**30,
            where,
            " (pinned)" if images.is_pinned() else "",
            decoder,
            time.perf_counter() - start,
        )
        return cls(images, present, preprocess, augment, seed)

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
        if train and self.augment != "none":
            return augment_batch(images, self.preprocess, generator=self._generator(images.device))
        return center_batch(images, self.preprocess)

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
        return {
            "cache_index": int(self.rows[i]),
            "caption": self.captions[i],
            "labels": self.labels[i],
            "image_present": float(self.present[i]),
        }

    def __getstate__(self):  # workers never touch pixels: don't ship the cache to them
        state = dict(self.__dict__)
        state["image_source"] = None
        return state


def cache_supported(config, net) -> bool:
    return (
        net.image_encoder is not None
        and getattr(config, "image_cache", "none") == "memory"
        and config.augment in CACHE_AUGMENTS
    )


def cached_loaders(
    config, net, tokenizer, preprocess, records, labels, train_idx, val_idx, image_dir, device, sampler=None
):
    """The fine-tuning loaders of ``train._loaders`` when ``image_cache="memory"``: index + caption batches.

    ``loader.dataset.image_source`` is the ImageCache that the LightningModule's
    ``on_after_batch_transfer`` turns indices into pixels with.
    """

    device = torch.device(device)
    # Several processes (DDP) would each hold a copy on one GPU: keep the cache in host memory then.
    place = None if single_process(config) else torch.device("cpu")
    cache = ImageCache.build(
        records,
        image_dir,
        preprocess,
        device=device,
        gpu_decode=getattr(config, "gpu_decode", True),
        num_workers=config.num_workers,
        missing_images=config.missing_images,
        augment=config.augment,
        seed=config.seed,
        place=place,
    )
    if device.type == "cuda":
        net.image_encoder.to(memory_format=torch.channels_last)
    train_ds = CachedRows(train_idx, records, labels, cache)
    val_ds = CachedRows(val_idx, records, labels, cache)
    workers = min(default_workers(config.num_workers), 4)  # only tokenising is left for them
    return fit_loaders(config, tokenizer, train_ds, val_ds, workers=workers, device=device, sampler=sampler)
