"""The training flow: CSV -> split -> (cached features | raw batches) -> Lightning -> thresholds -> model folder."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from .bundle import Bundle, save_bundle
from .cache import pause_for_test, write_atomic
from .config import Config, resolve_auto
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
    stratified_split,
    training_loader,
)
from .encoders import choose_text_length, create_tokenizer, image_data_config, text_length_limit, token_counts
from .features import frozen_features
from .labels import find_label_names, label_vocabulary, labels_to_matrix
from .losses import class_weight_from_labels, pos_weight_from_labels
from .metrics import evaluate, format_report
from .module import FuseLabelModule
from .network import FuseLabelNet
from .records import RecordSet
from .runtime import decide
from .tables import Columns, read_table, require_labels, table_spelling
from .thresholds import argmax_rule, tune, tune_global
from .writers import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model_dir: Path
    size_bytes: int
    report: dict
    thresholds: dict
    timings: dict
    val_parts: dict  # per-head validation probabilities, for studies
    val_labels: np.ndarray
    history: list = field(default_factory=list)  # [{epoch, seconds since start, val_f1}]
    summary: str = ""  # the run in one line: validation figure, folder size, time
    val_probs: np.ndarray | None = None  # fused validation probabilities, as the stored model predicts them


def label_names_for(records: RecordSet, data_dir, explicit) -> dict[str, str]:
    """The label names: given, or a names file beside the table or in the data folder. Said once when the
    labels are bare ids and no names were found, since every table, report and page then shows numbers."""
    folders = [
        Path(records.path).parent if records.table.get("format") != "dataframe" else None,
        Path(data_dir),
        Path(data_dir).parent,
    ]
    names, found = find_label_names(explicit, folders)
    vocab = label_vocabulary(records.label_sets)
    if found is not None:
        log.info(f"label names from {found}")
    elif not names and vocab and all(t.lstrip("+-").isdigit() for t in vocab):
        log.info(
            "the labels are numbers and no names file was found (label_names.csv beside the table or in "
            "the data folder); pass --label-names FILE to show names in reports and the service"
        )
    return names


def choose_split(records: RecordSet, val: RecordSet | None, config: Config, labels_of) -> tuple:
    """(rows, train indices, validation indices, how): the user's validation table, the table's split column,
    or a multilabel-stratified share of the rows (``val_fraction``, seeded)."""
    if val is not None:
        ids = {r.id for r in records.records}
        shared = [r.id for r in val.records if r.id in ids]
        if shared:
            raise ValueError(
                f"{val.path}: {len(shared)} validation row id(s) are also training rows (first: "
                f"{shared[0]!r}); a row may be on one side only"
            )
        rows = RecordSet(records.path, records.records + val.records, labelled=True, table=records.table)
        n = len(records)
        return rows, np.arange(n), np.arange(n, n + len(val)), "val_table"
    if records.table.get("split_col"):
        test = sum(r.split == "test" for r in records.records)
        kept = [r for r in records.records if r.split in ("train", "val")]
        rows = RecordSet(records.path, kept, labelled=True, table=records.table)
        train_idx = np.asarray([i for i, r in enumerate(kept) if r.split == "train"], dtype=np.int64)
        val_idx = np.asarray([i for i, r in enumerate(kept) if r.split == "val"], dtype=np.int64)
        column = records.table["split_col"]
        if not len(train_idx) or not len(val_idx):
            raise ValueError(
                f"{records.path}: the split column {column!r} has {len(train_idx)} train and "
                f"{len(val_idx)} val rows; training needs both"
            )
        if test:
            log.info(f"{test} rows marked test in {column!r} are left out of training")
        return rows, train_idx, val_idx, "split_column"
    train_idx, val_idx = stratified_split(labels_of(records), config.val_fraction, config.seed)
    return records, train_idx, val_idx, "random"


def calibrate(
    bundle: Bundle,
    config: Config,
    rows,
    val_labels: np.ndarray,
    device,
    *,
    features=None,
    image_present=None,
    image_dir=None,
):
    """The late-fusion weight and the thresholds, tuned on what the stored model predicts for the validation rows.

    ``bundle`` holds the weights as they will be stored (rounded to ``save_dtype``), and the rows go through
    ``runtime.Predictor``, the one prediction path: so the figure the folder records is the one ``evaluate``
    gives. Frozen rows come with their cached ``features`` (the frozen encoders were rounded before those were
    computed); other rows run through the encoders. Returns (fused probabilities, the Prediction, fusion info).
    """
    from .engines import engine_for_bundle
    from .runtime import Prediction, Predictor, caption_given, fuse

    engine = engine_for_bundle(
        bundle,
        engine="torch" if features is not None else config.feature_engine,
        device=device,
        cache_dir=config.cache_dir,
    )
    predictor = Predictor(
        engine,
        bundle.labels,
        np.full(len(bundle.labels), 0.5, np.float32),
        config.ensure_nonempty,
        workers=config.num_workers,
    )
    if features is not None:
        p = predictor.predict_features(
            {f"{k}_feat": v for k, v in features.items()},
            np.asarray(image_present) > 0.5,
            [caption_given(r.caption) for r in rows],
        )
    else:
        chunks = list(predictor.iter_predict(((r.image_id or None, r.caption) for r in rows), image_dir=image_dir))
        p = Prediction.concat(chunks)
    known = ~np.isnan(p.probs).any(axis=1)  # rows with neither input get no labels, whatever is tuned

    def fused(weight: float) -> np.ndarray:
        return fuse(p.parts, config.late_combine, weight, p.image_present, p.caption_present)

    def score(probs: np.ndarray) -> float:
        if config.task == "multiclass":
            return argmax_rule(val_labels[known], probs[known])["val_mean_f1"]
        return tune_global(val_labels[known], probs[known], config.ensure_nonempty)[1]

    # The weight is stored in fp16 like every weight, so the candidates are fp16 values too.
    if config.kind == "late" and config.late_combine == "weighted" and config.late_weight is None:
        scores = {
            float(np.float16(w)): score(fused(float(np.float16(w)))) for w in np.round(np.arange(0.0, 1.0001, 0.05), 2)
        }
        weight = max(scores, key=scores.get)
        info = {"late_weight": weight, "late_weight_scores": {str(k): v for k, v in scores.items()}}
    else:
        weight = float(np.float16(config.late_weight if config.late_weight is not None else 0.5))
        info = {"late_weight": weight}
    return fused(weight), p, info, known


def round_like_saved(module: torch.nn.Module, dtype: str) -> None:
    """Give ``module`` the weights saving it as ``dtype`` and loading it back would: what predictions will use."""
    from .bundle import stored_state

    current = module.state_dict()
    module.load_state_dict({k: v.to(current[k].dtype) for k, v in stored_state(module, dtype).items()})


def tune_thresholds(config: Config, labels: np.ndarray, probs: np.ndarray) -> dict:
    """All three rules tuned on validation rows; the configured one is what predict uses.

    A multiclass model tunes nothing: its rule is the arg-max label (``method: "argmax"``).
    """
    if config.task == "multiclass":
        return {**argmax_rule(labels, probs), "ensure_nonempty": True, "alternatives": {}}
    results = {m: tune(m, labels, probs, config.ensure_nonempty) for m in ("global", "per_class", "balanced")}
    chosen = dict(results[config.threshold_method])
    chosen["ensure_nonempty"] = config.ensure_nonempty
    chosen["alternatives"] = {
        m: {"val_mean_f1": r["val_mean_f1"], "thresholds": r["thresholds"]} for m, r in results.items()
    }
    return chosen


def check_task_labels(config: Config, records) -> None:
    """Multiclass training needs exactly one label on every row: refused, naming the first row that has not."""
    if config.task != "multiclass":
        return
    bad = [i for i, s in enumerate(records.label_sets) if len(s) != 1]
    if bad:
        r, got = records.records[bad[0]], records.label_sets[bad[0]]
        what = "no label" if not got else f"{len(got)} labels ({' '.join(got)})"
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise ValueError(
            f"{records.path}: row {r.id} (line {r.line}) has {what}{more}; task=multiclass "
            "needs exactly one label on every row: fix the rows, or train with task=multilabel"
        )


def resolve_text_length(config: Config, tokenizer, net, captions: list[str]) -> tuple[Config, dict]:
    """The text length to train and predict with, and how many ``captions`` it cuts.

    ``text_max_length`` None: the 99th percentile of the captions' token counts (special tokens
    included), rounded up to a multiple of 16, at least 16, at most what the encoder takes. A value
    given is kept, unless the encoder cannot take it.
    """
    if tokenizer is None or net.text_encoder is None:
        return config, {}
    limit = text_length_limit(tokenizer, net.text_encoder.backbone.config)
    counts = token_counts(tokenizer, captions)
    if config.text_max_length is None:
        length, how = choose_text_length(counts, limit), "99th percentile of the training captions"
        if length == limit and counts.size and np.percentile(counts, 99) > limit:
            how += f", capped at the encoder's {limit}"
    elif config.text_max_length > limit:
        raise ValueError(
            f"text_max_length={config.text_max_length}: the text encoder {config.text_model} takes at "
            f"most {limit} tokens; set it to {limit} or less, or leave it unset to choose from the data"
        )
    else:
        length, how = config.text_max_length, "as set"
    info = {
        "tokens": int(length),
        "chosen": how,
        "texts": int(counts.size),
        "texts_cut": int((counts > length).sum()),
        "longest": int(counts.max()) if counts.size else 0,
        "limit": int(limit),
    }
    log.info(f"text length {length} tokens ({how}); {info['texts_cut']:,} of {info['texts']:,} texts cut")
    config = config.replace(text_max_length=int(length))
    net.config = config
    return config, info


class _History(L.Callback):
    """Validation mean F1 against wall time since ``fit`` began: what 'time to a given F1' is read from."""

    def __init__(self, start: float):
        self.start, self.rows = start, []

    def on_validation_end(self, trainer, pl_module):  # after the module has logged this epoch's val_f1
        f1 = trainer.callback_metrics.get("val_f1")
        if f1 is not None and not trainer.sanity_checking:
            self.rows.append({"epoch": trainer.current_epoch, "seconds": time.time() - self.start, "val_f1": float(f1)})

    def state_dict(self):  # kept in checkpoints, so a resumed run reports every epoch
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state["rows"])


class _DropFrozenWeights(L.Callback):
    """Checkpoints of the frozen regime hold only what trains, not hundreds of MB of fixed encoders."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        frozen = tuple(pl_module.frozen_encoders)
        if frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}


