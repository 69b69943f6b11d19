"""Studies: a grid of training settings, repeated over seeds, tabulated as mean ± std.

``fuselabel experiment --config GRID.yaml`` (or :func:`run_experiment`) trains one
model per planned run with :func:`fuselabel.train.fit` and writes, after every run,

* ``OUT/results.csv``  one row per (run, threshold method): settings, seed, validation F1s, timings, size;
* ``OUT/results.md``   rows grouped by settings: mean ± sample std over seeds, with n and failures;
* ``OUT/results.png``  mean F1 per settings group with std error bars;
* ``OUT/results.json`` the same rows as JSON, plus the resolved grid;
* ``OUT/logs/RUN.log`` what ``fit`` printed and logged (``--verbose`` shows it instead); ``RUN.error.txt`` on failure;
* ``OUT/models/RUN/``  each model folder (``keep_models: false`` trains into a temporary folder instead).

The grid file, and how its runs are merged, shared and checked, is described in
:mod:`fuselabel.experiment_plan`. Runs that differ only in ``threshold_method`` share one training: each
method is reported from that run's alternatives, and its micro/macro F1 are recomputed from the stored
validation probabilities with that method's thresholds.

Note the seed also draws the validation split (``stratified_split(..., config.seed)``), so the std
over seeds covers both training noise and which rows are held out.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import THRESHOLD_METHODS, Config
from .experiment_plan import Plan, Unit, default_out, format_plan, load_grid, plan_runs
from .experiment_results import METRIC_COLUMNS, write_results

__all__ = ["run_experiment", "plan_runs", "load_grid", "format_plan", "default_out"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- running


def _method_metrics(result, config: Config, method: str) -> dict:
    """mean/micro/macro F1 of ``method``'s thresholds on the run's validation probabilities (as the stored model
    predicts them: the same numbers the chosen method was tuned on)."""
    from .metrics import evaluate
    from .runtime import decide

    thr = np.asarray(result.thresholds["alternatives"][method]["thresholds"], np.float32)
    pred = decide(result.val_probs, thr, config.ensure_nonempty)
    report = evaluate(result.val_labels, pred, [str(i) for i in range(pred.shape[1])])
    return {k: report[k] for k in ("mean_f1", "micro_f1", "macro_f1")}


def _rows_for(unit: Unit, plan: Plan, result=None, error: str | None = None, model_dir: str = "") -> list[dict]:
    out = []
    alternatives = result.thresholds.get("alternatives", {}) if result is not None else {}
    for row in unit.rows:
        rec: dict[str, Any] = {"run_id": unit.run_id, "status": "ok"}
        rec.update({k: row.settings.get(k, "") for k in plan.varied})
        rec.update(threshold_method=row.threshold_method, seed=row.seed)
        rec.update({k: None for k in METRIC_COLUMNS})
        rec.update(model_dir=model_dir, error=None)
        problem = unit.error or error or row.error
        if problem is not None or result is None:
            rec.update(status="failed", error=problem or "no result (not rank 0 of a multi-process run?)")
            out.append(rec)
            continue
        for m in THRESHOLD_METHODS:
            if m in alternatives:
                rec[f"val_f1_{m}"] = float(alternatives[m]["val_mean_f1"])
        if row.threshold_method == unit.config.threshold_method:
            rec.update(
                val_mean_f1=float(result.report["mean_f1"]),
                micro_f1=float(result.report["micro_f1"]),
                macro_f1=float(result.report["macro_f1"]),
            )
        else:
            scores = _method_metrics(result, unit.config, row.threshold_method)
            rec.update(
                val_mean_f1=float(alternatives[row.threshold_method]["val_mean_f1"]),
                micro_f1=scores["micro_f1"],
                macro_f1=scores["macro_f1"],
            )
        t = result.timings
        weighted = unit.config.kind == "late" and unit.config.late_combine == "weighted"
        rec.update(
            late_weight=result.thresholds.get("late_weight") if weighted else None,
            val_rows=int(len(result.val_labels)),
            features_s=t.get("features_s"),
            train_s=t.get("train_s"),
            total_s=t.get("total_s"),
            size_mb=result.size_bytes / 1e6,
        )
        out.append(rec)
    return out


@contextlib.contextmanager
def logged_to(path: Path):
    """What a run prints, and the library's log records (INFO and up), go to the file ``path`` alone while it
    trains, then as before."""
    package = logging.getLogger("fuselabel")
    stream = open(path, "w")  # closed last: the handler writes to it until it is removed
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = package.level, package.propagate, list(package.handlers)
    for other in saved[2]:  # alone: the command line's own handler would write every line a second time
        package.removeHandler(other)
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        package.removeHandler(handler)
        for other in saved[2]:
            package.addHandler(other)
        package.setLevel(saved[0])
        package.propagate = saved[1]
        stream.close()


def _model_target(stack: contextlib.ExitStack, out: Path, unit: Unit, keep: bool) -> tuple[Path, str]:
    """Where a run's model goes (and the folder the results name): OUT/models/RUN, or a temporary folder."""
    if not keep:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuselabel-exp-"))) / "model", ""
    target = out / "models" / unit.run_id
    if target.exists():  # the study's own earlier model for this run
        shutil.rmtree(target)
    return target, str(target)


