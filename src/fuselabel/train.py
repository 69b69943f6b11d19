"""The training flow: CSV -> split -> (cached features | raw batches) -> Lightning -> thresholds -> model folder."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch

from . import writers
from .bundle import Bundle, save_bundle
from .calibration import calibrate
from .config import Config, resolve_auto
from .data import FeatureDataset, stratified_split
from .encoders import choose_text_length, create_tokenizer, image_data_config, text_length_limit, token_counts
from .labels import find_label_names, label_vocabulary, labels_to_matrix
from .loaders import make_loaders
from .losses import class_weight_from_labels, pos_weight_from_labels
from .metrics import evaluate, format_report
from .module import FuseLabelModule
from .network import FuseLabelNet
from .records import RecordSet
from .resume import check_resumable, load_best, run_fingerprint, run_training, work_folder
from .tables import Columns, read_table, require_labels, table_spelling
from .tracking import STAGES, StageTimes, check_logger

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run gives back: the model folder, its validation report and tuned rules, and the run's
    figures (stage timings, per-head and fused validation probabilities, the F1 history)."""

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


def round_like_saved(module: torch.nn.Module, dtype: str) -> None:
    """Give ``module`` the weights saving it as ``dtype`` and loading it back would: what predictions will use."""
    from .bundle import stored_state

    current = module.state_dict()
    module.load_state_dict({k: v.to(current[k].dtype) for k, v in stored_state(module, dtype).items()})


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


@dataclass
class _Run:
    """A run ready to train: its rows and split, labels, the network and what feeds it, where it runs."""

    config: Config
    records: RecordSet
    labels: np.ndarray  # (rows, labels) float32
    vocab: list
    names: dict
    train_idx: np.ndarray
    val_idx: np.ndarray
    split_how: str
    regime: str
    tokenizer: object
    net: FuseLabelNet
    text_length: dict
    data_config: dict | None
    device: torch.device


def _read_rows(csv, val, columns) -> tuple[RecordSet, RecordSet | None]:
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
    return records, val


def _prepare(config: Config, data_dir, csv, val, columns, label_names) -> _Run:
    """Rows read and split, the network built, the text length chosen: everything before any feature."""
    records, val = _read_rows(csv, val, columns)
    records, train_idx, val_idx, split_how = choose_split(
        records, val, config, lambda rs: labels_to_matrix(rs.label_sets, label_vocabulary(rs.label_sets))
    )
    vocab = label_vocabulary(records.label_sets)
    labels = labels_to_matrix(records.label_sets, vocab).astype(np.float32)
    names = label_names_for(records, data_dir, label_names)
    gpu = torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda")
    config = resolve_auto(config, gpu)  # int8 encoders on a CPU, fine-tuning on a GPU, unless told otherwise
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
    device = torch.device("cuda" if gpu else "cpu")
    if regime in ("frozen", "hybrid"):
        # Frozen encoders are stored rounded to save_dtype: the heads learn on, and are tuned with, the features
        # of the encoders that predictions will run.
        for encoder in (net.image_encoder, net.text_encoder if regime == "frozen" else None):
            if encoder is not None:
                round_like_saved(encoder, config.save_dtype)
    return _Run(
        config,
        records,
        labels,
        vocab,
        names,
        train_idx,
        val_idx,
        split_how,
        regime,
        tokenizer,
        net,
        text_length,
        data_config,
        device,
    )


def _loaders(config: Config, run: _Run, data_dir, timings: StageTimes):
    """(train loader, validation loader); frozen features are computed (or read from the cache) here."""
    return make_loaders(
        config,
        run.regime,
        run.net,
        run.tokenizer,
        run.data_config,
        run.records.records,
        run.labels,
        run.train_idx,
        run.val_idx,
        data_dir,
        run.device,
        timings=timings,
    )


def _module(config: Config, run: _Run, train_loader) -> FuseLabelModule:
    weigh = class_weight_from_labels if config.task == "multiclass" else pos_weight_from_labels
    pos_weight = weigh(run.labels[run.train_idx]) if config.pos_weight else None
    module = FuseLabelModule(run.net, config, pos_weight)
    module.image_source = getattr(train_loader.dataset, "image_source", None)  # image cache, if any
    module.set_trainable(image=run.regime == "finetune", text=run.regime in ("finetune", "hybrid"))
    return module