# ---- interruptions: checkpoints that resume exactly, and the stages of a run kept in its work folder ----

TRAINED = "trained.json"  # in the work folder once training has finished: what tuning needs


class _RandomState(L.Callback):
    """The random streams, kept in checkpoints: a resumed run draws the same batches and dropout masks.

    Lightning saves weights, optimiser, scheduler and loop counters but not the global generators,
    nor those the data loader holds (sampler, word dropout, length-grouped batches).
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def _holders(self):
        loader = self.loader
        return (
            getattr(loader.sampler, "generator", None),
            getattr(loader.collate_fn, "rng", None),
            loader.batch_sampler if hasattr(loader.batch_sampler, "epoch") else None,
        )

    def state_dict(self):
        import random

        version, state, gauss = random.getstate()
        legacy = np.random.get_state()
        sampler, collate, batches = self._holders()
        return {
            "torch": torch.get_rng_state(),
            "python": [version, list(state), gauss],
            "numpy": [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "sampler": sampler.get_state() if isinstance(sampler, torch.Generator) else None,
            "collate": collate.bit_generator.state if collate is not None else None,
            "batches_epoch": batches.epoch if batches is not None else None,
        }

    def load_state_dict(self, state):
        import random

        torch.set_rng_state(state["torch"])
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        sampler, collate, batches = self._holders()
        if state["sampler"] is not None and isinstance(sampler, torch.Generator):
            sampler.set_state(state["sampler"])
        if state["collate"] is not None and collate is not None:
            collate.bit_generator.state = state["collate"]
        if state["batches_epoch"] is not None and batches is not None:
            batches.epoch = state["batches_epoch"]


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their name and renamed into place: a kill mid-save keeps the previous one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class _PausePoints(L.Callback):
    """Test hook (FUSELABEL_TEST_PAUSE_AT=train-batch:N): stop before the N-th training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pause_for_test("train-batch")


