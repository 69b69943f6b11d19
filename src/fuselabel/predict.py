"""Course-format files in and out: a CSV of rows -> predictions -> submission (and probabilities) CSV.

The table is read a batch at a time (:mod:`fuselabel.predict_rows`): once to check, count and hash its rows,
then in chunks that go through the model; each finished chunk is saved as a part file with its rows' ids, and the
output files are written from the parts at the end, in the table's row order and atomically. So memory stays
bounded however many rows there are, and one process or many (``devices > 1``: Lightning's ``Trainer.predict``,
each rank taking every N-th chunk) write byte-identical files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import writers
from .encoding import WINDOW, progress_bar
from .estimator import FuseLabel
from .images import ImageError
from .predict_rows import ChunkCursor, TableScan, scan_table
from .records import RecordSet
from .runtime import STATUSES, Prediction
from .tables import Columns
from .writers import (
    atomic_path,
    atomic_write_text,
    fsync_dir,
    output_format,
    probability_lines,
    submission_lines,
    table_prediction_lines,
    table_probability_lines,
    write_atomic,
    write_table_lines,
)

log = logging.getLogger(__name__)


def _save_part(folder: Path, index: int, chunk: RecordSet, p: Prediction) -> None:
    code = np.asarray([STATUSES.index(s) for s in p.status], dtype=np.int8)
    ids = np.asarray([r.id for r in chunk.records], dtype=str)  # the merge writes them: the table is not read again
    with atomic_path(folder / f"part-{index:06d}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=ids, probs=p.probs, predicted=p.predicted, status=code, texts_cut=np.int64(p.texts_cut))


def _read_parts(folder: Path, n_chunks: int):
    for i in range(n_chunks):
        with np.load(folder / f"part-{i:06d}.npz") as part:
            status = [STATUSES[c] for c in part["status"]]
            yield part["ids"].tolist(), part["probs"], part["predicted"], status, int(part["texts_cut"])


class _PartIds:
    """The rows' ids as the writers take them (a length, and the ids in row order), read from the parts as the
    writers go: never all in memory."""

    def __init__(self, parts: Path, n_chunks: int, rows: int) -> None:
        self.parts, self.n_chunks, self.rows = parts, n_chunks, rows

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        for i in range(self.n_chunks):
            with np.load(self.parts / f"part-{i:06d}.npz") as part:
                yield from part["ids"].tolist()


def _chunk_rows(rows: int, chunk_size: int) -> list[int]:
    """How many rows each chunk holds."""
    return [min(chunk_size, rows - lo) for lo in range(0, rows, chunk_size)]


def predict_chunk(model, chunk: RecordSet, image_dir, *, strict: bool) -> Prediction:
    """One chunk of rows; a row with an empty photo cell has no photo."""
    rows = chunk.records
    return model.predictor(strict=strict).predict(
        [r.image_id or None for r in rows],
        [r.caption for r in rows],
        image_dir=image_dir,
        row_names=[chunk.row_name(r) for r in rows],
        read_captions=False,
    )


def predict_csv(
    model,
    image_dir,
    csv,
    out,
    *,
    proba_out=None,
    strict: bool = False,
    chunk_size: int = 512,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accelerator: str = "cpu",
    progress: bool = True,
    columns: Columns | None = None,
    reader: dict | None = None,
) -> dict:
    """Write the predictions of a table's rows, in input order; returns counts and timings.

    ``csv`` is any table ``fuselabel.tables.read_table`` reads (``columns`` says which column is which;
    by default the model's training columns, then the course names). The output has the table's id
    column and the model's label column, labels spelled and separated as in its training table; its
    format follows ``out``'s suffix (``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``). A course-format table
    predicted by a model trained on course-format data gives Kaggle's ``ImageID,Labels``. ``reader``: the
    reader's options (``delimiter``, ``sheet``). The table is read a batch at a time, and a table with a bad row
    (malformed, duplicate id) is refused, its rows named, before anything is predicted.

    ``model`` is a ``FuseLabel`` or the path of a model folder or exported ONNX folder. A row without a usable
    photo is predicted from its caption, one with an empty caption from its photo, each counted and flagged in
    ``--proba``'s ``input`` column; a row with neither gets no labels and is named. ``strict=True``: errors.
    """
    t0 = time.time()
    if isinstance(model, (str, Path)):
        model = FuseLabel.from_pretrained(model)
    if chunk_size <= 0 or chunk_size % WINDOW:
        raise ValueError(f"chunk_size must be a positive multiple of {WINDOW}, got {chunk_size}")
    reading = {"columns": columns, "trained": model.bundle_.table, **(reader or {})}
    scan = scan_table(csv, **reading)
    sizes = _chunk_rows(scan.rows, chunk_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    distributed = devices > 1 or num_nodes > 1
    parts = _parts_folder(model, scan.digest, out, chunk_size, strict)
    if not distributed or _is_rank_zero():
        _finish_publish(parts)  # a kill between the renames of an earlier run: complete them first
    done = _finished_chunks(parts, sizes)
    ranks = (
        dict(devices=devices, num_nodes=num_nodes, strategy=strategy, accelerator=accelerator) if distributed else {}
    )
    chunks = ChunkCursor(csv, chunk_size, **reading)
    if not _predict_chunks(model, chunks, image_dir, len(sizes), parts, done, ranks, strict=strict, progress=progress):
        return {}  # rank 0 writes the outputs, then removes the parts
    summary = _merge(parts, sizes, scan, model.bundle_.labels, model.bundle_.table, out, proba_out)
    _remove_leftovers(out, proba_out)  # this run's parts and any earlier run's, and killed writes' temporaries
    elapsed, engine = time.time() - t0, model.predictor().engine.name
    rate = scan.rows / max(elapsed, 1e-9)
    summary.update(
        resumed_chunks=len(done), rows=scan.rows, seconds=elapsed, rows_per_s=rate, out=str(out), engine=engine
    )
    return summary


def _parts_folder(model, rows_digest: str, out: Path, chunk_size: int, strict: bool) -> Path:
    """Where finished chunks are kept: every rank, and a rerun after a kill, computes the same folder from what
    the parts depend on (a model held only in memory gets a folder of its own)."""
    key = parts_key(model, rows_digest, chunk_size, strict)
    parts = (
        out.parent / f".{out.name}.parts-{key}"
        if key
        else Path(tempfile.mkdtemp(prefix=f".{out.name}.parts-", dir=out.parent))
    )
    parts.mkdir(exist_ok=True)
    return parts


def _finished_chunks(parts: Path, sizes: list[int]) -> set[int]:
    done = {i for i, n in enumerate(sizes) if _part_ok(parts, i, n)}
    if done:
        log.info(
            f"resuming: {len(done)} of {len(sizes)} chunks were already predicted by an earlier run "
            f"({parts.name}); predicting the other {len(sizes) - len(done)}"
        )
    return done


def _predict_chunks(model, chunks: ChunkCursor, image_dir, n_chunks, parts, done, ranks: dict, **how) -> bool:
    """The chunks not yet done, in this process or shared among ``ranks`` (Lightning's settings; none: here);
    True where the outputs are to be written."""
    if ranks:
        return _predict_distributed(model, chunks, image_dir, n_chunks, parts, strict=how["strict"], done=done, **ranks)
    _predict_here(model, chunks.read(), image_dir, n_chunks, parts, done, **how)
    return True


def _predict_here(model, chunks, image_dir, n_chunks: int, parts: Path, done: set, *, strict, progress) -> None:
    """The chunks not yet done, in this process, each saved as its part file when finished."""
    bar = progress_bar(n_chunks, "predict", "chunk", progress, initial=len(done))
    try:
        for i, chunk in enumerate(chunks):
            if i in done:
                continue
            _save_part(parts, i, chunk, predict_chunk(model, chunk, image_dir, strict=strict))
            writers.reached("predict-chunk")
            bar.update(1)
    except (ValueError, ImageError):
        # Bad input (--strict): a rerun on the same rows stops at the same row, so nothing is kept for it.
        # A kill, a full disk or Ctrl-C keeps the finished chunks for the rerun.
        shutil.rmtree(parts, ignore_errors=True)
        raise
    finally:
        bar.close()


def parts_key(model, rows_digest: str, chunk_size: int, strict: bool) -> str | None:
    """What finished parts depend on: the model's files, the rows (``TableScan.digest``), the chunk size and
    strictness (None: a model held only in memory, whose parts cannot be recognised by a later run)."""
    digest = hashlib.sha256()
    folder = model.bundle_.path
    if folder is None:
        return None
    folder = Path(folder)
    for name in ("sha256.json", "manifest.json", "model.safetensors", "thresholds.json"):
        path = folder / name
        if path.is_file():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            if name.endswith(".json"):
                digest.update(path.read_bytes())
    digest.update(str(folder.resolve()).encode())
    digest.update(f"{rows_digest}:{chunk_size}:{strict}".encode())
    return digest.hexdigest()[:16]


def _part_ok(parts: Path, index: int, rows: int) -> bool:
    """A finished part: it opens and holds its chunk's rows (a part is written atomically, so this is a check
    against files damaged later, not half-written ones)."""
    path = parts / f"part-{index:06d}.npz"
    if not path.is_file():
        return False
    try:
        with np.load(path) as part:
            return "ids" in part.files and all(len(part[k]) == rows for k in ("ids", "status", "probs"))
    except Exception:  # zipfile, numpy and OS errors alike: the part is computed again
        path.unlink(missing_ok=True)
        return False


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0


def _merge(parts: Path, sizes: list[int], scan: TableScan, tokens, trained: dict, out: Path, proba_out) -> dict:
    """The output files from the part files, streamed in row order; counts of each input status."""
    ids = _PartIds(parts, len(sizes), scan.rows)
    counts: Counter = Counter()
    no_input: list[str] = []
    texts_cut = 0

    def label_rows():
        nonlocal texts_cut
        for chunk_ids, _, predicted, status, cut in _read_parts(parts, len(sizes)):
            texts_cut += cut
            for row_id, row, s in zip(chunk_ids, predicted, status):
                counts[s] += 1
                if s == "no_input":
                    no_input.append(row_id)
                yield [tokens[k] for k in np.flatnonzero(row)]

    def proba_rows():
        for _, probs, _, status, _ in _read_parts(parts, len(sizes)):
            yield from zip(probs, status)

    course = scan.table.get("format") == "course" and trained.get("format") in (None, "course")
    staged = []  # (temporary, final): both outputs are written whole first, then renamed together

    def write(final, course_lines, table_lines):
        tmp, fmt = _stage(parts, final), output_format(final)
        if course and fmt == "csv":  # the course's own layout (Kaggle's ImageID,Labels for the submission)
            atomic_write_text(tmp, course_lines())
        else:
            write_table_lines(tmp, fmt, table_lines(fmt))
        staged.append((tmp, Path(final)))

    id_col = scan.table.get("id_col") or "ImageID"
    try:
        write(
            out,
            lambda: submission_lines(ids, label_rows()),
            lambda fmt: table_prediction_lines(
                fmt,
                ids,
                label_rows(),
                id_col=id_col,
                label_col=trained.get("label_col") or "Labels",
                label_sep=trained.get("label_sep") or " ",
            ),
        )
        if proba_out:
            write(
                proba_out,
                lambda: probability_lines(ids, tokens, proba_rows()),
                lambda fmt: table_probability_lines(fmt, ids, tokens, proba_rows(), id_col=id_col),
            )
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    _publish(parts, staged)
    return {"status_counts": {s: counts.get(s, 0) for s in STATUSES}, "no_input_rows": no_input, "texts_cut": texts_cut}


# ---- publishing the outputs together: both files change, or (after a kill, until the next run) neither ----

JOURNAL = "publish.json"


def _stage(parts: Path, final) -> Path:
    """Where an output is written before publishing: beside it (so the rename stays on one file system)."""
    final = Path(final)
    return final.parent / f".{final.name}.{parts.name[-16:]}.staged"


def _publish(parts: Path, staged: list[tuple[Path, Path]]) -> None:
    """Rename the staged outputs onto their names. The journal, written first and removed last, lets the next
    run complete renames a kill interrupted (roll forward), so the outputs never stay a mix of two runs."""
    journal = parts / JOURNAL
    write_atomic(journal, json.dumps([[str(t), str(f)] for t, f in staged]).encode())
    writers.reached("predict-publish")
    _finish_publish(parts)


def _finish_publish(parts: Path) -> None:
    journal = parts / JOURNAL
    if not journal.is_file():
        return
    pairs = json.loads(journal.read_text())
    for tmp, final in pairs:
        if Path(tmp).exists():
            os.replace(tmp, final)
            writers.reached("predict-rename")
    for folder in {Path(final).parent for _, final in pairs}:
        fsync_dir(folder)
    journal.unlink()


def _remove_leftovers(out: Path, proba_out) -> None:
    """Parts folders and staged or temporary files that runs writing these outputs left behind (a run that was
    killed, or one over other rows); only names this module and the atomic writers make are touched."""
    for target in [Path(out)] + ([Path(proba_out)] if proba_out else []):
        folder = target.parent
        for path in folder.glob(f".{glob.escape(target.name)}.*"):
            if path.is_dir() and path.name.startswith(f".{target.name}.parts-"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file() and (path.name.endswith(".staged") or path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)


def _predict_distributed(
    model,
    cursor: ChunkCursor,
    image_dir,
    n_chunks: int,
    parts: Path,
    *,
    strict,
    devices,
    num_nodes,
    strategy,
    accelerator,
    done=frozenset(),
) -> bool:
    """Chunks shared among Lightning ranks (ddp, SLURM, torchrun); True on the rank that writes the outputs."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    class Chunks(torch.utils.data.Dataset):
        def __len__(self):
            return n_chunks

        def __getitem__(self, i):
            return i

    class ChunkPredictor(L.LightningModule):
        def on_predict_start(self):
            model.place_on(self.device)  # this rank's device, known only now that Lightning has assigned it

        def predict_step(self, batch, batch_idx):
            # A rank is handed its chunks in increasing order, so it reads the table forward once; a chunk handed
            # twice (a sampler's padding) is read again and rewritten, which is harmless.
            for i in batch.tolist():
                if i not in done:
                    chunk = cursor.get(i)
                    _save_part(parts, i, chunk, predict_chunk(model, chunk, image_dir, strict=strict))

    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if strategy == "auto" else strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(ChunkPredictor(), DataLoader(Chunks(), batch_size=1), return_predictions=False)
    trainer.strategy.barrier()
    return trainer.is_global_zero


def evaluate_csv(
    model, image_dir, csv, *, split: str = "all", strict: bool = False, columns: Columns | None = None
) -> dict:
    """Metrics of a model (or model folder) on a labelled table, or on the rows of one side of its own split."""
    if isinstance(model, (str, Path)):
        model = FuseLabel.from_pretrained(model)
    return model.evaluate(csv, images=image_dir, split=split, strict=strict, **(columns or Columns()).keywords())
