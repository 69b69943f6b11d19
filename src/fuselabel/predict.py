"""Course-format files in and out: a CSV of rows -> predictions -> submission (and probabilities) CSV.

Rows go through the model in chunks; each finished chunk is saved as a part file, and the
output files are written from the parts at the end, in the CSV's row order and atomically. So
memory stays bounded however many rows there are, and one process or many (``devices > 1``:
Lightning's ``Trainer.predict``, each rank taking every N-th chunk) write byte-identical files.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .cache import atomic_path
from .records import read_records
from .runtime import STATUSES, WINDOW, Prediction
from .writers import atomic_write_text, probability_lines, submission_lines

log = logging.getLogger(__name__)


def load_model(model_dir, **runtime):
    """A PyTorch model folder as a ``FuseLabel``, or an exported ONNX folder as a torch-free predictor."""
    from .runtime import is_onnx_folder

    if is_onnx_folder(model_dir):
        return OnnxModel(model_dir)
    from .estimator import FuseLabel

    return FuseLabel.from_pretrained(model_dir, **runtime)


class OnnxModel:
    """An exported folder behind the same few methods ``predict_csv`` uses of a ``FuseLabel``."""

    def __init__(self, folder):
        from .runtime import load_onnx_predictor

        self._predictor, self.engine = load_onnx_predictor(folder)
        self.tokens = self.engine.labels

    def predictor(self, *, strict: bool = False, device=None):
        self._predictor.strict = strict
        return self._predictor


def _tokens(model) -> list[str]:
    return model.tokens if isinstance(model, OnnxModel) else model.bundle_.labels


def _save_part(folder: Path, index: int, p: Prediction) -> None:
    code = np.asarray([STATUSES.index(s) for s in p.status], dtype=np.int8)
    with atomic_path(folder / f"part-{index:06d}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, probs=p.probs, predicted=p.predicted, status=code)


def _read_parts(folder: Path, n_chunks: int):
    for i in range(n_chunks):
        with np.load(folder / f"part-{i:06d}.npz") as part:
            yield part["probs"], part["predicted"], [STATUSES[c] for c in part["status"]]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def predict_chunk(model, records, image_dir, bounds, *, strict: bool) -> Prediction:
    lo, hi = bounds
    rows = records[lo:hi]
    return model.predictor(strict=strict).predict([r.image_id for r in rows], [r.caption for r in rows],
                                                  image_dir=image_dir,
                                                  row_names=[f"row {r.image_id} (CSV line {r.line})" for r in rows])


def predict_csv(model, image_dir, csv, out, *, proba_out=None, strict: bool = False, chunk_size: int = 512,
                devices: int = 1, num_nodes: int = 1, strategy: str = "auto", accelerator: str = "cpu",
                progress: bool = True) -> dict:
    """Write a Kaggle-style submission (``ImageID,Labels`` in input order); returns counts and timings.

    ``model`` is a ``FuseLabel``, a model folder, or an exported ONNX folder. Rows without a usable
    photo are predicted from their caption and rows with an empty caption from their photo; each is
    counted, and ``--proba`` output has an ``input`` column saying which. A row with neither gets
    no labels and is named in the summary. ``strict=True`` makes any of these an error instead.
    """
    t0 = time.time()
    if isinstance(model, (str, Path)):
        model = load_model(model)
    if chunk_size <= 0 or chunk_size % WINDOW:
        raise ValueError(f"chunk_size must be a positive multiple of {WINDOW}, got {chunk_size}")
    records = read_records(csv).records
    bounds = _chunks(len(records), chunk_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    distributed = devices > 1 or num_nodes > 1
    if distributed:  # every rank computes the same folder name, and no rank needs to be told it
        parts = out.parent / f".{out.name}.parts"
        parts.mkdir(exist_ok=True)
    else:
        parts = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts-", dir=out.parent))
    rank0 = True
    try:
        if distributed:
            rank0 = _predict_distributed(model, records, image_dir, bounds, parts, strict=strict, devices=devices,
                                         num_nodes=num_nodes, strategy=strategy, accelerator=accelerator)
            if not rank0:  # rank 0 writes the outputs, then removes the parts
                return {}
        else:
            from tqdm.auto import tqdm

            bar = tqdm(bounds, desc="predict", unit="chunk", disable=None if progress else True, leave=False)
            for i, b in enumerate(bar):
                _save_part(parts, i, predict_chunk(model, records, image_dir, b, strict=strict))
        summary = _merge(parts, len(bounds), records, _tokens(model), out, proba_out)
    finally:
        if rank0:
            shutil.rmtree(parts, ignore_errors=True)
    elapsed = time.time() - t0
    summary.update(rows=len(records), seconds=elapsed, rows_per_s=len(records) / max(elapsed, 1e-9), out=str(out),
                   engine=model.predictor().engine.name)
    return summary


def _merge(parts: Path, n_chunks: int, records, tokens, out: Path, proba_out) -> dict:
    """The output files from the part files, streamed in row order; counts of each input status."""
    ids = [r.image_id for r in records]
    counts: Counter = Counter()
    no_input: list[str] = []

    def label_rows():
        start = 0
        for _, predicted, status in _read_parts(parts, n_chunks):
            for j, (row, s) in enumerate(zip(predicted, status)):
                counts[s] += 1
                if s == "no_input":
                    no_input.append(ids[start + j])
                yield [tokens[k] for k in np.flatnonzero(row)]
            start += len(status)

    def proba_rows():
        for probs, _, status in _read_parts(parts, n_chunks):
            yield from zip(probs, status)

    atomic_write_text(out, submission_lines(ids, label_rows()))
    if proba_out:
        atomic_write_text(proba_out, probability_lines(ids, tokens, proba_rows()))
    return {"status_counts": {s: counts.get(s, 0) for s in STATUSES}, "no_input_rows": no_input}


def _predict_distributed(model, records, image_dir, bounds, parts: Path, *, strict, devices, num_nodes, strategy,
                         accelerator) -> bool:
    """Chunks shared among Lightning ranks (ddp, SLURM, torchrun); True on the rank that writes the outputs."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    class Chunks(torch.utils.data.Dataset):
        def __len__(self):
            return len(bounds)

        def __getitem__(self, i):
            return i

    class ChunkPredictor(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            # Lightning's sampler pads the last round with repeated chunks; rewriting a part is harmless.
            for i in batch.tolist():
                _save_part(parts, i, predict_chunk(model, records, image_dir, bounds[i], strict=strict))

    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        strategy="ddp" if strategy == "auto" else strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(ChunkPredictor(), DataLoader(Chunks(), batch_size=1), return_predictions=False)
    trainer.strategy.barrier()
    return trainer.is_global_zero


def evaluate_csv(model, image_dir, csv, *, split: str = "all", strict: bool = False) -> dict:
    """Metrics of a model (or model folder) on a labelled CSV, or on the rows of one side of its own split."""
    if isinstance(model, (str, Path)):
        model = load_model(model)
    if isinstance(model, OnnxModel):
        raise ValueError(f"{csv}: evaluate needs the model folder; an exported ONNX folder only predicts")
    return model.evaluate(csv, images=image_dir, split=split, strict=strict)
