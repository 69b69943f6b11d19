"""Studies: a grid of training settings, repeated over seeds, tabulated as mean ± std.

``fuselabel experiment --config GRID.yaml`` (or :func:`run_experiment`) trains one
model per planned run with :func:`fuselabel.train.fit` and writes, after every run,

* ``OUT/results.csv``  one row per (run, threshold method): settings, seed, validation F1s, timings, size;
* ``OUT/results.md``   rows grouped by settings: mean ± sample std over seeds, with n and failures;
* ``OUT/results.png``  mean F1 per settings group with std error bars;
* ``OUT/results.json`` the same rows as JSON, plus the resolved grid;
* ``OUT/logs/RUN.log`` what ``fit`` printed and logged (``--verbose`` shows it instead); ``RUN.error.txt`` on failure;
* ``OUT/models/RUN/``  each model folder (``keep_models: false`` trains into a temporary folder instead).

A grid file::

    name: ablation                  # default out folder runs/<name>
    data: datasets/comp5329         # as --data (needed here or on the command line; relative: to the cwd)
    csv: datasets/comp5329/train.csv   # optional, as --csv
    base: {preset: cpu, epochs: 20} # settings shared by every run; preset first, then the keys given
    grid:                           # cartesian product; every key is a Config key, every value a list
      kind: [image, text, early, late]
      threshold_method: [global, per_class]
    runs:                           # optional explicit setting dicts, added after the product
      - {kind: late, late_combine: union}
    seeds: [0, 1, 2]                # every run is repeated per seed (default: the base seed)
    keep_models: true

A run's settings are merged as: the base preset, the run's own ``preset`` (if the grid varies it),
the base keys, the run's keys, the command line's ``--set KEY=VALUE`` overrides, and finally the seed.
``seed`` itself belongs in ``seeds:``. Unknown keys anywhere stop the study before it starts (a typo
should not cost a night of failed runs); an invalid *value* only fails the runs that use it: the
failure is recorded with its error and the study goes on. Strings that look like numbers are turned
into numbers for numeric settings, so PyYAML's ``1e-4`` (a string in YAML 1.1) means 0.0001.

Note the seed also draws the validation split (``stratified_split(..., config.seed)``), so the std
over seeds covers both training noise and which rows are held out.

Threshold method is a tuning choice, not a training one: training (and checkpoint selection, which
follows mean F1 at a tuned global threshold) never reads ``threshold_method``, and ``fit`` tunes all
three rules on the validation rows anyway (``thresholds["alternatives"]``). So runs that differ only
in ``threshold_method`` share one training: each method is reported from that run's alternatives,
and its micro/macro F1 are recomputed from the stored validation probabilities with that method's
thresholds. The model folder keeps the first method listed. Likewise settings that cannot matter for
a run don't cause a retrain and show as ``-``: ``late_combine`` and ``late_weight`` outside
``kind: late`` (``late_weight`` also outside ``late_combine: weighted``), and the image settings for
``kind: text``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import PRESETS, THRESHOLD_METHODS, Config, load_yaml
from .experiment_results import METRIC_COLUMNS, NA, write_results

__all__ = ["run_experiment", "plan_runs", "load_grid", "format_plan", "default_out"]

logger = logging.getLogger(__name__)

GRID_KEYS = ("name", "description", "data", "csv", "label_names", "base", "grid", "runs", "seeds", "keep_models")


# ---------------------------------------------------------------- the grid file


def load_grid(grid: str | Path | dict) -> dict:
    """The grid as a dict, checked for unknown top-level keys and malformed sections."""
    if isinstance(grid, dict):
        spec, source = dict(grid), "grid"
        spec.setdefault("name", "experiment")
    else:
        spec, source = load_yaml(grid), str(grid)
        spec.setdefault("name", Path(grid).stem)
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; a grid file has {', '.join(GRID_KEYS)}")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise ValueError(f"{source}: base: must be a mapping of settings")
    product = spec.get("grid") or {}
    if not isinstance(product, dict):
        raise ValueError(f"{source}: grid: must map each setting to a list of values")
    for key, values in product.items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"{source}: grid.{key} must be a non-empty list of values (put a fixed setting under base:)"
            )
    runs = spec.get("runs") or []
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError(f"{source}: runs: must be a list of setting mappings")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds)):
        raise ValueError(f"{source}: seeds: must be a non-empty list of integers")
    known = {f.name for f in dataclasses.fields(Config)} | {"preset"}
    for where, keys in [("base", base), ("grid", product)] + [(f"runs[{i}]", r) for i, r in enumerate(runs)]:
        bad = sorted(set(keys) - known)
        if bad:
            raise ValueError(f"{source}: {where}: unknown setting(s) {', '.join(bad)}")
        if "seed" in keys and where != "base":
            raise ValueError(f"{source}: {where}: vary the seed with seeds: [...], not as a setting")
    spec["base"], spec["grid"], spec["runs"] = base, product, runs
    spec["_source"] = source
    return spec


_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any) -> Any:
    """'1e-4' -> 1e-4 for numeric settings (PyYAML reads 1e-4 without a dot as a string)."""
    kind = _FIELD_TYPES.get(key, "")
    if isinstance(value, str):
        try:
            if kind.startswith("float"):
                return float(value)
            if kind.startswith("int"):
                return int(value)
        except ValueError:
            pass
    return value


def _merge(base: dict, settings: dict, overrides: dict, seed: int) -> dict:
    values: dict = {}
    for preset in (base.get("preset"), settings.get("preset")):
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
            values.update(PRESETS[preset])
    for part in (base, settings, overrides):
        values.update({k: _coerce(k, v) for k, v in part.items() if k != "preset"})
    values["seed"] = seed
    return values


def _irrelevant(values: dict) -> set[str]:
    """Settings that cannot change what this run trains (see the module docstring)."""
    kind = values.get("kind", Config.kind)
    combine = values.get("late_combine", Config.late_combine)
    out = set()
    if kind != "late":
        out |= {"late_combine", "late_weight"}
    elif combine != "weighted":
        out.add("late_weight")
    if kind == "text":
        out |= {"image_pool", "image_layers", "image_tokens", "image_crop_pct"}
    return out


def _display(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _slug(text: str, limit: int = 96) -> str:
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")
    if len(slug) > limit:
        import hashlib

        slug = slug[: limit - 9] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return slug


@dataclass
class Row:
    """One line of the results: a threshold method reported for one trained (or failed) run."""

    settings: dict  # varied key -> display value
    seed: int
    threshold_method: str
    error: str | None = None


@dataclass
class Unit:
    """One training: a config and the result rows it serves."""

    run_id: str
    config: Config | None
    settings: dict
    seed: int
    rows: list[Row] = field(default_factory=list)
    error: str | None = None  # the config itself is invalid: nothing to train

    @property
    def trains(self) -> bool:
        return self.config is not None and self.error is None and any(r.error is None for r in self.rows)


@dataclass
class Plan:
    name: str
    varied: list[str]
    units: list[Unit]
    data: str | None
    csv: str | None
    label_names: str | None
    keep_models: bool
    spec: dict

    @property
    def n_rows(self) -> int:
        return sum(len(u.rows) for u in self.units)

    @property
    def n_trainings(self) -> int:
        return sum(1 for u in self.units if u.trains)


def plan_runs(grid: str | Path | dict, overrides: dict | None = None) -> Plan:
    """Expand a grid into trainings (units) and the result rows each one reports."""
    spec = load_grid(grid)
    overrides = {k: v for k, v in (overrides or {}).items()}
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(Config)})
    if bad:
        raise ValueError(f"--set: unknown setting(s) {', '.join(bad)}")
    if "seed" in overrides:
        raise ValueError("--set seed=...: vary the seed with the grid's seeds: [...]")
    base, product, explicit = spec["base"], spec["grid"], spec["runs"]
    # threshold_method is an evaluation axis: it multiplies result rows, never trainings (module docstring),
    # and applies to the explicit runs too unless a run names its own method.
    methods_axis = product.get("threshold_method") or [None]
    keys = [k for k in product if k != "threshold_method"]
    settings_list = [dict(zip(keys, combo)) for combo in itertools.product(*(product[k] for k in keys))] if keys else []
    settings_list += [dict(r) for r in explicit]
    if not settings_list:
        settings_list = [{}]
    varied: list[str] = []
    for s in [dict.fromkeys(keys)] + explicit:
        for key in s:
            if key not in varied and key != "threshold_method":
                varied.append(key)
    seeds = spec.get("seeds") or [int(base.get("seed", Config.seed))]

    defaults = Config().to_dict()
    units: dict[str, Unit] = {}
    seen_rows: set = set()
    counter = 0
    expanded = []
    for settings in settings_list:
        methods = [settings["threshold_method"]] if "threshold_method" in settings else methods_axis
        for seed in seeds:
            for method in methods:
                expanded.append(({**settings, "threshold_method": method} if method is not None else settings, seed))
    for settings, seed in expanded:
        try:
            values = _merge(base, settings, overrides, seed)
        except ValueError as err:
            values, merge_error = {**base, **settings, "seed": seed}, f"ValueError: {err}"
        else:
            merge_error = None
        skip = _irrelevant(values)
        shown = {k: NA if k in skip else _display(values.get(k, defaults.get(k))) for k in varied if k != "preset"}
        if "preset" in varied:
            shown = {"preset": _display(settings.get("preset", base.get("preset"))), **shown}
        method = values.get("threshold_method", Config.threshold_method)
        row_key = (json.dumps(shown, sort_keys=True), seed, str(method))
        if row_key in seen_rows:
            continue  # the same run and method, reached twice (e.g. late_combine for kind: image)
        seen_rows.add(row_key)
        row = Row(shown, seed, str(method))
        config, error = None, merge_error
        if error is None:
            try:
                config = Config.from_dict({**values, "threshold_method": THRESHOLD_METHODS[0]}, source="run")
            except (ValueError, TypeError) as err:
                error = f"{type(err).__name__}: {err}"
        if config is not None and method not in THRESHOLD_METHODS:
            row.error = f"ValueError: threshold_method={method!r} is not one of {', '.join(THRESHOLD_METHODS)}"
        if config is None:  # one failed 'training' for all of its threshold methods
            key = "invalid:" + json.dumps(
                {k: v for k, v in values.items() if k != "threshold_method"}, sort_keys=True, default=str
            )
        else:
            tkey = config.to_dict()
            tkey.pop("threshold_method")
            for name in skip:
                tkey[name] = None
            key = json.dumps(tkey, sort_keys=True, default=str)
        unit = units.get(key)
        if unit is None:
            counter += 1
            label = "_".join(f"{k}={v}" for k, v in shown.items() if v != NA)
            run_id = _slug(f"{counter:03d}_{label}_seed={seed}" if label else f"{counter:03d}_seed={seed}")
            unit = units[key] = Unit(run_id, config, shown, seed, error=error)
        if config is not None and row.error is None and not any(r.error is None for r in unit.rows):
            unit.config = config.replace(threshold_method=method)  # the model folder keeps this method
        unit.rows.append(row)
    varied = (["preset"] if "preset" in varied else []) + [k for k in varied if k != "preset"]
    return Plan(
        spec["name"],
        varied,
        list(units.values()),
        spec.get("data"),
        spec.get("csv"),
        spec.get("label_names"),
        bool(spec.get("keep_models", True)),
        spec,
    )


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
def _logs_to(stream):
    """The library's log records (INFO and up) go to ``stream`` alone while a run trains, then as before."""
    package = logging.getLogger("fuselabel")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = package.level, package.propagate, list(package.handlers)
    for other in saved[2]:  # alone: the command line's own handler would write every line a second time
        package.removeHandler(other)
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        for other in saved[2]:
            package.addHandler(other)
        package.setLevel(saved[0])
        package.propagate = saved[1]


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
        grid_path_or_dict: a grid YAML file or the same content as a dict (see the module docstring).
        out_dir: where results.{csv,md,png,json}, logs/ and models/ go.
        data, csv: image folder (or data-set folder) and CSV; default the grid's (one of the two must name the data).
        overrides: settings applied to every run after the grid's (``--set KEY=VALUE``).
        verbose: show what ``fit`` prints and logs (and its progress bars) instead of writing it to logs/RUN.log.
        on_result: called as ``on_result(run_id, config, result)`` after each successful training.
    """
    from . import train as train_module

    plan = plan_runs(grid_path_or_dict, overrides)
    from .records import resolve_data

    images, csv_path = resolve_data(str(data) if data else plan.data, str(csv) if csv else plan.csv)
    out = Path(out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in plan.spec.items() if not k.startswith("_")}
    rows: list[dict] = []
    total = plan.n_trainings
    logger.info(
        "experiment %s: %d training(s), %d result row(s); data %s, csv %s; results in %s",
        plan.name,
        total,
        plan.n_rows,
        images,
        csv_path,
        out,
    )
    done = 0
    for unit in plan.units:
        if not unit.trains:
            rows += _rows_for(unit, plan)
            logger.warning("[--/%d] %s: not run (%s)", total, unit.run_id, unit.error or unit.rows[0].error)
            write_results(out, plan, rows, spec)
            continue
        done += 1
        start = time.time()
        result, error, model_dir = None, None, ""
        log_path = out / "logs" / f"{unit.run_id}.log"
        with contextlib.ExitStack() as stack:
            if plan.keep_models:
                target = out / "models" / unit.run_id
                if target.exists():
                    shutil.rmtree(target)
                model_dir = str(target)
            else:
                target = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuselabel-exp-"))) / "model"
            try:
                log = stack.enter_context(open(log_path, "w")) if not verbose else None
                if log is not None:
                    stack.enter_context(contextlib.redirect_stdout(log))
                    stack.enter_context(_logs_to(log))
                result = train_module.fit(
                    unit.config, images, csv_path, target, label_names=plan.label_names, progress=verbose
                )
                if result is not None and on_result is not None:
                    on_result(unit.run_id, unit.config, result)
            except Exception as err:  # a failing run is recorded, the study goes on
                error = f"{type(err).__name__}: {err}".strip()
                (out / "logs" / f"{unit.run_id}.error.txt").write_text(traceback.format_exc())
                model_dir = ""
            try:
                new = _rows_for(unit, plan, result, error, model_dir if result is not None else "")
            except Exception as err:  # scoring the alternatives failed: still a recorded failure, not a crash
                error = f"{type(err).__name__}: {err}".strip()
                (out / "logs" / f"{unit.run_id}.error.txt").write_text(traceback.format_exc())
                new = _rows_for(unit, plan, None, error)
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
        del result
        gc.collect()
    failed = sum(r["status"] != "ok" for r in rows)
    logger.info("experiment %s: %d ok, %d failed; see %s", plan.name, len(rows) - failed, failed, out / "results.md")
    return rows


def default_out(plan: Plan) -> Path:
    """The results folder when none is given: runs/<grid name>."""
    return Path("runs") / _slug(plan.name)


def format_plan(plan: Plan) -> str:
    lines = [
        f"experiment {plan.name}: {plan.n_trainings} training(s), {plan.n_rows} result row(s)"
        f"{'' if plan.keep_models else ' (models not kept)'}"
    ]
    for u in plan.units:
        methods = ", ".join(r.threshold_method + (" (invalid)" if r.error else "") for r in u.rows if r.seed == u.seed)
        state = f"  INVALID: {u.error}" if u.error else ""
        lines.append(f"  {u.run_id}  [{methods}]{state}")
    return "\n".join(lines)
