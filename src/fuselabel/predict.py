"""The prediction flow: model folder + CSV + images -> probabilities -> label sets -> submission CSV.

Encoders run once over all rows (images through onnxruntime on a CPU when available), then
the small head runs on the pooled features; fine-tuned and frozen models take the same path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .bundle import Bundle, load_bundle
from .features import extract_image_features, extract_text_features
from .heads import combine_probabilities
from .metrics import evaluate as evaluate_sets
from .records import labels_to_matrix, matrix_to_labels, read_records, write_probabilities, write_submission
from .thresholds import apply_thresholds


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.inference_mode()
def predict_proba(bundle: Bundle, records, image_dir, *, engine: str = "auto", device: str | None = None,
                  batch_size: int | None = None, missing_images: str | None = None, num_workers: int | None = None,
                  progress: bool = True) -> np.ndarray:
    """Fused probabilities (n, labels) in the model folder's label order."""
    cfg = bundle.config
    dev = _device(device)
    # Small batches suit onnxruntime on a few CPU cores (measured: 16 beats 64 by ~10 %); a GPU wants large ones.
    batch_size = batch_size or (16 if dev.type == "cpu" else 256)
    net = bundle.net.eval()
    feats, present = {}, None
    if net.image_encoder is not None:
        feats["image"], present = extract_image_features(
            net.image_encoder, bundle.preprocessing, records, image_dir, batch_size=batch_size,
            num_workers=num_workers, flip_tta=cfg.tta_flip, missing_images=missing_images or cfg.missing_images,
            engine=engine, device=dev, cache_dir=cfg.cache_dir, progress=progress, gpu_decode=cfg.gpu_decode)
    if net.text_encoder is not None:
        feats["text"] = extract_text_features(net.text_encoder, bundle.tokenizer, [r.caption for r in records],
                                              max_length=cfg.text_max_length, device=dev, engine=engine,
                                              cache_dir=cfg.cache_dir, progress=progress)
    net = net.to(dev)
    batch = {f"{k}_feat": torch.as_tensor(v, device=dev) for k, v in feats.items()}
    if present is not None:
        batch["image_present"] = torch.as_tensor(present, device=dev)
    logits = net.head(net.encode(batch))
    parts = {k: torch.sigmoid(v.float()) for k, v in logits.items()}
    probs = combine_probabilities(parts, cfg.late_combine, net.late_weight, batch.get("image_present"))
    return probs.cpu().numpy()


def decide(bundle: Bundle, probs: np.ndarray) -> np.ndarray:
    return apply_thresholds(probs, bundle.threshold_vector, bundle.thresholds.get("ensure_nonempty", True))


def predict(model_dir, data_dir, csv, out, *, proba_out=None, engine="auto", device=None, batch_size=None,
            missing_images=None, num_workers=None, progress=True) -> dict:
    """Write a Kaggle-style submission (``ImageID,Labels`` in input order); returns timings and counts."""
    t0 = time.time()
    bundle = load_bundle(model_dir)
    records = read_records(csv)
    t1 = time.time()
    probs = predict_proba(bundle, records.records, data_dir, engine=engine, device=device, batch_size=batch_size,
                          missing_images=missing_images, num_workers=num_workers, progress=progress)
    pred = decide(bundle, probs)
    ids = records.image_ids
    write_submission(out, ids, matrix_to_labels(pred, bundle.labels))
    if proba_out:
        write_probabilities(proba_out, ids, bundle.labels, probs)
    elapsed = time.time() - t1
    return {"rows": len(ids), "seconds": elapsed, "rows_per_s": len(ids) / max(elapsed, 1e-9),
            "load_s": t1 - t0, "out": str(out)}


def select_split(model_dir, records: list, split: str) -> list:
    """The rows of one side of the model's own train/validation split (``all`` keeps every row)."""
    if split == "all":
        return records
    path = Path(model_dir) / "split.json"
    if not path.exists():
        raise ValueError(f"{model_dir}: no split.json, so --split {split} cannot be applied")
    ids = set(json.loads(path.read_text())[f"{split}_ids"])
    chosen = [r for r in records if r.image_id in ids]
    if not chosen:
        raise ValueError(f"none of the CSV's rows are on the {split} side of {path}")
    return chosen


def evaluate(model_dir, data_dir, csv, *, split="all", engine="auto", device=None, batch_size=None,
             missing_images=None, num_workers=None, progress=True) -> dict:
    """Metrics of a model folder on a labelled CSV (or on the rows of one side of its own split)."""
    bundle = load_bundle(model_dir)
    records = read_records(csv)
    if not records.labelled:
        raise ValueError(f"{csv}: evaluate needs a Labels column (header ImageID,Labels,Caption)")
    rows = select_split(model_dir, records.records, split)
    probs = predict_proba(bundle, rows, data_dir, engine=engine, device=device, batch_size=batch_size,
                          missing_images=missing_images, num_workers=num_workers, progress=progress)
    truth = labels_to_matrix([r.labels for r in rows], bundle.labels)
    report = evaluate_sets(truth, decide(bundle, probs), bundle.labels, bundle.label_names)
    report["model_dir"] = str(model_dir)
    report["csv"] = str(csv)
    report["split"] = split
    return report
