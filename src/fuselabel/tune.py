"""Hyper-parameter search over the settings that change the heads, never the cached encoder features.

``fuselabel tune`` (or :func:`search`) runs an Optuna study whose every trial is one ordinary training
(:func:`fuselabel.train.fit`) of the frozen regime: the encoders' features come from the feature cache
after the first trial, the rows are read once, and every trial holds out the same validation rows (the
split is drawn by the model settings' ``seed``, which trials never vary). A trial varies, from the
settings it starts from:

* the head: ``decoder``, ``hidden_dim``, ``dropout``;
* the loss: ``loss`` (with focal's ``gamma`` or ASL's ``gamma_neg`` in ``loss_kwargs``), ``pos_weight``;
* the optimiser: ``lr``, ``weight_decay``, ``epochs`` (a cap: early stopping may end sooner);
* the fusion: ``late_combine`` (``kind: late`` only). The weight of the weighted average is left to
  ``fit``, which tunes it on the validation rows (a 0.05 grid of the same objective) unless it is set;
* the decision rule: each of ``threshold_methods`` is tuned on the same training's validation
  probabilities, so a trial scores the best of them without training again.

A trial's score is its validation mean F1. The first trial of a study is the starting settings
themselves (the default), so the search reports the best settings beside the default's on the same
rows. With pruning, each epoch's validation F1 (which training computes anyway, to keep its best
checkpoint) goes to Optuna's median pruner, which stops a trial that falls below the median of earlier
trials at the same epoch (after 5 unpruned trials and 3 epochs). A trial whose settings fail to train is
recorded as failed (its traceback beside its log) and the search goes on; the starting settings failing
stop it with their error.

The study lives in SQLite: in ``OUT.tune/study.db`` while it runs (with each trial's log), and in the
model folder as ``OUT/tune.db`` once the best settings are trained again into ``OUT``, a normal model
folder, beside ``OUT/tune.json`` (the best and the default, their figures, the trial counts). With
``resume``, a study kept in either place goes on; settings, rows or search space other than the
study's are refused, naming what changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from .config import Config, TuneSettings, choices
from .experiment import logged_to
from .outputs import MODEL, WORK, check_output, output_locks
from .records import RecordSet
from .resume import run_fingerprint
from .tables import Columns, read_table
from .train import fit
from .writers import atomic_path, atomic_write_text

__all__ = ["search", "TuneResult", "suggest_settings", "work_dir"]

log = logging.getLogger(__name__)

STUDY_FILE = "tune.db"  # in the model folder
SUMMARY_FILE = "tune.json"  # in the model folder
WORK_STUDY = "study.db"  # in the work folder, while the study runs


@dataclass
class TuneResult:
    """What a search found: the best trial's settings and figures beside the default's, and the model written."""

    model_dir: Path
    best_settings: dict  # the settings the best trial changed from the starting ones ({}: the default won)
    best_value: float  # its validation mean F1 (with its decision rule)
    default_value: float | None  # the starting settings' validation mean F1 (their own decision rule), same rows
    model_value: float  # the written model's validation mean F1 (the best settings, trained again)
    trials: dict  # trial counts by state: complete, pruned, failed
    summary: str = ""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError(
            "fuselabel tune needs Optuna, which is not installed: pip install 'fuselabel[tune]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial is said once, by the search itself
    return optuna


# ---------------------------------------------------------------- the search space


def _choices(fixed: list, current) -> list:
    return fixed if current in fixed else sorted([*fixed, current])


def suggest_settings(trial, base: Config, params: list[str]) -> dict:
    """The settings one trial changes, drawn from ``params``' ranges (widened to hold ``base``'s own values)."""
    out: dict = {}
    if "decoder" in params:
        out["decoder"] = trial.suggest_categorical("decoder", ["mlp", "query", "lstm"])
    if "hidden_dim" in params:
        out["hidden_dim"] = trial.suggest_categorical("hidden_dim", _choices([128, 256, 512, 1024], base.hidden_dim))
    if "dropout" in params:
        out["dropout"] = trial.suggest_float("dropout", 0.0, max(0.6, base.dropout))
    if "loss" in params:
        losses = [x for x in choices("loss") if not (base.task == "multiclass" and x == "asl")]
        loss = out["loss"] = trial.suggest_categorical("loss", losses)
        if loss == "focal":
            out["loss_kwargs"] = {"gamma": trial.suggest_float("focal_gamma", 0.5, 4.0)}
        elif loss == "asl":
            out["loss_kwargs"] = {"gamma_neg": trial.suggest_float("asl_gamma_neg", 1.0, 6.0)}
        else:
            out["loss_kwargs"] = {}
    if "pos_weight" in params:
        out["pos_weight"] = trial.suggest_categorical("pos_weight", [False, True])
    if "lr" in params:
        out["lr"] = trial.suggest_float("lr", min(1e-4, base.lr), max(1e-2, base.lr), log=True)
    if "weight_decay" in params:
        out["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, max(1e-2, base.weight_decay), log=True)
    if "epochs" in params:
        out["epochs"] = trial.suggest_int("epochs", min(10, base.epochs), max(80, base.epochs), step=5)
    if "late_combine" in params and base.kind == "late":
        out["late_combine"] = trial.suggest_categorical("late_combine", ["weighted", "union"])
    return out


def _score(result, config: Config, methods: list[str]) -> tuple[float, str]:
    """The best validation mean F1 over the allowed decision rules, and that rule (multiclass: its arg-max)."""
    alternatives = result.thresholds.get("alternatives") or {}
    scores = {m: float(alternatives[m]["val_mean_f1"]) for m in methods if m in alternatives}
    if not scores:
        return float(result.report["mean_f1"]), config.threshold_method
    best = max(scores, key=scores.get)
    return scores[best], best


# ---------------------------------------------------------------- one trial


class _ReportEpochs(L.Callback):
    """Each epoch's validation F1 to the trial; a trial the pruner stops ends its training at once."""

    def __init__(self, trial, optuna):
        self.trial, self.optuna = trial, optuna

    def on_validation_end(self, trainer, pl_module):
        f1 = trainer.callback_metrics.get("val_f1")
        if f1 is None or trainer.sanity_checking:
            return
        self.trial.report(float(f1), trainer.current_epoch)
        if self.trial.should_prune():
            raise self.optuna.TrialPruned(f"validation F1 {float(f1):.4f} at epoch {trainer.current_epoch}")


