#!/usr/bin/env python
"""Probes over frozen features: does a cheap change to the heads move mean F1?

Every probe trains small heads on the feature cache that ``fuselabel train`` fills (EfficientNet-Lite
at 320 px, the whole photo; MiniLM-L6 mean-pooled), on the same seeded validation split as
``fuselabel train --seed SEED``. Each prints the image head's validation mean F1 and that of weighted late
fusion with the frozen text head (image weight tuned on validation, one global threshold), beside the
plain MLP baseline of the same run. A probe that cannot beat the baseline by more than the spread between
seeds (about 0.003 to 0.004) says its idea does not pay on frozen features.

    python benchmarks/probes.py --data DATA --cache-dir CACHE          # every probe
    python benchmarks/probes.py --data DATA --cache-dir CACHE --probe curve lite1

Probes:
  curve     the baseline trained on 25, 50, 75 and 100 % of the training rows: what more data would give
  lite1     EfficientNet-Lite1 at 320 px beside Lite2: probabilities averaged, and features joined
  knn       k nearest training rows (cosine, image + text features), blended into late fusion
  csra      class-specific residual attention (Zhu & Wu 2021) over Lite2's 10 x 10 map
  imagenet  Lite2's own ImageNet classifier applied at every cell of that map, max-pooled into 1,000
            "is there a ... anywhere" scores joined to the pooled features

A probe's features come through the cache, so the first run extracts them (Lite1: about 5 minutes on two
cores; the token map of Lite2: about 6). With them cached, all probes take about 11 minutes, csra half of that.
Ends with one
`PROBE name: image ... late ...` line per result.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from fuselabel.config import build_config
from fuselabel.data import stratified_split
from fuselabel.encoders import create_tokenizer, image_data_config, packaged_weights_path
from fuselabel.features import frozen_features
from fuselabel.heads import mlp
from fuselabel.labels import label_vocabulary, labels_to_matrix
from fuselabel.network import FuseLabelNet
from fuselabel.records import read_records, resolve_data
from fuselabel.thresholds import tune_global

PROBES = ("curve", "lite1", "knn", "csra", "imagenet")


class Study:
    """Labels, split and scoring shared by the probes."""

    def __init__(self, labels: np.ndarray, seed: int, val_fraction: float):
        self.y = labels.astype(np.float32)
        self.train, self.val = stratified_split(labels, val_fraction, seed)
        self.lines: list[str] = []

    def f1(self, probs: np.ndarray) -> float:
        return float(tune_global(self.y[self.val].astype(np.uint8), probs)[1])

    def late(self, p_image: np.ndarray, p_text: np.ndarray) -> tuple[float, float]:
        """Best validation mean F1 of the weighted average over image weights 0, 0.05, ..., 1."""
        return max((self.f1(w * p_image + (1 - w) * p_text), round(float(w), 2)) for w in np.arange(0, 1.001, 0.05))

    def report(self, name: str, p_image: np.ndarray, p_text: np.ndarray, note: str = "") -> None:
        late, weight = self.late(p_image, p_text)
        line = f"PROBE {name}: image {self.f1(p_image):.4f}  late {late:.4f} (image weight {weight}){note}"
        print(line, flush=True)
        self.lines.append(line)

    def fit(self, make_net, inputs, train_idx=None, epochs=40, lr=1e-3, batch=256, seed=0) -> np.ndarray:
        """Validation probabilities of the best epoch (the same rule as the product's checkpointing).

        ``inputs(idx)`` gives a batch of the net's input for rows ``idx``; AdamW, one-cycle schedule, BCE.
        """
        torch.manual_seed(seed)
        net = make_net()
        train_idx = self.train if train_idx is None else train_idx
        steps = len(train_idx) // batch
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.05)
        y = torch.as_tensor(self.y)
        rng = np.random.default_rng(seed)
        best, best_probs = -1.0, None
        for _ in range(epochs):
            net.train()
            order = rng.permutation(train_idx)
            for i in range(steps):
                rows = order[i * batch : (i + 1) * batch]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(inputs(rows)), y[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            net.eval()
            with torch.no_grad():
                probs = torch.cat(
                    [torch.sigmoid(net(inputs(self.val[i : i + 512]))) for i in range(0, len(self.val), 512)]
                ).numpy()
            score = self.f1(probs)
            if score > best:
                best, best_probs = score, probs
        return best_probs

    def fit_mlp(self, x: np.ndarray, **kw) -> np.ndarray:
        x = torch.as_tensor(x, dtype=torch.float32)
        return self.fit(lambda: mlp(x.shape[1], 512, self.y.shape[1], 0.3), lambda rows: x[rows], **kw)


def features(records, images, cache_dir, num_labels, **settings) -> tuple[dict, FuseLabelNet]:
    """Features of the ``cpu`` preset changed by ``settings``, through the cache ``fuselabel train`` fills."""
    config = build_config("cpu", cache_dir=cache_dir, **settings)
    tokenizer = create_tokenizer(config.text_model) if config.uses_text else None
    net = FuseLabelNet(config, num_labels, vocab_size=len(tokenizer) if tokenizer is not None else None)
    data_config = (
        image_data_config(net.image_encoder.backbone, config.image_size, config.image_crop_pct)
        if net.image_encoder is not None
        else None
    )
    feats, _ = frozen_features(net, tokenizer, data_config, records, images, config, progress=False)
    return feats, net


class CSRA(torch.nn.Module):
    """Zhu & Wu 2021: the pooled MLP plus, per label, attention over the cells' own class scores."""

    def __init__(self, channels: int, labels: int, lam: float = 0.3):
        super().__init__()
        self.lam = lam
        self.pooled = mlp(channels, 512, labels, 0.3)
        self.cells = torch.nn.Sequential(
            torch.nn.Conv1d(channels, 256, 1), torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Conv1d(256, labels, 1)
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # maps (B, C, cells)
        scores = self.cells(maps)
        return self.pooled(maps.mean(2)) + self.lam * (torch.softmax(scores, 2) * scores).sum(2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder, or a folder with data/ and the CSV")
    ap.add_argument("--csv")
    ap.add_argument("--cache-dir")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--probe", nargs="+", choices=PROBES, default=list(PROBES))
    args = ap.parse_args(argv)

    images, csv = resolve_data(args.data, args.csv)
    records = read_records(csv)
    labels = labels_to_matrix(records.label_sets, label_vocabulary(records.label_sets))
    study = Study(labels, args.seed, args.val_fraction)
    t0 = time.time()
    base, _ = features(records.records, images, args.cache_dir, labels.shape[1])
    image, text = base["image"], base["text"]
    p_image, p_text = study.fit_mlp(image), study.fit_mlp(text)
    print(f"{len(records)} rows; train {len(study.train)}, val {len(study.val)}; text head {study.f1(p_text):.4f}")
    study.report("baseline (Lite2 320 px, MLP heads)", p_image, p_text)

    if "curve" in args.probe:
        order = np.random.default_rng(0).permutation(study.train)
        for share in (0.25, 0.5, 0.75):
            rows = np.sort(order[: int(share * len(order))])
            study.report(
                f"curve {share:.0%} of training rows ({len(rows)})",
                study.fit_mlp(image, train_idx=rows),
                study.fit_mlp(text, train_idx=rows),
            )

    if "lite1" in args.probe:
        lite1, _ = features(
            records.records, images, args.cache_dir, labels.shape[1], image_model="tf_efficientnet_lite1", kind="image"
        )
        p_lite1 = study.fit_mlp(lite1["image"])
        study.report("lite1 alone", p_lite1, p_text)
        study.report("lite1 + lite2, probabilities averaged", (p_lite1 + p_image) / 2, p_text)
        study.report("lite1 + lite2, features joined", study.fit_mlp(np.hstack([lite1["image"], image])), p_text)

    if "knn" in args.probe:

        def unit(x):
            x = x - x[study.train].mean(0)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        joined = torch.as_tensor(np.hstack([unit(image), unit(text)]) / np.sqrt(2), dtype=torch.float32)
        sims, rows = (joined[study.val] @ joined[study.train].T).topk(30, dim=1)
        weights = torch.softmax(sims / 0.05, 1).numpy()
        p_knn = (weights[..., None] * study.y[study.train][rows.numpy()]).sum(1)
        _, w = study.late(p_image, p_text)
        fused = w * p_image + (1 - w) * p_text
        for share in (0.1, 0.2, 0.3):
            blended = study.f1(share * p_knn + (1 - share) * fused)
            line = f"PROBE knn (30 rows) blended {share:.0%} into late fusion: {blended:.4f}"
            print(line, flush=True)
            study.lines.append(line)

    if {"csra", "imagenet"} & set(args.probe):
        grid, net = features(records.records, images, args.cache_dir, labels.shape[1], image_tokens=True, kind="image")
        encoder = net.image_encoder
        _, tokens = encoder.split(torch.as_tensor(grid["image"]))  # (N, cells, C) before conv_head
        c, h, w = encoder.token_shape
        backbone = encoder.backbone.eval()
        with torch.no_grad():  # the frozen last 1x1 convolution, as the encoder applies it before pooling
            maps = torch.cat(
                [
                    backbone.bn2(backbone.conv_head(tokens[i : i + 500].transpose(1, 2).reshape(-1, c, h, w)))
                    .flatten(2)
                    .half()
                    for i in range(0, len(tokens), 500)
                ]
            )
        del grid, tokens

    if "csra" in args.probe:
        p_csra = study.fit(
            lambda: CSRA(maps.shape[1], study.y.shape[1]), lambda rows: maps[rows].float(), epochs=15, batch=128
        )
        study.report("csra over the 10 x 10 map (15 epochs)", p_csra, p_text)

    if "imagenet" in args.probe:
        state = torch.load(
            packaged_weights_path(build_config("cpu").image_model), map_location="cpu", weights_only=True
        )
        weight, bias = state["_fc.weight"].float(), state["_fc.bias"].float()
        with torch.no_grad():
            anywhere = torch.cat(
                [
                    (torch.einsum("kc,bcl->bkl", weight, maps[i : i + 500].float()) + bias[:, None]).amax(2)
                    for i in range(0, len(maps), 500)
                ]
            ).numpy()
        study.report(
            "imagenet classes max-pooled over cells, joined to pooled features",
            study.fit_mlp(np.hstack([image, anywhere])),
            p_text,
        )

    print(f"\nprobes took {time.time() - t0:.0f} s")
    for line in study.lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