def default_work_dir(out: str | Path) -> Path:
    """Where a run keeps checkpoints and logs unless told: ``OUT.work`` beside the model folder."""
    out = Path(out)
    return out.with_name(out.name + ".work")


def _run_fingerprint(config: Config, records) -> dict:
    """What a resumed run must share with the run it continues: the model and run settings, and the rows."""
    saved = config.saved()
    rows = hashlib.sha256(
        json.dumps(
            [[r.image_id, r.caption, r.split] for r in records.records] + [list(s) for s in records.label_sets]
        ).encode()
    ).hexdigest()
    return json.loads(json.dumps({**saved["model"], **saved["run"], "rows": rows}, default=str))


def check_resumable(work_dir, out, resume: bool, fingerprint: dict) -> None:
    """With ``resume``, refuse at once a work folder whose run had other settings or rows: before any feature
    is computed, not after."""
    work = Path(work_dir) if work_dir else default_work_dir(out)
    record = work / "run.json"
    if resume and record.exists():
        before = json.loads(record.read_text())
        changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
        if changed:
            raise ValueError(
                f"{work}: cannot resume: that run had other settings or rows ({', '.join(changed)}); "
                "pass the same ones, or drop --resume to start again"
            )


@contextlib.contextmanager
def _work_folder(work_dir, out, resume: bool, fingerprint: dict):
    """Yields (work folder, checkpoint to continue from or None); a folder derived from ``out`` is removed
    once the model is saved (one the caller named is kept)."""
    work = Path(work_dir) if work_dir else default_work_dir(out)
    record, last = work / "run.json", work / "checkpoints" / "last.ckpt"
    if resume and record.exists():  # already checked against this run's fingerprint (check_resumable)
        log.info(
            f"resuming from {work}"
            + (
                " (training had finished)"
                if (work / TRAINED).exists()
                else f", {'last checkpoint' if last.exists() else 'no checkpoint yet'}"
            )
        )
    else:
        if resume:
            log.info(
                f"no training to resume in {work}; training from the start "
                "(features already extracted come from the cache)"
            )
        if rank_zero_only.rank == 0:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            shutil.rmtree(work / "logs", ignore_errors=True)
            (work / TRAINED).unlink(missing_ok=True)
            write_atomic(record, json.dumps(fingerprint, indent=1, sort_keys=True).encode())
    yield work, (last if resume and last.exists() else None)
    if rank_zero_only.rank == 0 and not work_dir:
        shutil.rmtree(work, ignore_errors=True)


