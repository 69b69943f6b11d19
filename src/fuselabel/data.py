"""Datasets, the validation split, image transforms and the rare-label sampler."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from .images import ImageError, eval_pixels, load_rgb, resolve_image
from .preprocess import Preprocess


def single_process(config) -> bool:
    """Whether Lightning runs one process, so custom batch samplers and device caches are safe."""
    return (
        config.num_nodes == 1
        and str(config.devices) in ("1", "auto")
        and not torch.cuda.device_count() > 1
        and config.strategy in ("auto", "single_device")
    )


def stratified_split(label_matrix: np.ndarray, val_fraction: float = 0.1, seed: int = 42):
    """Indices (train, val) by iterative stratification, so every label keeps its share on both sides."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = len(label_matrix)
    if n < 2:
        raise ValueError("need at least two labelled rows to split off a validation set")
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(n), label_matrix))
    return np.sort(train_idx), np.sort(val_idx)


class EvalTransform:
    """``images.eval_pixels`` as a tensor: the one evaluation preprocessing, also inside DataLoader workers."""

    def __init__(self, preprocess: Preprocess | dict):
        self.preprocess = Preprocess.of(preprocess)
        self.size = (self.preprocess.size, self.preprocess.size)

    def __call__(self, img) -> torch.Tensor:
        return torch.from_numpy(eval_pixels(img, self.preprocess))


class TablePixels:
    """uint8 (3, H, W) pixels to the encoder's input through ``Preprocess.table``: the one normalisation."""

    def __init__(self, preprocess: Preprocess):
        self.table = torch.from_numpy(preprocess.table.copy())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        index = pixels.to(torch.int64)
        return torch.stack([self.table[c][index[c]] for c in range(3)])


def build_transform(preprocess: Preprocess | dict, train: bool, augment: str = "seed"):
    """The evaluation preprocessing, or torchvision's training augmentation at the model's input size and filter."""
    preprocess = Preprocess.of(preprocess)
    if not train or augment == "none":
        return EvalTransform(preprocess)
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[
        preprocess.interpolation
    ]
    ops = [T.RandomResizedCrop(preprocess.size, scale=(0.5, 1.0), interpolation=interp), T.RandomHorizontalFlip()]
    if augment == "trivial":
        ops.append(T.TrivialAugmentWide(interpolation=interp))
    elif augment == "randaugment":
        ops.append(T.RandAugment(interpolation=interp))
    elif augment == "colorjitter":
        ops.append(T.ColorJitter(0.3, 0.3, 0.3, 0.05))
    return T.Compose([*ops, T.PILToTensor(), TablePixels(preprocess)])


class PairDataset(Dataset):
    """Rows of (image, caption, labels): the raw inputs for fine-tuning and for feature extraction.

    A missing or unreadable image raises ImageError (file and CSV line named) unless
    ``missing_images="caption_only"``, in which case the pixels are zeros and ``image_present`` is 0.
    """

    def __init__(
        self,
        records,
        image_dir,
        transform=None,
        labels: np.ndarray | None = None,
        missing_images: str = "error",
        load_images: bool = True,
    ):
        self.records = list(records)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.transform = transform
        self.labels = labels
        self.missing_images = missing_images
        self.load_images = load_images

    def __len__(self) -> int:
        return len(self.records)

    def _decode_size(self):
        """What photos are decoded for (see ``images.load_rgb``): the evaluation preprocessing, or the side
        of a random resized crop (a crop of half the photo still keeps >= 1.2x its side); None decodes
        every pixel for a transform of unknown size."""
        if isinstance(self.transform, EvalTransform):
            return self.transform.preprocess
        for t in reversed(getattr(self.transform, "transforms", [])):
            if type(t).__name__ == "RandomResizedCrop":
                return max(t.size)
        return None

    def _pixels(self, rec):
        path = resolve_image(rec.image_id, self.image_dir)
        try:
            return self.transform(load_rgb(path, size=self._decode_size())), 1.0
        except ImageError as err:
            if self.missing_images == "caption_only":
                size = self._zero_shape()
                return torch.zeros(size), 0.0
            raise ImageError(
                f"{path}: image {err.reason} for row {rec.image_id} (CSV line {rec.line}); "
                f"{err.advice}, or pass --missing-images caption_only to use the caption alone",
                err.reason,
                err.advice,
            ) from None

    def _zero_shape(self):
        if isinstance(self.transform, EvalTransform):
            return (3, *self.transform.size)
        # The last sized step (CenterCrop / RandomResizedCrop) fixes the output; an earlier Resize does not.
        for t in reversed(getattr(self.transform, "transforms", [])):
            size = getattr(t, "size", None)
            if size is not None:
                size = size if isinstance(size, (tuple, list)) else (size, size)
                return (3, *size[-2:])
        return (3, 224, 224)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        item = {"index": i, "caption": rec.caption}
        if self.load_images:
            item["pixels"], item["image_present"] = self._pixels(rec)
        if self.labels is not None:
            item["labels"] = torch.as_tensor(self.labels[i], dtype=torch.float32)
        return item