class _TrialFailed(RuntimeError):
    """A trial's settings failed to train (already logged); the study records it and goes on."""


@dataclass
class _Objective:
    """One trial: the settings drawn, one training on the shared rows and split, its best decision rule."""

    base: Config
    settings: TuneSettings
    data_dir: Path
    records: RecordSet
    work: Path
    label_names: object
    val: object
    optuna: object

    def train(self, config: Config, out: Path, callbacks=()):
        return fit(
            config,
            self.data_dir,
            self.records,
            out,
            label_names=self.label_names,
            progress=False,
            val=self.val,
            extra_callbacks=list(callbacks),
        )

    def __call__(self, trial) -> float:
        default = bool(trial.user_attrs.get("default"))
        changes = {} if default else suggest_settings(trial, self.base, self.settings.params)
        folder = self.work / f"trial-{trial.number:04d}"
        callbacks = [_ReportEpochs(trial, self.optuna)] if self.settings.prune else []
        start = time.time()
        try:
            config = self.base.replace(**changes)
            with logged_to(self.work / "logs" / f"{folder.name}.log"):
                result = self.train(config, folder, callbacks)
        except self.optuna.TrialPruned as pruned:
            log.info(f"trial {trial.number}: pruned ({pruned}) after {time.time() - start:.0f}s")
            raise
        except Exception as err:
            if default:  # the starting settings themselves fail: the data or the settings need fixing
                raise
            (self.work / "logs" / f"{folder.name}.error.txt").write_text(traceback.format_exc())
            log.warning(f"trial {trial.number}: failed ({type(err).__name__}: {err}); settings {changes}")
            raise _TrialFailed(str(err)) from err  # recorded as failed; the search goes on
        finally:  # the study keeps settings and figures; the model comes from the best settings at the end
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(folder.with_name(folder.name + ".work"), ignore_errors=True)
        value, method = _score(result, config, self.settings.threshold_methods)
        trial.set_user_attr("settings", {**changes, "threshold_method": method})
        trial.set_user_attr("epochs_run", len(result.history))
        # what ``fuselabel train`` with these settings gives: their own decision rule, not the best of them
        trial.set_user_attr("as_configured", float(result.report["mean_f1"]))
        what = "the default" if default else ", ".join(f"{k}={v}" for k, v in changes.items())
        log.info(f"trial {trial.number}: val mean F1 {value:.4f} ({method}) in {time.time() - start:.0f}s: {what}")
        return value


