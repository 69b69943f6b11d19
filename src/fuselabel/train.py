"""The training flow: CSV -> split -> (cached features | raw batches) -> Lightning -> thresholds -> model folder."""

from __future__ import annotations

import contextlib
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
from .cache import atomic_path, pause_for_test, write_atomic
from .config import Config
from .data import (FeatureDataset, LengthGroupedBatchSampler, PairDataset, TextCollate, build_transform,
                   default_workers, make_sampler, oversampling_weights, single_process, stratified_split)
from .encoders import create_tokenizer, image_data_config
from .features import frozen_features
from .network import FuseLabelNet, combine_probabilities
from .labels import label_vocabulary, labels_to_matrix, read_label_names
from .losses import pos_weight_from_labels
from .metrics import evaluate, format_report
from .module import FuseLabelModule, infer
from .records import RecordSet, read_records
from .thresholds import apply_thresholds, tune, tune_global


log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model_dir: Path
    size_bytes: int
    report: dict
    thresholds: dict
    timings: dict
    val_parts: dict          # per-head validation probabilities, for studies
    val_labels: np.ndarray
    history: list = field(default_factory=list)   # [{epoch, seconds since start, val_f1}]


def resolve_regime(config: Config) -> str:
    if config.regime != "auto":
        return config.regime
    return "finetune" if torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda") else "frozen"


def find_label_names(csv, explicit: str | Path | dict | None) -> dict[str, str]:
    if isinstance(explicit, dict):
        return {str(k): str(v) for k, v in explicit.items()}
    if explicit:
        return read_label_names(explicit)
    if isinstance(csv, RecordSet):
        csv = csv.path
    beside = Path(csv).with_name("label_names.csv")
    return read_label_names(beside) if beside.exists() else {}


