"""A training run that survives interruptions: checkpoints that resume exactly, and the run's work folder.

A run keeps checkpoints, logs and its stages in a work folder (``OUT.work`` unless named). A killed run
started again with ``resume=True`` continues from its last checkpoint: weights, optimiser, schedule, loop
counters and every random stream, so it ends with the model an uninterrupted run would have made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from . import writers
from .config import Config
from .tracking import experiment_logger
from .writers import atomic_path, write_atomic

log = logging.getLogger(__name__)


class History(L.Callback):
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


class DropFrozenWeights(L.Callback):
    """Checkpoints of the frozen regime hold only what trains, not hundreds of MB of fixed encoders."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        frozen = tuple(pl_module.frozen_encoders)
        if frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}


TRAINED = "trained.json"  # in the work folder once training has finished: what tuning needs


class RandomState(L.Callback):
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their name and renamed into place: a kill mid-save keeps the previous one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class PausePoints(L.Callback):
    """Test hook (FUSELABEL_TEST_PAUSE_AT=train-batch:N): stop before the N-th training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        writers.reached("train-batch")


def default_work_dir(out: str | Path) -> Path:
    """Where a run keeps checkpoints and logs unless told: ``OUT.work`` beside the model folder."""
    out = Path(out)
    return out.with_name(out.name + ".work")


def run_fingerprint(config: Config, records) -> dict:
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
def work_folder(work_dir, out, resume: bool, fingerprint: dict):
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


def train_stage(trainer, module, train_loader, val_loader, work: Path, last, checkpoint, history) -> dict:
    """Train (or continue from ``last``), unless a resumed run had already finished training."""
    if last is not None and (work / TRAINED).exists():
        done = json.loads((work / TRAINED).read_text())
        history.rows = done["history"]
        return done
    # Frozen encoders are left out of checkpoints (DropFrozenWeights); they come from their weights on resume.
    module.strict_loading = not module.frozen_encoders
    trainer.fit(module, train_loader, val_loader, ckpt_path=last)
    done = {"best": checkpoint.best_model_path, "epochs_run": trainer.current_epoch, "history": history.rows}
    if trainer.is_global_zero:
        write_atomic(work / TRAINED, json.dumps(done).encode())
    return done


@contextlib.contextmanager
def quiet_lightning():
    """Lightning warnings that only bury our own summary, hidden while the Trainer runs (the caller's filters
    are back afterwards)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen encoders, on purpose
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        yield


def run_training(
    config: Config, module, train_loader, val_loader, work: Path, last, out, progress: bool, t0: float, extra=()
):
    """Lightning's loop with the run's callbacks: (what training left, the Trainer, the F1 history)."""
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=work / "checkpoints",
        monitor="val_f1",
        mode="max",
        save_top_k=1,
        filename="best",
        save_last=True,
        enable_version_counter=False,
    )
    history = History(t0)
    callbacks = [
        checkpoint,
        DropFrozenWeights(),
        history,
        RandomState(train_loader),
        PausePoints(),
        L.pytorch.callbacks.EarlyStopping(monitor="val_f1", mode="max", patience=config.patience),
        *extra,
    ]
    # The history the model folder keeps (history.csv); a resumed run appends. Then the user's tracker.
    loggers = [L.pytorch.loggers.CSVLogger(work, name="logs", version=0), experiment_logger(config, out)]
    cuda = torch.device("cuda") if torch.cuda.is_available() and config.accelerator != "cpu" else None
    with quiet_lightning():
        trainer = L.Trainer(
            max_epochs=config.epochs,
            max_steps=config.max_steps,
            **{k: getattr(config, k) for k in ("accelerator", "devices", "num_nodes", "strategy")},
            precision=config.precision or ("bf16-mixed" if cuda is not None else "32-true"),
            callbacks=callbacks,
            logger=[lg for lg in loggers if lg is not None],
            num_sanity_val_steps=0,
            enable_progress_bar=progress,
            enable_model_summary=False,
            log_every_n_steps=10,
            default_root_dir=work,
            plugins=[AtomicCheckpointIO()],
        )
        trained = train_stage(trainer, module, train_loader, val_loader, work, last, checkpoint, history)
    return trained, trainer, history


def load_best(module: L.LightningModule, trained: dict) -> None:
    """The best checkpoint's weights into ``module``: strict but for the frozen encoders checkpoints leave out."""
    if not trained["best"]:
        return
    state = torch.load(trained["best"], map_location="cpu", weights_only=True)["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(module.frozen_encoders))]
    if missing or unexpected:
        raise ValueError(
            f"{trained['best']}: the best checkpoint does not fit this model (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); it belongs to another run: train "
            "again without --resume"
        )