def _calibrate(config: Config, run: _Run, val_loader, data_dir):
    """Fusion and thresholds tuned on the stored model through the prediction path (weights rounded as saved)."""
    writers.reached("tune")
    round_like_saved(run.net, config.save_dtype)
    bundle = _bundle(config, run, {})
    rows = val_loader.dataset
    frozen = run.regime == "frozen" and isinstance(rows.rows, FeatureDataset)
    return calibrate(
        bundle,
        config,
        [run.records.records[i] for i in run.val_idx],
        run.labels[run.val_idx].astype(np.uint8),
        run.device,
        features={k: v.numpy() for k, v in rows.features.items()} if frozen else None,
        image_present=rows.image_present.numpy() if frozen else None,
        image_dir=data_dir,
    )


def _bundle(config: Config, run: _Run, thresholds: dict) -> Bundle:
    return Bundle(
        net=run.net.cpu() if run.device.type != "cuda" else run.net,
        config=config.replace(regime=run.regime),
        labels=run.vocab,
        label_names=run.names,
        thresholds=thresholds,
        preprocessing=run.data_config,
        tokenizer=run.tokenizer,
        table=table_spelling(run.records.table, run.vocab),
    )


def _save(config: Config, run: _Run, calibration, trained, history, timings, out, work: Path, t0: float):
    """The model folder: weights, tuned rules, split, metrics (with every stage's seconds). Returns the result."""
    start = time.perf_counter()
    thresholds = calibration.thresholds
    if "late_weight" in thresholds:
        run.net.late_weight.fill_(float(thresholds["late_weight"]))
    val_labels = run.labels[run.val_idx].astype(np.uint8)
    report = evaluate(val_labels, calibration.predicted, run.vocab, run.names)
    report["threshold_method"] = thresholds["method"]
    if config.task == "multiclass":
        report["accuracy"] = report["exact_match"]  # one label a row: every label right
    bundle = _bundle(config, run, thresholds)
    bundle.net = run.net.cpu()
    ids = [r.id for r in run.records.records]

    def metrics() -> dict:  # written last of the folder's files, so that saving is timed too
        timings.add("save_s", time.perf_counter() - start)
        timings["total_s"] = time.time() - t0
        return {
            "validation": report,
            "regime": run.regime,
            "timings": dict(timings),
            "text_length": run.text_length,
            "epochs_run": trained["epochs_run"],
            "val_f1_by_time": history.rows,
        }

    split = {"method": run.split_how, "seed": config.seed, "val_fraction": config.val_fraction}
    split.update(train_ids=[ids[i] for i in run.train_idx], val_ids=[ids[i] for i in run.val_idx])
    bundle.extra = {"split.json": split, "metrics.json": metrics}
    size = save_bundle(out, bundle, {"history.csv": work / "logs" / "version_0" / "metrics.csv"})
    rule = (
        f"arg-max label, accuracy {report['accuracy']:.4f}"
        if config.task == "multiclass"
        else f"{config.threshold_method} thresholds"
    )
    summary = (
        f"validation mean F1 {report['mean_f1']:.4f} ({rule}) on {len(run.val_idx)} rows; "
        f"model folder {out} is {size / 1e6:.1f} MB; took {timings['total_s']:.0f}s ({timings.line()})"
    )
    return TrainResult(
        Path(out), size, report, thresholds, dict(timings), {}, val_labels, history.rows, summary, calibration.probs
    )


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
    t0, timings = time.time(), StageTimes.fromkeys(STAGES, 0.0)
    check_logger(config)
    run = _prepare(config, data_dir, csv, val, columns, label_names)
    config = run.config
    timings["setup_s"] = time.time() - t0
    fingerprint = run_fingerprint(config, run.records)
    check_resumable(work_dir, out, resume, fingerprint)
    with timings.stage("features_s"):
        train_loader, val_loader = _loaders(config, run, data_dir, timings)
    module = _module(config, run, train_loader)
    with work_folder(work_dir, out, resume, fingerprint) as (work, last):
        with timings.stage("train_s"):
            trained, trainer, history = run_training(
                config, module, train_loader, val_loader, work, last, out, progress, t0, extra_callbacks or []
            )
        if not trainer.is_global_zero:
            return None
        load_best(module, trained)
        with timings.stage("calibrate_s"):
            calibration, prediction = _calibrate(config, run, val_loader, data_dir)
        result = _save(config, run, calibration, trained, history, timings, out, work, t0)
    log.debug(format_report(result.report))  # the command line prints it; from Python, the one line below
    log.info(result.summary)
    result.val_parts = {**prediction.parts, "image_present": prediction.image_present.astype(np.float32)}
    return result
