"""A study's plan: the grid file read and checked, expanded into trainings and the result rows each one reports.

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

Threshold method is a tuning choice, not a training one: training (and checkpoint selection, which
follows mean F1 at a tuned global threshold) never reads ``threshold_method``, and ``fit`` tunes all
three rules on the validation rows anyway (``thresholds["alternatives"]``). So runs that differ only
in ``threshold_method`` share one training (one :class:`Unit` with a :class:`Row` per method). The
model folder keeps the first method listed. Likewise settings that cannot matter for a run don't
cause a retrain and show as ``-``: ``late_combine`` and ``late_weight`` outside ``kind: late``
(``late_weight`` also outside ``late_combine: weighted``), and the image settings for ``kind: text``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PRESETS, THRESHOLD_METHODS, Config, load_yaml
from .experiment_results import NA

__all__ = ["plan_runs", "load_grid", "format_plan", "default_out", "Plan", "Unit", "Row"]

GRID_KEYS = ("name", "description", "data", "csv", "label_names", "base", "grid", "runs", "seeds", "keep_models")
_SETTINGS = frozenset(f.name for f in dataclasses.fields(Config))


# ---------------------------------------------------------------- the grid file


def _check_sections(spec: dict, source: str) -> tuple[dict, dict, list]:
    """(base, grid, runs) of a grid file, each of the right shape, or a ValueError naming the section."""
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
    return base, product, runs


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
    base, product, runs = _check_sections(spec, source)
    known = _SETTINGS | {"preset"}
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


def slug(text: str, limit: int = 96) -> str:
    """``text`` as a file name: safe characters only, long ones cut and told apart by a hash."""
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")
    if len(name) > limit:
        name = name[: limit - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


# ---------------------------------------------------------------- the plan


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
    """A study planned: its trainings (units) in order, the settings its table varies, where its data is."""

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


def _checked_overrides(overrides: dict | None) -> dict:
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - _SETTINGS)
    if bad:
        raise ValueError(f"--set: unknown setting(s) {', '.join(bad)}")
    if "seed" in overrides:
        raise ValueError("--set seed=...: vary the seed with the grid's seeds: [...]")
    return overrides


def _expanded(spec: dict) -> tuple[list[tuple[dict, int]], list[str]]:
    """Every (settings, seed) the grid asks for, one per threshold method, and the settings it varies.

    threshold_method is an evaluation axis: it multiplies result rows, never trainings (module docstring),
    and applies to the explicit runs too unless a run names its own method.
    """
    product, explicit = spec["grid"], spec["runs"]
    methods_axis = product.get("threshold_method") or [None]
    keys = [k for k in product if k != "threshold_method"]
    settings_list = [dict(zip(keys, combo)) for combo in itertools.product(*(product[k] for k in keys))] if keys else []
    settings_list += [dict(r) for r in explicit]
    varied: list[str] = []
    for s in [dict.fromkeys(keys)] + explicit:
        varied += [k for k in s if k not in varied and k != "threshold_method"]
    seeds = spec.get("seeds") or [int(spec["base"].get("seed", Config.seed))]
    expanded = []
    for settings in settings_list or [{}]:
        methods = [settings["threshold_method"]] if "threshold_method" in settings else methods_axis
        for seed in seeds:
            for method in methods:
                expanded.append(({**settings, "threshold_method": method} if method is not None else settings, seed))
    return expanded, varied


class _Planner:
    """Places each (settings, seed) into the training it shares with others, or a new one."""

    def __init__(self, base: dict, overrides: dict, varied: list[str]):
        self.base, self.overrides, self.varied = base, overrides, varied
        self.defaults = Config().to_dict()
        self.units: dict[str, Unit] = {}
        self.seen_rows: set = set()

    def _shown(self, values: dict, settings: dict, skip: set[str]) -> dict:
        shown = {
            k: NA if k in skip else _display(values.get(k, self.defaults.get(k))) for k in self.varied if k != "preset"
        }
        if "preset" in self.varied:
            shown = {"preset": _display(settings.get("preset", self.base.get("preset"))), **shown}
        return shown

    @staticmethod
    def _training_key(config: Config | None, values: dict, skip: set[str]) -> str:
        """What decides the training: every setting but the threshold method and those that cannot matter."""
        if config is None:  # one failed 'training' for all of its threshold methods
            return "invalid:" + json.dumps(
                {k: v for k, v in values.items() if k != "threshold_method"}, sort_keys=True, default=str
            )
        key = config.to_dict()
        key.pop("threshold_method")
        key.update(dict.fromkeys(skip))
        return json.dumps(key, sort_keys=True, default=str)

    def add(self, settings: dict, seed: int) -> None:
        try:
            values, error = _merge(self.base, settings, self.overrides, seed), None
        except ValueError as err:
            values, error = {**self.base, **settings, "seed": seed}, f"ValueError: {err}"
        skip = _irrelevant(values)
        shown = self._shown(values, settings, skip)
        method = values.get("threshold_method", Config.threshold_method)
        row_key = (json.dumps(shown, sort_keys=True), seed, str(method))
        if row_key in self.seen_rows:
            return  # the same run and method, reached twice (e.g. late_combine for kind: image)
        self.seen_rows.add(row_key)
        row, config = Row(shown, seed, str(method)), None
        if error is None:
            try:
                config = Config.from_dict({**values, "threshold_method": THRESHOLD_METHODS[0]}, source="run")
            except (ValueError, TypeError) as err:
                error = f"{type(err).__name__}: {err}"
        if config is not None and method not in THRESHOLD_METHODS:
            row.error = f"ValueError: threshold_method={method!r} is not one of {', '.join(THRESHOLD_METHODS)}"
        key = self._training_key(config, values, skip)
        unit = self.units.get(key)
        if unit is None:
            label = "_".join(f"{k}={v}" for k, v in shown.items() if v != NA)
            number = f"{len(self.units) + 1:03d}"
            unit = self.units[key] = Unit(
                slug(f"{number}_{label}_seed={seed}" if label else f"{number}_seed={seed}"),
                config,
                shown,
                seed,
                error=error,
            )
        if config is not None and row.error is None and not any(r.error is None for r in unit.rows):
            unit.config = config.replace(threshold_method=method)  # the model folder keeps this method
        unit.rows.append(row)


def plan_runs(grid: str | Path | dict, overrides: dict | None = None) -> Plan:
    """Expand a grid into trainings (units) and the result rows each one reports."""
    spec = load_grid(grid)
    expanded, varied = _expanded(spec)
    planner = _Planner(spec["base"], _checked_overrides(overrides), varied)
    for settings, seed in expanded:
        planner.add(settings, seed)
    varied = (["preset"] if "preset" in varied else []) + [k for k in varied if k != "preset"]
    return Plan(
        spec["name"],
        varied,
        list(planner.units.values()),
        spec.get("data"),
        spec.get("csv"),
        spec.get("label_names"),
        bool(spec.get("keep_models", True)),
        spec,
    )


def default_out(plan: Plan) -> Path:
    """The results folder when none is given: runs/<grid name>."""
    return Path("runs") / slug(plan.name)


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