class FeatureDataset(Dataset):
    """Rows of cached features: what heads train on in the frozen regime.

    With ``captions`` the rows also carry their text, for the hybrid regime where the
    image side is cached and the text encoder trains.
    """

    def __init__(
        self,
        features: dict[str, np.ndarray],
        labels: np.ndarray | None = None,
        image_present: np.ndarray | None = None,
        captions: list[str] | None = None,
    ):
        self.features = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in features.items()}
        n = len(next(iter(self.features.values()))) if self.features else len(captions)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.float32)
        self.image_present = torch.ones(n) if image_present is None else torch.as_tensor(image_present).float()
        self.captions = captions

    def __len__(self) -> int:
        return len(self.image_present)

    def __getitem__(self, i: int) -> dict:
        item = {f"{k}_feat": v[i] for k, v in self.features.items()}
        item["image_present"] = self.image_present[i]
        if self.labels is not None:
            item["labels"] = self.labels[i]
        if self.captions is not None:
            item["index"], item["caption"] = i, self.captions[i]
        return item


class TextCollate:
    """Batches dataset items: tensors are stacked, captions tokenised with truncation and dynamic padding."""

    def __init__(self, tokenizer=None, max_length: int = 64, word_dropout: float = 0.0, seed: int = 0):
        self.tokenizer = tokenizer
        self.max_length = max_length
        # Caption-side augmentation for a text encoder that trains: each word dropped with this probability.
        self.word_dropout = word_dropout
        self.seed = seed
        self._rng, self._rng_key = None, None

    @property
    def rng(self) -> np.random.Generator:
        """The word-dropout stream of this process.

        Every DataLoader worker starts from a copy of this object, so one seeded generator would
        drop the same words in every worker, and again each epoch its workers are started afresh.
        A worker's stream therefore mixes in its id and its torch seed (drawn anew per epoch from the
        loader's generator, so a seeded run stays reproducible); in the main process it is ``seed``'s.
        """
        info = torch.utils.data.get_worker_info()
        key = None if info is None else (info.id, info.seed)
        if self._rng is None or key != self._rng_key:
            entropy = [self.seed] if info is None else [self.seed, info.id, info.seed]
            self._rng, self._rng_key = np.random.default_rng(entropy), key
        return self._rng

    def _drop_words(self, caption: str) -> str:
        words = caption.split()
        rng = self.rng
        kept = [w for w in words if rng.random() >= self.word_dropout]
        return " ".join(kept or words[:1])

    def __call__(self, items: list[dict]) -> dict:
        batch = {}
        for key, value in items[0].items():
            if key == "caption":
                continue
            batch[key] = (
                torch.stack([it[key] for it in items])
                if torch.is_tensor(value)
                else torch.tensor([it[key] for it in items], dtype=torch.float32 if isinstance(value, float) else None)
            )
        if self.tokenizer is not None:
            captions = [it["caption"] for it in items]
            if self.word_dropout > 0:
                captions = [self._drop_words(c) for c in captions]
            tok = self.tokenizer(
                captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            batch["input_ids"], batch["attention_mask"] = tok["input_ids"], tok["attention_mask"]
        return batch


def fit_loaders(config, tokenizer, train_ds, val_ds, *, workers: int, device, sampler=None) -> tuple:
    """The (training, validation) DataLoaders of a run whose rows carry captions to tokenise: training rows
    shuffled (or drawn by ``sampler``) with word dropout, validation rows in batches twice as large."""
    collate = TextCollate(tokenizer, config.text_max_length)
    train_collate = TextCollate(tokenizer, config.text_max_length, config.word_dropout, config.seed)
    common = dict(num_workers=workers, pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0)
    return (
        train_loader(train_ds, config, sampler, train_collate, **common),
        DataLoader(val_ds, batch_size=config.batch_size * 2, collate_fn=collate, **common),
    )


def oversampling_weights(label_matrix: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Row weights that draw rows holding rare labels more often.

    A row's weight is the largest inverse frequency among its labels, raised to ``power``
    (0 = uniform, 1 = fully balanced by the rarest label); normalised to mean 1.
    """
    freq = label_matrix.sum(0).clip(min=1) / len(label_matrix)
    inv = np.where(label_matrix > 0, 1.0 / freq, 0.0).max(1)
    inv[inv == 0] = 1.0 / freq.max()
    weights = inv**power
    return weights / weights.mean()


def train_loader(dataset, config, sampler, collate_fn, **options) -> DataLoader:
    """The training rows in batches of ``batch_size``: shuffled unless a ``sampler`` draws them, the last short
    batch dropped unless it is the only one."""
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) > config.batch_size,
        collate_fn=collate_fn,
        **options,
    )


def make_sampler(label_matrix: np.ndarray, kind: str, power: float, seed: int):
    if kind == "none":
        return None
    weights = oversampling_weights(label_matrix, power)
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), len(weights), replacement=True, generator=gen
    )


def default_workers(requested: int | None) -> int:
    return requested if requested is not None else min(8, os.cpu_count() or 1)


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of captions of similar length, in random order.

    Dynamic padding pads each batch to its longest caption; grouping similar lengths cuts
    that waste (most of a text encoder's cost on short captions) without giving up shuffling:
    rows are shuffled (or drawn by ``weights``), cut into pools of ``pool`` batches, sorted by
    length inside each pool, and the batches are shuffled again.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int = 0,
        weights: np.ndarray | None = None,
        drop_last: bool = True,
        pool: int = 50,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.weights, self.drop_last, self.pool = batch_size, seed, weights, drop_last, pool
        self.epoch = 0

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.lengths)
        if self.weights is not None:
            order = rng.choice(n, size=n, replace=True, p=self.weights / self.weights.sum())
        else:
            order = rng.permutation(n)
        batches = []
        step = self.batch_size * self.pool
        for start in range(0, n, step):
            chunk = order[start : start + step]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for i in rng.permutation(len(batches)):
            yield batches[i].tolist()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