def _train_stage(trainer, module, train_loader, val_loader, work: Path, last, checkpoint, history) -> dict:
    """Train (or continue from ``last``), unless a resumed run had already finished training."""
    if last is not None and (work / TRAINED).exists():
        done = json.loads((work / TRAINED).read_text())
        history.rows = done["history"]
        return done
    # Frozen encoders are left out of checkpoints (_DropFrozenWeights); they come from their weights on resume.
    module.strict_loading = not module.frozen_encoders
    trainer.fit(module, train_loader, val_loader, ckpt_path=last)
    done = {"best": checkpoint.best_model_path, "epochs_run": trainer.current_epoch, "history": history.rows}
    if trainer.is_global_zero:
        write_atomic(work / TRAINED, json.dumps(done).encode())
    return done


def _loaders(config, regime, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir, device):
    workers = default_workers(config.num_workers)
    sampler = make_sampler(labels[train_idx], config.sampler, config.oversample_power, config.seed)
    if regime in ("frozen", "hybrid"):
        # hybrid: only the image side is cached; captions travel with the rows for the text encoder to train on
        text_trains = regime == "hybrid" and net.text_encoder is not None
        feats, present = frozen_features(
            net, tokenizer, data_config, records, image_dir, config, device=device, text=not text_trains
        )
        captions = [r.caption for r in records] if text_trains else None

        def subset(idx):
            return FeatureDataset(
                {k: v[idx] for k, v in feats.items()},
                labels[idx],
                present[idx],
                [captions[i] for i in idx] if captions else None,
            )

        collate = TextCollate(tokenizer if text_trains else None, config.text_max_length)
        train_collate = TextCollate(
            tokenizer if text_trains else None, config.text_max_length, config.word_dropout, config.seed
        )
        train_ds, val_ds = subset(train_idx), subset(val_idx)
        if text_trains and single_process(config):
            lengths = [len(tokenizer.tokenize(c)) for c in train_ds.captions]
            weights = (
                oversampling_weights(labels[train_idx], config.oversample_power)
                if config.sampler == "oversample"
                else None
            )
            batches = LengthGroupedBatchSampler(lengths, config.batch_size, config.seed, weights)
            train_loader = DataLoader(train_ds, batch_sampler=batches, collate_fn=train_collate)
        else:
            train_loader = training_loader(train_ds, config, train_collate, sampler)
        return train_loader, DataLoader(val_ds, batch_size=1024 if not text_trains else 256, collate_fn=collate)
    # The device image cache: decode every image once, augment on the device (PIL workers are the bottleneck).
    from .image_cache import cache_supported, cached_loaders

    if cache_supported(config, net):
        return cached_loaders(
            config, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir, device, sampler
        )
    load_images = net.image_encoder is not None
    train_tf = build_transform(data_config, True, config.augment) if load_images else None
    val_tf = build_transform(data_config, False) if load_images else None
    train_ds = PairDataset(
        [records[i] for i in train_idx], image_dir, train_tf, labels[train_idx], config.missing_images, load_images
    )
    val_ds = PairDataset(
        [records[i] for i in val_idx], image_dir, val_tf, labels[val_idx], config.missing_images, load_images
    )
    return fit_loaders(config, tokenizer, train_ds, val_ds, workers=workers, device=device, sampler=sampler)


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning warnings that only bury our own summary, hidden while the Trainer runs (the caller's filters
    are back afterwards)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen encoders, on purpose
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        yield


