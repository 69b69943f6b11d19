"""The data loaders of a training run: cached-feature rows (frozen, hybrid) or raw photos and captions.

Validation rows carry ``caption_present`` (an empty caption is a missing one), as prediction rows do, so the
validation figure of every epoch is computed on the inputs the prediction path would see.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .data import (
    FeatureDataset,
    LengthGroupedBatchSampler,
    PairDataset,
    TextCollate,
    build_transform,
    default_workers,
    fit_loaders,
    make_sampler,
    oversampling_weights,
    single_process,
    train_loader,
)
from .features import frozen_features
from .runtime import caption_given


class CaptionFlags(Dataset):
    """Rows of ``rows`` with ``caption_present``: 1 for a caption given, 0 for an empty one (as in prediction).

    Everything else (``features``, ``image_present``, ``image_source``) is the wrapped data set's.
    """

    def __init__(self, rows: Dataset, captions: list[str]):
        self.rows = rows
        self.caption_present = torch.tensor([float(caption_given(c)) for c in captions])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "caption_present": self.caption_present[i]}

    def __getattr__(self, name):
        if name == "rows":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.rows, name)


def make_loaders(
    config, regime, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir, device, timings=None
):
    """(train loader, validation loader) for the regime: cached features, the device image cache, or photos.

    ``timings`` (a ``tracking.StageTimes``) adds up the seconds the frozen encoders and photo decoding take."""
    sampler = make_sampler(labels[train_idx], config.sampler, config.oversample_power, config.seed)
    val_captions = [records[i].caption for i in val_idx]
    if regime in ("frozen", "hybrid"):
        text = not (regime == "hybrid" and net.text_encoder is not None)  # hybrid: the text encoder trains
        feats, present = frozen_features(
            net, tokenizer, data_config, records, image_dir, config, device=device, text=text, timings=timings
        )
        train, val = _feature_loaders(
            config, regime, net, tokenizer, feats, present, records, labels, train_idx, val_idx, sampler
        )
    else:
        # The device image cache: decode every image once, augment on the device (PIL workers are the bottleneck).
        from .image_cache import cache_supported, cached_loaders

        if cache_supported(config, net):
            train, val = cached_loaders(
                config, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir, device, sampler
            )
        else:
            train, val = _photo_loaders(
                config, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir, device, sampler
            )
    return train, _with_caption_flags(val, val_captions)


def _with_caption_flags(loader: DataLoader, captions: list[str]) -> DataLoader:
    return DataLoader(
        CaptionFlags(loader.dataset, captions),
        batch_size=loader.batch_size,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
    )


def _feature_loaders(config, regime, net, tokenizer, feats, present, records, labels, train_idx, val_idx, sampler):
    # hybrid: only the image side is cached; captions travel with the rows for the text encoder to train on
    text_trains = regime == "hybrid" and net.text_encoder is not None
    captions = [r.caption for r in records] if text_trains else None

    def subset(idx):
        rows_captions = [captions[i] for i in idx] if captions else None
        return FeatureDataset({k: v[idx] for k, v in feats.items()}, labels[idx], present[idx], rows_captions)

    collate = TextCollate(tokenizer if text_trains else None, config.text_max_length)
    train_collate = TextCollate(
        tokenizer if text_trains else None, config.text_max_length, config.word_dropout, config.seed
    )
    train_ds, val_ds = subset(train_idx), subset(val_idx)
    val_loader = DataLoader(val_ds, batch_size=1024 if not text_trains else 256, collate_fn=collate)
    if text_trains and single_process(config):
        lengths = [len(tokenizer.tokenize(c)) for c in train_ds.captions]
        weights = (
            oversampling_weights(labels[train_idx], config.oversample_power) if config.sampler == "oversample" else None
        )
        batches = LengthGroupedBatchSampler(lengths, config.batch_size, config.seed, weights)
        return DataLoader(train_ds, batch_sampler=batches, collate_fn=train_collate), val_loader
    return train_loader(train_ds, config, sampler, train_collate), val_loader


def _photo_loaders(
    config, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir, device, sampler
):
    workers = default_workers(config.num_workers)
    load_images = net.image_encoder is not None
    train_tf = build_transform(data_config, True, config.augment) if load_images else None
    val_tf = build_transform(data_config, False) if load_images else None

    def rows(idx, transform):
        return PairDataset(
            [records[i] for i in idx], image_dir, transform, labels[idx], config.missing_images, load_images
        )

    train_ds, val_ds = rows(train_idx, train_tf), rows(val_idx, val_tf)
    return fit_loaders(config, tokenizer, train_ds, val_ds, workers=workers, device=device, sampler=sampler)