# ---------------------------------------------------------------- the study and its folders


def _fingerprint(config: Config, records: RecordSet, settings: TuneSettings) -> dict:
    """What a resumed study must share with the one it continues: settings, rows and search space."""
    space = {"params": settings.params, "threshold_methods": settings.threshold_methods}
    return json.loads(json.dumps({**run_fingerprint(config, records), **space}, default=str))


def _copy_study(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite study, written atomically (sqlite's own backup, not the bytes)."""
    with atomic_path(dst) as tmp:
        source, target = sqlite3.connect(src), sqlite3.connect(tmp)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()


def _pruner(optuna, settings: TuneSettings):
    """The median rule from the first finished trial (the default's) on, after 5 epochs: a trial whose validation
    F1 trails the finished trials' median at the same epoch stops. Over the course rows one trial can take minutes,
    so waiting for five finished trials before pruning spent most of a 15-minute budget on two poor ones."""
    if not settings.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=5)


def _open_study(optuna, out: Path, work: Path, settings: TuneSettings, fingerprint: dict):
    """The study to run: continued from the work folder or the model folder with ``resume``, else a new one."""
    kept = [p for p in (work / WORK_STUDY, out / STUDY_FILE) if p.is_file()]
    if kept and not settings.resume:
        raise ValueError(
            f"{kept[0]}: a study of earlier trials is kept there; pass --resume to continue it, or choose another --out"
        )
    if settings.resume and not kept:
        log.info(f"no study to resume in {out} or {work}; starting one")
    if kept and kept[0] != work / WORK_STUDY:
        _copy_study(kept[0], work / WORK_STUDY)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(work / WORK_STUDY).absolute()}")
    study = optuna.create_study(
        study_name="fuselabel",
        storage=storage,
        direction="maximize",
        pruner=_pruner(optuna, settings),
        load_if_exists=True,
    )
    before = study.user_attrs.get("fingerprint")
    if before is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.enqueue_trial({}, user_attrs={"default": True})
    elif before != fingerprint:
        changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{kept[0]}: cannot resume: that study had other settings, rows or search space ({', '.join(changed)}); "
            "pass the same ones, or choose another --out"
        )
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # killed with its process
    # A resumed study seeded as before would draw its first trials' settings again (random until TPE starts).
    study.sampler = optuna.samplers.TPESampler(seed=settings.sampler_seed + len(study.trials))
    return study


def _counts(study, optuna) -> dict:
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    return {
        name: sum(t.state == state for t in trials)
        for name, state in (("complete", states.COMPLETE), ("pruned", states.PRUNED), ("failed", states.FAIL))
    }


def _default_value(study, optuna) -> float | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t.user_attrs["as_configured"] for t in done if t.user_attrs.get("default")), None)


