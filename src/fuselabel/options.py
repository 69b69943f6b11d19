"""Each command's own options, as typed groups (``fuselabel.flags`` makes the flags): one field, one flag, with one
meaning in every command that takes it. The settings of a model, its run and where it runs are ``Config``'s; the
service's are ``ServeSettings``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .config import Config, NonNegative, Positive, ServeSettings, TuneSettings, setting_groups
from .flags import add_group, group_values
from .presets import PRESETS

Split = Literal["all", "val", "train"]


def option(default, description: str, **extra):
    """A command option's field: default, ``--help`` line, and what ``fuselabel.flags`` reads (``aliases``,
    ``positional``, ``metavar``, ``const``, ``found``: what is used when it is not given, for ``--help``)."""
    return Field(default, description=description, json_schema_extra=extra or None)


def unset(metavar: str, description: str, **extra):
    """An option left out unless given (None), whose value reads as ``metavar`` in ``--help``."""
    return option(None, description, metavar=metavar, **extra)


def _table(description: str, found: str, alias: str):
    """A table option (``TABLE``), also spelled ``alias``, whose default is ``found`` when left out."""
    return unset("TABLE", description, found=found, aliases=(alias,))


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelFolder(Options):
    """the model"""

    model_dir: str = option(
        ..., "a model folder, or an exported ONNX folder (predict and info run it without PyTorch)", positional=True
    )


class ModelFolders(Options):
    """the models"""

    model_dir: list[str] = option(..., "a model folder; two or more: a side-by-side comparison", positional=True)


class TableOptions(Options):
    """the rows: data folder, table and columns (columns default to those found in the table; the course's
    ImageID, Caption, Labels)"""

    data: Optional[str] = unset("DIR", "image folder, or a folder with data/ and the table")
    csv: Optional[str] = _table(
        "the table: CSV, TSV, JSON Lines, Parquet or the course CSV",
        "DATA/train.csv; predict: DATA/test.csv",
        "--table",
    )
    images: Optional[str] = unset(
        "DIR", "folder the table's photo paths are relative to", found="DATA/data if it holds them, else DATA"
    )
    delimiter: Optional[Literal[",", ";", "tab", "|"]] = option(
        None, "field delimiter of a CSV or text table: , ; tab |", found="found by sniffing the file"
    )
    sheet: Optional[str] = option(None, "an .xlsx table's sheet: its name or index", found="the first")
    image_col: Optional[str] = unset("COL", "column of photo paths (relative to the image folder, or absolute)")
    text_col: Optional[list[str]] = unset("COL", "text column; repeat for several (joined with a line break)")
    label_col: Optional[str] = unset("COL", "column of labels: a list, or labels joined by --label-sep")
    label_sep: Optional[str] = unset(
        "SEP",
        "separator inside the label column: '|', ';', ',', 'space', or 'none' for one label",
        found="found from the data",
    )
    id_col: Optional[str] = unset("COL", "column naming each row in outputs", found="the photo column")
    label_names: Optional[str] = unset(
        "FILE",
        "names of label ids: two columns (id, name) of a CSV/TSV, or a JSON object",
        found="label_names.csv beside the table or in DATA",
    )
    val_csv: Optional[str] = _table(
        "validation rows, in the training table's format", "a stratified --val-fraction", "--val-table"
    )
    split_col: Optional[str] = unset(
        "COL", "column saying train, val or test for each row (test rows are left out of training)"
    )


ROWS = ("data", "csv", "images", "delimiter", "sheet", "image_col", "text_col", "label_col", "label_sep", "id_col")


class StartOptions(Options):
    """the settings a run starts from"""

    out: str = option(..., "model folder to write", metavar="MODEL")
    config: Optional[str] = unset("YAML", "YAML file of settings (keys as in config.json)")
    # refused by build_config, which names the presets, rather than by the parser's usage message
    preset: Optional[str] = option(
        None,
        "named settings over the defaults, listed above (a YAML file, flags and --set go over them)",
        choices={name: p.description for name, p in PRESETS.items()},
        metavar="NAME",
    )
    set: Optional[list[str]] = unset(
        "KEY=VALUE", "any setting by its key, e.g. --set hidden_dim=1024 (the same as its flag; repeat it)"
    )


class TrainOptions(StartOptions):
    """training"""

    pretrained: bool = option(
        True, "start both encoders from pretrained weights (no: --no-image-pretrained --no-text-pretrained)"
    )
    work_dir: Optional[str] = unset("DIR", "checkpoints and logs, removed once the model is saved", found="OUT.work")
    resume: bool = option(False, "continue the run interrupted in the work folder (same settings and data)")


class Quiet(Options):
    """output"""

    quiet: bool = option(False, "no progress bars or notices; only the summary, warnings and errors")


class InferenceOptions(Options):
    """prediction"""

    device: Optional[str] = option(
        None,
        "where one process runs the model: cpu, cuda, cuda:1 ...; --devices spreads the rows over several processes "
        "instead",
        found="cuda when present",
    )
    strict: bool = option(False, "a row without a usable photo or caption is an error (no: predicted from the other)")


class PredictOutputs(Options):
    """prediction outputs"""

    out: str = option(..., "predictions to write: .csv, .tsv, .jsonl or .parquet", metavar="FILE")
    proba: Optional[str] = unset("FILE", "also write per-label probabilities (and each row's inputs) to this CSV")
    chunk_size: Positive = option(
        512, "rows per chunk, a multiple of 64 (bounds memory; finished chunks survive a kill)"
    )


class ScoreOptions(Options):
    """scoring"""

    split: Split = option("all", "only the rows on this side of the model's own split (split.json)")
    json_report: Optional[str] = option(
        None,
        "the report as JSON, written to FILE (without FILE: printed instead of the table)",
        metavar="FILE",
        const="-",
        aliases=("--json",),
    )


class ReportOutput(Options):
    """the page"""

    out: str = option(
        ..., "the HTML file to write (a folder an earlier report wrote gets its index.html)", metavar="HTML"
    )


class ExperimentOptions(Options):
    """the grid"""

    config: str = option(..., "grid YAML (name, base, grid, runs, seeds, keep_models)", metavar="YAML")
    out: Optional[str] = unset("DIR", "results folder", found="runs/<grid name>")
    set: Optional[list[str]] = unset(
        "KEY=VALUE", "a setting for every run, after the grid's (e.g. --set epochs=1; repeat it)"
    )
    dry_run: bool = option(False, "list the planned runs and exit")
    verbose: bool = option(False, "show fit's output instead of writing it to OUT/logs/")


class ConvertOptions(Options):
    """the new folder"""

    out: str = option(..., "new model folder (may equal MODEL_DIR)", metavar="MODEL")


class ExportOptions(Options):
    """the ONNX folder"""

    out: Optional[str] = unset("DIR", "folder to write", found="MODEL_DIR/onnx")
    format: Literal["onnx"] = option("onnx", "graph format (only onnx so far)")
    int8: bool = option(False, "int8 weights for the text encoder and head (dynamic)")
    check_rows: NonNegative = option(8, "synthetic rows compared with PyTorch (0: none)")


def resolve_data(data: str | None, csv: str | None, default_csv: str = "train.csv") -> tuple[Path, Path]:
    from .records import resolve_data as find_data

    return find_data(data, csv, default_csv)  # a ValueError names what is missing; main exits with status 2


def columns(args, split: bool = False):
    """Which column is which, as the table flags say (None: found from the table)."""
    from .tables import Columns

    return Columns.of(
        args.image_col,
        args.text_col,
        args.label_col,
        args.id_col,
        getattr(args, "split_col", None) if split else None,
        args.label_sep,
    )


def image_dir(args, images: Path, records) -> Path:
    """--images, else the data folder's data/ or the folder itself, whichever holds the table's photos."""
    from .tables import image_root

    if getattr(args, "images", None):
        return Path(args.images)
    return image_root(Path(args.data), images, records)


def reader_options(args) -> dict:
    """The reader options given (--delimiter, --sheet), as the table readers take them."""
    return {k: v for k in ("delimiter", "sheet") if (v := getattr(args, k, None)) is not None}


def read_rows(args, csv, columns, **keywords):
    """The whole table, read with the reader options given."""
    from .tables import read_table

    return read_table(csv, columns, **keywords, **reader_options(args))


# The where-it-runs settings every command that loads a model takes; predict adds those that spread it over processes.
RUNNING = ("feature_engine", "num_workers", "cache_dir")
SPREAD = ("accelerator", "devices", "num_nodes", "strategy")
ONE_PROCESS = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}  # predict's own defaults
_SETTING_TITLES = {
    "model": "settings: what the model is (saved in the model folder's config.json)",
    "run": "settings: how it trains (saved in run.json)",
    "runtime": "settings: where it runs (never saved)",
}


def add_settings(p: argparse.ArgumentParser, keys=None, **keywords) -> None:
    """A flag for every setting (or those in ``keys``), grouped as in config.py: --image-size sets image_size, the
    same in every command that takes it."""
    for group, title in _SETTING_TITLES.items():
        members = [k for k, g in setting_groups().items() if g == group and (keys is None or k in keys)]
        if members:
            add_group(p, Config, keys=members, title=title, **keywords)


_ROWS = (TableOptions, {"keys": ROWS, "required": ("data",)})
_GRID_ROWS = {
    "keys": ("data", "csv"),
    "shown_defaults": {"data": "the grid's", "csv": "the grid's, then DATA/train.csv"},
}
# Each command: its help line, its option groups (a group, or (group, add_group's keywords)), and the settings it
# takes (add_settings' keywords; None: none).
COMMAND_OPTIONS: dict[str, tuple[str, tuple, dict | None]] = {
    "train": ("train a model and write its folder", ((TableOptions, {"required": ("data",)}), TrainOptions, Quiet), {}),
    "predict": (
        "write each row's labels (Kaggle ImageID,Labels for course files)",
        (ModelFolder, _ROWS, PredictOutputs, InferenceOptions, Quiet),
        {"keys": (*RUNNING, *SPREAD), "shown_defaults": ONE_PROCESS},
    ),
    "evaluate": (
        "metrics of a model folder on labelled rows",
        (ModelFolder, _ROWS, ScoreOptions, InferenceOptions, Quiet),
        {"keys": RUNNING},
    ),
    "inspect": (
        "what the reader makes of a table and image folder",
        (
            (TableOptions, {"keys": (*ROWS, "label_names"), "required": ("data",)}),
            (ScoreOptions, {"keys": ("json_report",)}),
        ),
        None,
    ),
    "info": ("size, parts and settings of a model folder", (ModelFolder,), None),
    "experiment": (
        "train a grid of settings over seeds; tabulate mean ± std (the grid file is described in fuselabel.experiment)",
        (ExperimentOptions, (TableOptions, _GRID_ROWS)),
        None,
    ),
    "convert": (
        "re-save a model folder with other weight storage (fp32, fp16, int8)",
        (ModelFolder, ConvertOptions),
        {"keys": ("save_dtype", "max_size_mb"), "required": ("save_dtype",)},
    ),
    "export": (
        "write ONNX graphs of a model folder (image encoder, text encoder, head)",
        (ModelFolder, ExportOptions),
        None,
    ),
    "tune": (
        "search the heads' settings over cached features (Optuna); write the best model (the study is kept in it)",
        ((TableOptions, {"required": ("data",)}), StartOptions, (TuneSettings, {"title": "the search"}), Quiet),
        None,
    ),
    "serve": (
        "a prediction service and web page for a model folder (FastAPI, uvicorn)",
        (ModelFolder, (ServeSettings, {"title": "the service"})),
        {"keys": RUNNING},
    ),
    "report": (
        "one HTML file about a model on labelled rows, or comparing several models",
        (ModelFolders, _ROWS, ReportOutput, (ScoreOptions, {"keys": ("split",)}), Quiet),
        None,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuselabel", description="Multi-label classification of image + caption pairs: train, evaluate, predict."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, groups, settings) in COMMAND_OPTIONS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        for group in groups:
            group, keywords = group if isinstance(group, tuple) else (group, {})
            add_group(p, group, **keywords)
        if settings is not None:
            add_settings(p, **settings)
    return parser


def check(args: argparse.Namespace) -> None:
    """Every option the command took against its declared type and range, before any work starts: a ``ValueError``
    names the flag and key of a value out of range."""
    _, groups, settings = COMMAND_OPTIONS[args.command]
    for group in groups:
        group_values(args, group[0] if isinstance(group, tuple) else group)
    if settings is not None:
        group_values(args, Config)