def fit(
    config: Config,
    data_dir: str | Path,
    csv,
    out: str | Path,
    *,
    label_names: str | Path | dict | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    columns: Columns | None = None,
    val=None,
    extra_callbacks: list | None = None,
) -> TrainResult | None:
    """Train a model on a labelled table and write its folder to ``out``.

    ``csv`` (and ``val``) is a table's path (CSV, TSV, JSON Lines, Parquet, the course CSV), a DataFrame or a
    RecordSet; ``columns`` says which column is which. The validation rows are ``val`` when given, else the
    rows a split column marks ``val``, else a stratified ``val_fraction`` of the rows.
    Checkpoints and logs go to ``work_dir`` (default ``OUT.work``, removed once the model is saved);
    ``resume=True`` continues the run a kill interrupted there: extracted features come from the
    cache, training from its last checkpoint (optimiser, schedule and random streams included).
    ``extra_callbacks`` are Lightning callbacks added to the run's own (``fuselabel tune`` reports each
    epoch's validation F1 to its pruner through one).
    Returns None on non-zero ranks of a multi-process run (only rank 0 tunes and saves).
    """
    t0 = time.time()
    timings: dict[str, float] = {}
    records = csv if isinstance(csv, RecordSet) else read_table(csv, columns, need_labels=True)
    require_labels(records, "training")
    if val is not None and not isinstance(val, RecordSet):
        given = columns or Columns()  # the validation table: the same columns, no split column of its own
        val_columns = dataclasses.replace(
            given, split=None, label_sep=given.label_sep or records.table.get("label_sep") or "none"
        )
        val = read_table(val, val_columns, trained=records.table, need_labels=True)
    if len(records) + (len(val) if val is not None else 0) < 2:
        raise ValueError(
            f"{records.path}: {len(records)} row(s) after the header; training needs at least two "
            "labelled rows (one for training, one for validation)"
        )
    records, train_idx, val_idx, split_how = choose_split(
        records, val, config, lambda rs: labels_to_matrix(rs.label_sets, label_vocabulary(rs.label_sets))
    )
    vocab = label_vocabulary(records.label_sets)
    labels = labels_to_matrix(records.label_sets, vocab).astype(np.float32)
    names = label_names_for(records, data_dir, label_names)
    gpu = torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda")
    config = resolve_auto(config, gpu)
    regime = config.regime
    log.info(
        f"{len(records)} rows, {len(vocab)} labels; train {len(train_idx)}, val {len(val_idx)}; "
        f"model {config.kind}, regime {regime}"
    )

    check_task_labels(config, records)
    L.seed_everything(config.seed, workers=True, verbose=False)
    tokenizer = create_tokenizer(config.text_model) if config.uses_text else None
    net = FuseLabelNet(config, len(vocab), vocab_size=len(tokenizer) if tokenizer is not None else None)
    # Before any feature is computed: cached text features are keyed by the length they were cut to.
    config, text_length = resolve_text_length(config, tokenizer, net, [records.records[i].caption for i in train_idx])
    data_config = (
        None
        if net.image_encoder is None
        else image_data_config(net.image_encoder.backbone, config.image_size, config.image_crop_pct)
    )
    device = torch.device("cuda" if torch.cuda.is_available() and config.accelerator != "cpu" else "cpu")
    timings["setup_s"] = time.time() - t0

    fingerprint = _run_fingerprint(config, records)
    check_resumable(work_dir, out, resume, fingerprint)
    if regime in ("frozen", "hybrid"):
        # Frozen encoders are stored rounded to save_dtype: the heads learn on, and are tuned with, the features
        # of the encoders that predictions will run.
        for encoder in (net.image_encoder, net.text_encoder if regime == "frozen" else None):
            if encoder is not None:
                round_like_saved(encoder, config.save_dtype)
    t1 = time.time()
    train_loader, val_loader = _loaders(
        config, regime, net, tokenizer, data_config, records.records, labels, train_idx, val_idx, data_dir, device
    )
    timings["features_s"] = time.time() - t1 if regime != "finetune" else 0.0

    weigh = class_weight_from_labels if config.task == "multiclass" else pos_weight_from_labels
    pos_weight = weigh(labels[train_idx]) if config.pos_weight else None
    module = FuseLabelModule(net, config, pos_weight)
    module.image_source = getattr(train_loader.dataset, "image_source", None)  # image cache, if any
    module.set_trainable(image=regime == "finetune", text=regime in ("finetune", "hybrid"))
    with _work_folder(work_dir, out, resume, fingerprint) as (work, last):
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=work / "checkpoints",
            monitor="val_f1",
            mode="max",
            save_top_k=1,
            filename="best",
            save_last=True,
            enable_version_counter=False,
        )
        history = _History(t0)
        callbacks = [
            checkpoint,
            _DropFrozenWeights(),
            history,
            _RandomState(train_loader),
            _PausePoints(),
            L.pytorch.callbacks.EarlyStopping(monitor="val_f1", mode="max", patience=config.patience),
            *(extra_callbacks or []),
        ]
        logger = L.pytorch.loggers.CSVLogger(work, name="logs", version=0)  # a resumed run appends
        precision = config.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
        t2 = time.time()
        with _quiet_lightning():
            trainer = L.Trainer(
                max_epochs=config.epochs,
                max_steps=config.max_steps,
                accelerator=config.accelerator,
                devices=config.devices,
                num_nodes=config.num_nodes,
                strategy=config.strategy,
                precision=precision,
                callbacks=callbacks,
                logger=logger,
                num_sanity_val_steps=0,
                enable_progress_bar=progress,
                enable_model_summary=False,
                log_every_n_steps=10,
                default_root_dir=work,
                plugins=[_AtomicCheckpointIO()],
            )
            trained = _train_stage(trainer, module, train_loader, val_loader, work, last, checkpoint, history)
        timings["train_s"] = time.time() - t2
        if not trainer.is_global_zero:
            return None
        if trained["best"]:
            state = torch.load(trained["best"], map_location="cpu", weights_only=True)["state_dict"]
            # Strict but for the frozen encoders, which checkpoints leave out (_DropFrozenWeights).
            missing, unexpected = module.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith(tuple(module.frozen_encoders))]
            if missing or unexpected:
                raise ValueError(
                    f"{trained['best']}: the best checkpoint does not fit this model (missing "
                    f"{missing[:3]}, unexpected {unexpected[:3]}); it belongs to another run: train "
                    "again without --resume"
                )
        history_csv = Path(logger.log_dir) / "metrics.csv"

        t3 = time.time()
        pause_for_test("tune")
        # Tuned on the stored model through the prediction path: the weights rounded as they will be saved.
        round_like_saved(net, config.save_dtype)
        val_labels = labels[val_idx].astype(np.uint8)
        bundle = Bundle(
            net=net.cpu() if device.type != "cuda" else net,
            config=config.replace(regime=regime),
            labels=vocab,
            label_names=names,
            thresholds={},
            preprocessing=data_config,
            tokenizer=tokenizer,
            table=table_spelling(records.table, vocab),
        )
        frozen = regime == "frozen" and isinstance(val_loader.dataset, FeatureDataset)
        probs, val_prediction, fusion_info, known = calibrate(
            bundle,
            config,
            [records.records[i] for i in val_idx],
            val_labels,
            device,
            features={k: v.numpy() for k, v in val_loader.dataset.features.items()} if frozen else None,
            image_present=val_loader.dataset.image_present.numpy() if frozen else None,
            image_dir=data_dir,
        )
        if "late_weight" in fusion_info:
            net.late_weight.fill_(float(fusion_info["late_weight"]))
        thresholds = tune_thresholds(config, val_labels[known], probs[known])
        thresholds.update(fusion_info)
        pred = decide(probs, np.asarray(thresholds["thresholds"], np.float32), config.ensure_nonempty, config.task)
        report = evaluate(val_labels, pred, vocab, names)
        report["threshold_method"] = thresholds["method"]
        if config.task == "multiclass":
            report["accuracy"] = report["exact_match"]  # one label a row: every label right
        timings["tune_s"] = time.time() - t3
        timings["total_s"] = time.time() - t0

        bundle.net, bundle.thresholds = net.cpu(), thresholds
        bundle.extra = {
            "split.json": {
                "method": split_how,
                "seed": config.seed,
                "val_fraction": config.val_fraction,
                "train_ids": [records.records[i].id for i in train_idx],
                "val_ids": [records.records[i].id for i in val_idx],
            },
            "metrics.json": {
                "validation": report,
                "regime": regime,
                "timings": timings,
                "text_length": text_length,
                "epochs_run": trained["epochs_run"],
                "val_f1_by_time": history.rows,
            },
        }
        size = save_bundle(out, bundle, {"history.csv": history_csv})
    log.debug(format_report(report))  # the command line prints it; from Python, the one line below
    rule = (
        f"arg-max label, accuracy {report['accuracy']:.4f}"
        if config.task == "multiclass"
        else f"{config.threshold_method} thresholds"
    )
    summary = (
        f"validation mean F1 {report['mean_f1']:.4f} ({rule}) on {len(val_idx)} rows; "
        f"model folder {out} is {size / 1e6:.1f} MB; took {timings['total_s']:.0f}s"
    )
    log.info(summary)
    parts = {**val_prediction.parts, "image_present": val_prediction.image_present.astype(np.float32)}
    return TrainResult(Path(out), size, report, thresholds, timings, parts, val_labels, history.rows, summary, probs)