def _finish(study, optuna, objective: _Objective, out: Path) -> TuneResult:
    """The best settings trained again into ``out``, with the study and its summary beside the model."""
    best = study.best_trial
    changes = dict(best.user_attrs["settings"])
    config = objective.base.replace(**changes)
    log.info(f"training the best settings (trial {best.number}) into {out}")
    with logged_to(objective.work / "logs" / "best.log"):
        result = objective.train(config, out)
    model_value = float(result.report["mean_f1"])
    if changes["threshold_method"] == objective.base.threshold_method:
        del changes["threshold_method"]  # the summary names what differs from the default
    default_value, counts = _default_value(study, optuna), _counts(study, optuna)
    summary = {
        "best": {"trial": best.number, "settings": changes, "val_mean_f1": best.value},
        "default": {"val_mean_f1": default_value},
        "model": {"val_mean_f1": model_value},
        "trials": counts,
    }
    atomic_write_text(out / SUMMARY_FILE, [json.dumps(summary, indent=2, default=str) + "\n"])
    _copy_study(objective.work / WORK_STUDY, out / STUDY_FILE)
    shown = ", ".join(f"{k}={v}" for k, v in changes.items()) or "the default settings"
    line = (
        f"best of {counts['complete']} trials ({counts['pruned']} pruned): {shown}: validation mean F1 "
        f"{best.value:.4f} against the default's "
        f"{'-' if default_value is None else f'{default_value:.4f}'}; model folder {out} "
        f"(trained again: {model_value:.4f})"
    )
    return TuneResult(out, changes, float(best.value), default_value, model_value, counts, line)


def work_dir(out: str | Path) -> Path:
    """Where a search keeps its study and trial logs while it runs: ``OUT.tune`` beside the model folder."""
    out = Path(out)
    return out.with_name(out.name + ".tune")


def search(
    config: Config,
    data_dir: str | Path,
    csv,
    out: str | Path,
    settings: TuneSettings | None = None,
    *,
    label_names=None,
    columns: Columns | None = None,
    val=None,
) -> TuneResult:
    """Search the heads' settings from ``config`` on a labelled table; write the best model to ``out``.

    ``csv`` (and ``val``) are what :func:`fuselabel.train.fit` takes; the table is read once. Trials train in
    the frozen regime (a ``regime`` that trains an encoder is refused: its features could not be cached).
    Returns the best settings beside the default's, and the figures of the model written.
    """
    settings = settings or TuneSettings()
    optuna = _optuna()
    if config.regime not in ("auto", "frozen"):
        raise ValueError(f"regime={config.regime!r}: tune searches the heads over cached features; use regime=frozen")
    config = config.replace(regime="frozen")
    records = csv if isinstance(csv, RecordSet) else read_table(csv, columns, need_labels=True)
    out = check_output(out, MODEL, [data_dir, records.path, label_names, val])
    work = check_output(work_dir(out), WORK, [data_dir, records.path, label_names, val], other_outputs=[out])
    with output_locks(out, work):
        (work / "logs").mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(config, records, settings)
        atomic_write_text(work / "run.json", [json.dumps(fingerprint, indent=1, sort_keys=True)])  # its marker
        study = _open_study(optuna, out, work, settings, fingerprint)
        objective = _Objective(config, settings, Path(data_dir), records, work, label_names, val, optuna)
        missing = settings.trials - sum(_counts(study, optuna)[k] for k in ("complete", "pruned"))
        if missing > 0:
            limit = "" if settings.timeout is None else f" within {settings.timeout:g}s"
            log.info(f"tune: {missing} trial(s) to run{limit}; trial logs in {work / 'logs'}")
            study.optimize(
                objective, n_trials=missing, timeout=settings.timeout, catch=(_TrialFailed,), gc_after_trial=True
            )
        result = _finish(study, optuna, objective, out)
        shutil.rmtree(work, ignore_errors=True)
    log.info(result.summary)
    return result