def _train_unit(unit: Unit, plan: Plan, out: Path, images, csv_path, verbose: bool, on_result) -> tuple[list, str]:
    """Train one planned run; (its result rows, the error or ''). A failure is recorded, never raised."""
    from . import train as train_module

    result, error = None, ""
    with contextlib.ExitStack() as stack:
        target, model_dir = _model_target(stack, out, unit, plan.keep_models)
        try:
            if not verbose:
                stack.enter_context(logged_to(out / "logs" / f"{unit.run_id}.log"))
            result = train_module.fit(
                unit.config, images, csv_path, target, label_names=plan.label_names, progress=verbose
            )
            if result is not None and on_result is not None:
                on_result(unit.run_id, unit.config, result)
        except Exception as err:  # a failing run is recorded, the study goes on
            error = f"{type(err).__name__}: {err}".strip()
            (out / "logs" / f"{unit.run_id}.error.txt").write_text(traceback.format_exc())
        try:
            rows = _rows_for(unit, plan, result, error or None, model_dir if result is not None and not error else "")
        except Exception as err:  # scoring the alternatives failed: still a recorded failure, not a crash
            error = f"{type(err).__name__}: {err}".strip()
            (out / "logs" / f"{unit.run_id}.error.txt").write_text(traceback.format_exc())
            rows = _rows_for(unit, plan, None, error)
    return rows, error


def run_experiment(
    grid_path_or_dict: str | Path | dict,
    out_dir: str | Path,
    data: str | Path | None = None,
    csv: str | Path | None = None,
    *,
    overrides: dict | None = None,
    verbose: bool = False,
    on_result: Callable | None = None,
) -> list[dict]:
    """Train every planned run, writing results after each one; returns the result rows.

    Args:
        grid_path_or_dict: a grid YAML file or the same content as a dict (see :mod:`fuselabel.experiment_plan`).
        out_dir: where results.{csv,md,png,json}, logs/ and models/ go.
        data, csv: image folder (or data-set folder) and CSV; default the grid's (one of the two must name the data).
        overrides: settings applied to every run after the grid's (``--set KEY=VALUE``).
        verbose: show what ``fit`` prints and logs (and its progress bars) instead of writing it to logs/RUN.log.
        on_result: called as ``on_result(run_id, config, result)`` after each successful training.
    """
    from .records import resolve_data

    plan = plan_runs(grid_path_or_dict, overrides)
    images, csv_path = resolve_data(str(data) if data else plan.data, str(csv) if csv else plan.csv)
    out = Path(out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in plan.spec.items() if not k.startswith("_")}
    rows: list[dict] = []
    total = plan.n_trainings
    logger.info(
        "experiment %s: %d training(s), %d result row(s); data %s, csv %s; results in %s",
        *(plan.name, total, plan.n_rows, images, csv_path, out),
    )
    done = 0
    for unit in plan.units:
        if not unit.trains:
            rows += _rows_for(unit, plan)
            logger.warning("[--/%d] %s: not run (%s)", total, unit.run_id, unit.error or unit.rows[0].error)
            write_results(out, plan, rows, spec)
            continue
        done, start = done + 1, time.time()
        new, error = _train_unit(unit, plan, out, images, csv_path, verbose, on_result)
        rows += new
        write_results(out, plan, rows, spec)
        took = time.time() - start
        if error:
            logger.warning(
                "[%d/%d] %s: FAILED after %.0fs: %s", done, total, unit.run_id, took, error.splitlines()[0][:300]
            )
        else:
            scores = ", ".join(f"{r['threshold_method']} {r['val_mean_f1']:.4f}" for r in new if r["status"] == "ok")
            logger.info("[%d/%d] %s: val mean F1 %s in %.0fs", done, total, unit.run_id, scores, took)
        gc.collect()  # each run's model and features go before the next one loads its own
    failed = sum(r["status"] != "ok" for r in rows)
    logger.info("experiment %s: %d ok, %d failed; see %s", plan.name, len(rows) - failed, failed, out / "results.md")
    return rows