def tune_fusion(config: Config, parts: dict, labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Fused validation probabilities, choosing the late-fusion weight on validation rows when not fixed."""
    present = torch.as_tensor(parts["image_present"])
    heads = {k: torch.as_tensor(v) for k, v in parts.items() if k != "image_present"}
    info: dict = {}
    if config.kind == "late" and config.late_combine == "weighted" and config.late_weight is None:
        scores = {}
        for w in np.round(np.arange(0.0, 1.0001, 0.05), 2):
            probs = combine_probabilities(heads, "weighted", float(w), present).numpy()
            scores[float(w)] = tune_global(labels, probs, config.ensure_nonempty)[1]
        best = max(scores, key=scores.get)
        info = {"late_weight": best, "late_weight_scores": scores}
        weight = best
    else:
        weight = config.late_weight if config.late_weight is not None else 0.5
        info = {"late_weight": weight}
    probs = combine_probabilities(heads, config.late_combine, weight, present).numpy()
    return probs, info


def tune_thresholds(config: Config, labels: np.ndarray, probs: np.ndarray) -> dict:
    """All three rules tuned on validation rows; the configured one is what predict uses."""
    results = {m: tune(m, labels, probs, config.ensure_nonempty) for m in ("global", "per_class", "balanced")}
    chosen = dict(results[config.threshold_method])
    chosen["ensure_nonempty"] = config.ensure_nonempty
    chosen["alternatives"] = {m: {"val_mean_f1": r["val_mean_f1"], "thresholds": r["thresholds"]}
                              for m, r in results.items()}
    return chosen


class _History(L.Callback):
    """Validation mean F1 against wall time since ``fit`` began: what 'time to a given F1' is read from."""

    def __init__(self, start: float):
        self.start, self.rows = start, []

    def on_validation_end(self, trainer, pl_module):  # after the module has logged this epoch's val_f1
        f1 = trainer.callback_metrics.get("val_f1")
        if f1 is not None and not trainer.sanity_checking:
            self.rows.append({"epoch": trainer.current_epoch, "seconds": time.time() - self.start,
                              "val_f1": float(f1)})

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

TRAINED = "trained.json"   # in the work folder once training has finished: what tuning needs


class _RandomState(L.Callback):
    """The random streams, kept in checkpoints: a resumed run draws the same batches and dropout masks.

    Lightning saves weights, optimiser, scheduler and loop counters but not the global generators,
    nor those the data loader holds (sampler, word dropout, length-grouped batches).
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def _holders(self):
        loader = self.loader
        return (getattr(loader.sampler, "generator", None), getattr(loader.collate_fn, "rng", None),
                loader.batch_sampler if hasattr(loader.batch_sampler, "epoch") else None)

    def state_dict(self):
        import random

        version, state, gauss = random.getstate()
        legacy = np.random.get_state()
        sampler, collate, batches = self._holders()
        return {"torch": torch.get_rng_state(), "python": [version, list(state), gauss],
                "numpy": [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "sampler": sampler.get_state() if isinstance(sampler, torch.Generator) else None,
                "collate": collate.bit_generator.state if collate is not None else None,
                "batches_epoch": batches.epoch if batches is not None else None}

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
    rows = hashlib.sha256(json.dumps([[r.image_id, r.caption] for r in records.records]
                                     + [list(s) for s in records.label_sets]).encode()).hexdigest()
    return json.loads(json.dumps({**saved["model"], **saved["run"], "rows": rows}, default=str))


@contextlib.contextmanager
def _work_folder(work_dir, out, resume: bool, fingerprint: dict):
    """Yields (work folder, checkpoint to continue from or None); a folder derived from ``out`` is removed
    once the model is saved (one the caller named is kept)."""
    work = Path(work_dir) if work_dir else default_work_dir(out)
    record, last = work / "run.json", work / "checkpoints" / "last.ckpt"
    if resume and record.exists():
        before = json.loads(record.read_text())
        changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
        if changed:
            raise ValueError(f"{work}: cannot resume: that run had other settings or rows ({', '.join(changed)}); "
                             "pass the same ones, or drop --resume to start again")
        log.info(f"resuming from {work}" + (" (training had finished)" if (work / TRAINED).exists() else
                                            f", {'last checkpoint' if last.exists() else 'no checkpoint yet'}"))
    else:
        if resume:
            log.info(f"no training to resume in {work}; training from the start "
                     "(features already extracted come from the cache)")
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


def _loaders(config, regime, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir,
             device):
    workers = default_workers(config.num_workers)
    sampler = make_sampler(labels[train_idx], config.sampler, config.oversample_power, config.seed)
    if regime in ("frozen", "hybrid"):
        # hybrid: only the image side is cached; captions travel with the rows for the text encoder to train on
        text_trains = regime == "hybrid" and net.text_encoder is not None
        feats, present = frozen_features(net, tokenizer, data_config, records, image_dir, config, device=device,
                                         text=not text_trains)
        captions = [r.caption for r in records] if text_trains else None

        def subset(idx):
            return FeatureDataset({k: v[idx] for k, v in feats.items()}, labels[idx], present[idx],
                                  [captions[i] for i in idx] if captions else None)

        collate = TextCollate(tokenizer if text_trains else None, config.text_max_length)
        train_collate = TextCollate(tokenizer if text_trains else None, config.text_max_length,
                                    config.word_dropout, config.seed)
        train_ds, val_ds = subset(train_idx), subset(val_idx)
        if text_trains and single_process(config):
            lengths = [len(tokenizer.tokenize(c)) for c in train_ds.captions]
            weights = oversampling_weights(labels[train_idx], config.oversample_power) \
                if config.sampler == "oversample" else None
            batches = LengthGroupedBatchSampler(lengths, config.batch_size, config.seed, weights)
            train_loader = DataLoader(train_ds, batch_sampler=batches, collate_fn=train_collate)
        else:
            train_loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=sampler is None,
                                      sampler=sampler, drop_last=len(train_ds) > config.batch_size,
                                      collate_fn=train_collate)
        return train_loader, DataLoader(val_ds, batch_size=1024 if not text_trains else 256, collate_fn=collate)
    # The device image cache: decode every image once, augment on the device (PIL workers are the bottleneck).
    from .image_cache import cache_supported, cached_loaders

    if cache_supported(config, net):
        return cached_loaders(config, net, tokenizer, data_config, records, labels, train_idx, val_idx, image_dir,
                              device, sampler)
    collate = TextCollate(tokenizer, config.text_max_length)
    load_images = net.image_encoder is not None
    train_tf = build_transform(data_config, True, config.augment) if load_images else None
    val_tf = build_transform(data_config, False) if load_images else None
    train_ds = PairDataset([records[i] for i in train_idx], image_dir, train_tf, labels[train_idx],
                           config.missing_images, load_images)
    val_ds = PairDataset([records[i] for i in val_idx], image_dir, val_tf, labels[val_idx],
                         config.missing_images, load_images)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    train_collate = TextCollate(tokenizer, config.text_max_length, config.word_dropout, config.seed)
    return (DataLoader(train_ds, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=len(train_ds) > config.batch_size, collate_fn=train_collate, **common),
            DataLoader(val_ds, batch_size=config.batch_size * 2, collate_fn=collate, **common))


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning warnings that only bury our own summary, hidden while the Trainer runs (the caller's filters
    are back afterwards)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen encoders, on purpose
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        yield


def fit(config: Config, data_dir: str | Path, csv: str | Path, out: str | Path, *,
        label_names: str | Path | None = None, work_dir: str | Path | None = None,
        progress: bool = True, resume: bool = False) -> TrainResult | None:
    """Train a model on a labelled CSV and write its folder to ``out``.

    Checkpoints and logs go to ``work_dir`` (default ``OUT.work``, removed once the model is saved);
    ``resume=True`` continues the run a kill interrupted there: extracted features come from the
    cache, training from its last checkpoint (optimiser, schedule and random streams included).
    Returns None on non-zero ranks of a multi-process run (only rank 0 tunes and saves).
    """
    t0 = time.time()
    timings: dict[str, float] = {}
    records = csv if isinstance(csv, RecordSet) else read_records(csv)
    if not records.labelled:
        raise ValueError(f"{csv}: training needs a Labels column (header ImageID,Labels,Caption)")
    if len(records) < 2:
        raise ValueError(f"{records.path}: {len(records)} row(s) after the header; training needs at least two "
                         "labelled rows (one for training, one for validation)")
    vocab = label_vocabulary(records.label_sets)
    labels = labels_to_matrix(records.label_sets, vocab).astype(np.float32)
    names = find_label_names(csv, label_names)
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
    regime = resolve_regime(config)
    log.info(f"{len(records)} rows, {len(vocab)} labels; train {len(train_idx)}, val {len(val_idx)}; "
             f"model {config.kind}, regime {regime}")

    L.seed_everything(config.seed, workers=True, verbose=False)
    tokenizer = create_tokenizer(config.text_model) if config.uses_text else None
    net = FuseLabelNet(config, len(vocab), vocab_size=len(tokenizer) if tokenizer is not None else None)
    data_config = None if net.image_encoder is None else image_data_config(
        net.image_encoder.backbone, config.image_size, config.image_crop_pct)
    device = torch.device("cuda" if torch.cuda.is_available() and config.accelerator != "cpu" else "cpu")
    timings["setup_s"] = time.time() - t0

    t1 = time.time()
    train_loader, val_loader = _loaders(config, regime, net, tokenizer, data_config, records.records, labels,
                                        train_idx, val_idx, data_dir, device)
    timings["features_s"] = time.time() - t1 if regime != "finetune" else 0.0

    pos_weight = pos_weight_from_labels(labels[train_idx]) if config.pos_weight else None
    module = FuseLabelModule(net, config, pos_weight)
    module.image_source = getattr(train_loader.dataset, "image_source", None)  # image cache, if any
    module.set_trainable(image=regime == "finetune", text=regime in ("finetune", "hybrid"))
    with _work_folder(work_dir, out, resume, _run_fingerprint(config, records)) as (work, last):
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=work / "checkpoints", monitor="val_f1", mode="max",
                                                         save_top_k=1, filename="best", save_last=True,
                                                         enable_version_counter=False)
        history = _History(t0)
        callbacks = [checkpoint, _DropFrozenWeights(), history, _RandomState(train_loader), _PausePoints(),
                     L.pytorch.callbacks.EarlyStopping(monitor="val_f1", mode="max", patience=config.patience)]
        logger = L.pytorch.loggers.CSVLogger(work, name="logs", version=0)  # a resumed run appends
        precision = config.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
        t2 = time.time()
        with _quiet_lightning():
            trainer = L.Trainer(max_epochs=config.epochs, max_steps=config.max_steps,
                                accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                                strategy=config.strategy, precision=precision, callbacks=callbacks, logger=logger,
                                num_sanity_val_steps=0, enable_progress_bar=progress, enable_model_summary=False,
                                log_every_n_steps=10, default_root_dir=work, plugins=[_AtomicCheckpointIO()])
            trained = _train_stage(trainer, module, train_loader, val_loader, work, last, checkpoint, history)
        timings["train_s"] = time.time() - t2
        if not trainer.is_global_zero:
            return None
        if trained["best"]:
            state = torch.load(trained["best"], map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state, strict=False)
        history_csv = Path(logger.log_dir) / "metrics.csv"

        t3 = time.time()
        pause_for_test("tune")
        if regime == "finetune":  # DDP shuffles rows across ranks; re-run validation in order on one device
            val_loader = DataLoader(val_loader.dataset, batch_size=val_loader.batch_size,
                                    collate_fn=val_loader.collate_fn, num_workers=val_loader.num_workers)
            if module.image_source is not None:  # pixels from the image cache
                val_loader = module.image_source.with_pixels(val_loader, device)
        parts = infer(net, val_loader, device, precision)
        val_labels = labels[val_idx].astype(np.uint8)
        probs, fusion_info = tune_fusion(config, parts, val_labels)
        if "late_weight" in fusion_info:
            net.late_weight.fill_(float(fusion_info["late_weight"]))
        thresholds = tune_thresholds(config, val_labels, probs)
        thresholds.update(fusion_info)
        pred = apply_thresholds(probs, np.asarray(thresholds["thresholds"]), config.ensure_nonempty)
        report = evaluate(val_labels, pred, vocab, names)
        report["threshold_method"] = config.threshold_method
        timings["tune_s"] = time.time() - t3
        timings["total_s"] = time.time() - t0

        bundle = Bundle(net=net.cpu(), config=config.replace(regime=regime), labels=vocab, label_names=names,
                        thresholds=thresholds, preprocessing=data_config, tokenizer=tokenizer,
                        extra={"split.json": {"seed": config.seed, "val_fraction": config.val_fraction,
                                              "train_ids": [records.records[i].image_id for i in train_idx],
                                              "val_ids": [records.records[i].image_id for i in val_idx]},
                               "metrics.json": {"validation": report, "regime": regime, "timings": timings,
                                                "epochs_run": trained["epochs_run"],
                                                "val_f1_by_time": history.rows}})
        size = save_bundle(out, bundle, {"history.csv": history_csv})
    log.info(format_report(report))
    log.info(f"validation mean F1 {report['mean_f1']:.4f} ({config.threshold_method} thresholds); "
             f"model folder {out} is {size / 1e6:.1f} MB; took {timings['total_s']:.0f}s")
    return TrainResult(Path(out), size, report, thresholds, timings, parts, val_labels, history.rows)
