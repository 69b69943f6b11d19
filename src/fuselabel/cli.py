"""The ``fuselabel`` command: a thin shell over train, predict and the model folder."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import outputs
from .outputs import check_output


def resolve_data(data: str | None, csv: str | None, default_csv: str = "train.csv") -> tuple[Path, Path]:
    from .records import resolve_data as find_data

    return find_data(data, csv, default_csv)  # a ValueError names what is missing; main exits with status 2


def _columns(args, split: bool = False):
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


def _image_dir(args, images: Path, records) -> Path:
    """--images, else the data folder's data/ or the folder itself, whichever holds the table's photos."""
    from .tables import image_root

    if getattr(args, "images", None):
        return Path(args.images)
    return image_root(Path(args.data), images, records)


def _kv(text: str):
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


# Flags of earlier releases, kept beside the generated ones (same setting, same meaning).
ALIASES = {"late_combine": ("--fusion",), "feature_engine": ("--engine",)}
# The where-it-runs settings every command that loads a model takes.
RUNNING = ("feature_engine", "num_workers", "cache_dir")
_GROUP_TITLES = {
    "model": "what the model is (saved in the model folder's config.json)",
    "run": "how it trains (saved in run.json)",
    "runtime": "where it runs (never saved)",
}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _converter(annotation):
    """(argparse type, choices, is a switch) for a setting's declared type; the settings check the range."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _converter(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation)), False
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:  # Optional[X]: "none" (or 0 for sizes) means "not set"
            inner, choices, switch = _converter(args[0])

            def optional(text: str, inner=inner):
                return None if text.strip().lower() in ("none", "null", "") else inner(text)

            optional.__name__ = getattr(inner, "__name__", "value")
            return optional, choices, switch
        return _devices, None, False  # devices: a number, a list or a word
    if annotation is bool:
        return None, None, True
    if annotation is dict:
        return _yaml_mapping, None, False
    return annotation, None, False


def _yaml_mapping(text: str) -> dict:
    import yaml

    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as {{key: value}}, got {text!r}")
    return value


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def add_settings(p: argparse.ArgumentParser, keys=None) -> None:
    """A flag for every setting (or those in ``keys``), with its help and default, grouped as in config.py:
    --image-size sets image_size, the same in every command that takes it."""
    import dataclasses
    import typing

    from .config import HELP, Config

    hints = typing.get_type_hints(Config, include_extras=True)
    fields = [f for f in dataclasses.fields(Config) if keys is None or f.name in keys]
    for group in ("model", "run", "runtime"):
        members = [f for f in fields if f.metadata["group"] == group]
        if not members:
            continue
        g = p.add_argument_group(f"settings: {_GROUP_TITLES[group]}")
        for f in members:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f"{HELP[f.name]} (default: {_default_text(default)})"
            flags = (_flag(f.name), *ALIASES.get(f.name, ()))
            typ, choices, switch = _converter(hints[f.name])
            if switch:
                g.add_argument(
                    *flags, dest=f"setting_{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_
                )
            else:
                g.add_argument(
                    *flags,
                    dest=f"setting_{f.name}",
                    type=typ,
                    choices=choices,
                    default=None,
                    metavar=f.name.upper() if choices is None else None,
                    help=help_,
                )


def given_settings(args) -> dict:
    """The settings given as flags (those left out stay with the preset, the YAML file or the default)."""
    return {
        name[len("setting_") :]: value
        for name, value in vars(args).items()
        if name.startswith("setting_") and value is not None
    }


def _add_data_args(p: argparse.ArgumentParser, default_csv: str = "train.csv") -> None:
    p.add_argument("--data", required=True, help="image folder, or a folder with data/ and the table")
    p.add_argument(
        "--csv",
        "--table",
        dest="csv",
        metavar="TABLE",
        help=f"the table: CSV, TSV, JSON Lines, Parquet or the course CSV (default DATA/{default_csv})",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        help="folder the table's photo paths are relative to (default: DATA/data if it holds them, else DATA)",
    )
    g = p.add_argument_group("table columns (default: found from the table; the course's ImageID, Caption, Labels)")
    g.add_argument(
        "--image-col", metavar="COL", help="column of photo paths (relative to the image folder, or absolute)"
    )
    g.add_argument(
        "--text-col", metavar="COL", action="append", help="text column; repeat for several (joined with a line break)"
    )
    g.add_argument("--label-col", metavar="COL", help="column of labels: a list, or labels joined by --label-sep")
    g.add_argument("--id-col", metavar="COL", help="column naming each row in outputs (default: the photo column)")
    g.add_argument(
        "--label-sep",
        metavar="SEP",
        help="separator inside the label column: '|', ';', ',', 'space', or 'none' for one label "
        "(default: found from the data)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuselabel", description="Multi-label classification of image + caption pairs: train, evaluate, predict."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write its folder")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--config", help="YAML file of settings (keys as in config.json)")
    p.add_argument("--preset", help="named settings: cpu-fast, cpu, cpu-best, gpu-best, seed")
    p.add_argument(
        "--label-names",
        help="names of label ids: two columns (id, name) of a CSV/TSV, or a JSON "
        "object (default: label_names.csv beside the table or in DATA)",
    )
    p.add_argument(
        "--val-csv",
        "--val-table",
        dest="val_csv",
        metavar="TABLE",
        help="validation rows, in the training table's format (default: a stratified --val-fraction)",
    )
    p.add_argument(
        "--split-col",
        metavar="COL",
        help="column saying train, val or test for each row (test rows are left out of training)",
    )
    p.add_argument("--work-dir", help="checkpoints and logs (default: OUT.work, removed once the model is saved)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run interrupted in the work folder (same settings and data)"
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars or notices; only the final summary, warnings and errors"
    )
    p.add_argument(
        "--no-pretrained",
        action="store_true",
        help="random initialisation for both encoders (--no-image-pretrained --no-text-pretrained)",
    )
    p.add_argument(
        "--set",
        action="append",
        type=_kv,
        default=[],
        metavar="KEY=VALUE",
        help="any setting by its key, e.g. --set hidden_dim=1024 (the same as its flag)",
    )
    add_settings(p)

    p = sub.add_parser("predict", help="write each row's labels (Kaggle ImageID,Labels for course files)")
    p.add_argument("model_dir", help="a model folder, or an exported ONNX folder (runs without PyTorch)")
    _add_data_args(p, default_csv="test.csv")
    p.add_argument("--out", required=True, help="predictions to write: .csv, .tsv, .jsonl or .parquet")
    p.add_argument("--proba", help="also write per-label probabilities (and each row's inputs) to this CSV")
    _add_inference_args(p, distributed=True)

    p = sub.add_parser("evaluate", help="metrics of a model folder on a labelled CSV")
    p.add_argument("model_dir")
    _add_data_args(p)
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument(
        "--split",
        default="all",
        choices=("all", "val", "train"),
        help="only the rows on this side of the model's own split (split.json)",
    )
    _add_inference_args(p)

    p = sub.add_parser("inspect", help="what the reader makes of a table and image folder")
    _add_data_args(p)
    p.add_argument("--label-names", help="names of label ids (default: label_names.csv beside the table or in DATA)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("info", help="size, parts and settings of a model folder")
    p.add_argument("model_dir")

    p = sub.add_parser(
        "experiment",
        help="train a grid of settings over seeds; tabulate mean ± std",
        description="Train a grid of settings over seeds; tabulate mean ± std "
        "(the grid file is described in fuselabel.experiment).",
    )
    p.add_argument("--config", required=True, help="grid YAML (name, base, grid, runs, seeds, keep_models)")
    p.add_argument("--out", help="results folder (default runs/<grid name>)")
    p.add_argument("--data", help="image folder, or a folder with data/ and the CSV (default: the grid's)")
    p.add_argument("--csv", help="CSV file (default: the grid's, then DATA/train.csv)")
    p.add_argument(
        "--set",
        action="append",
        type=_kv,
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every run, after the grid's (e.g. --set epochs=1)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and exit")
    p.add_argument("--verbose", action="store_true", help="show fit's output instead of writing it to OUT/logs/")

    p = sub.add_parser("convert", help="re-save a model folder with other weight storage (fp32, fp16, int8)")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="new model folder (may equal MODEL_DIR)")
    p.add_argument("--save-dtype", required=True, choices=("fp32", "fp16", "int8"))
    p.add_argument("--max-size-mb", type=float)

    p = sub.add_parser("export", help="write ONNX graphs of a model folder (image encoder, text encoder, head)")
    p.add_argument("model_dir")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="only onnx so far")
    p.add_argument("--int8", action="store_true", help="int8 weights for the text encoder and head (dynamic)")
    p.add_argument("--out", help="folder to write (default MODEL_DIR/onnx)")
    p.add_argument("--check-rows", type=int, default=8, help="synthetic rows compared with PyTorch (0: none)")

    p = sub.add_parser("serve", help="a prediction service and web page for a model folder (FastAPI, uvicorn)")
    p.add_argument("model_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    from .config import SERVE_LIMITS

    for key, (default, meaning) in SERVE_LIMITS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(default), default=default, help=meaning)
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10,
        help="seconds for a request head to arrive (else the connection is closed)",
    )
    p.add_argument("--max-connections", type=int, default=2048, help="open connections (beyond them, 503)")
    p.add_argument("--workers", type=int, default=1, help="processes, each with the model loaded (more cores)")
    p.add_argument("--json-logs", action="store_true", help="one JSON object a log line")
    add_settings(p, RUNNING)

    p = sub.add_parser("report", help="one HTML file about a model on labelled rows, or comparing several models")
    p.add_argument("model_dir", nargs="+", help="a model folder; two or more: a side-by-side comparison")
    _add_data_args(p)
    p.add_argument(
        "--out", required=True, help="the HTML file to write (a folder an earlier report wrote gets its index.html)"
    )
    p.add_argument(
        "--split",
        default="all",
        choices=("all", "val", "train"),
        help="only the rows on this side of the model's own split (split.json)",
    )
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return parser


def _add_inference_args(p: argparse.ArgumentParser, distributed: bool = False) -> None:
    p.add_argument("--device", help="where the model runs: cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="a row without a usable photo or caption is an error (default: predicted from the other)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars; only the summary, warnings and errors")
    if distributed:
        from .config import HELP

        p.add_argument(
            "--chunk-size",
            type=int,
            default=512,
            help="rows per chunk, a multiple of 64 (bounds memory; finished chunks survive a kill) (default: 512)",
        )
        p.add_argument("--devices", type=int, default=1, help=f"{HELP['devices']} (default: 1)")
        p.add_argument("--num-nodes", type=int, default=1, help=f"{HELP['num_nodes']} (default: 1)")
        p.add_argument("--strategy", default="auto", help=f"{HELP['strategy']} (default: auto, ddp when --devices > 1)")
        p.add_argument("--accelerator", default="cpu", help="cpu | gpu for the ranks (default: cpu)")
    add_settings(p, RUNNING)


def cmd_train(args) -> None:
    from .config import build_config
    from .tables import read_table

    # Everything a user can get wrong is checked before the heavy imports and any work.
    images, csv = resolve_data(args.data, args.csv)
    overrides = given_settings(args)
    if args.no_pretrained:
        overrides.update(image_pretrained=False, text_pretrained=False)
    overrides.update(dict(args.set))
    config = build_config(args.preset, args.config, **overrides)

    if args.val_csv and args.split_col:
        raise ValueError("give either --val-csv or --split-col, not both")
    records = read_table(csv, _columns(args, split=True), need_labels=True)
    inputs = [csv, images, args.label_names, args.val_csv]  # refused as outputs before any work starts
    check_output(args.out, outputs.MODEL, inputs)
    if args.work_dir:
        check_output(args.work_dir, outputs.WORK, inputs, other_outputs=[args.out])
    from .train import fit

    _show_log(quiet=args.quiet)  # again: importing Lightning set its own loggers up
    with outputs.output_locks(args.out, args.work_dir):  # one training per model (and work) folder at a time
        result = fit(
            config,
            _image_dir(args, images, records),
            records,
            args.out,
            label_names=args.label_names,
            work_dir=args.work_dir,
            resume=args.resume,
            progress=_progress(args),
            columns=_columns(args),
            val=args.val_csv,
        )
    from .runtime import gpu_driver_present

    if result is not None and not gpu_driver_present():
        # `predict`, `evaluate` and `serve` on a CPU run from the exported copy: made now (seconds), the first
        # of them starts at once too.
        from .export import export_cached

        export_cached(args.out, config.cache_dir)
    if result is not None:  # per-label figures, then the one line (--quiet keeps only that)
        if not args.quiet:
            from .metrics import format_report

            print(format_report(result.report))
        print(result.summary)


def _progress(args) -> bool:
    """Progress bars only for a person watching a terminal."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _devices(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        return [int(x) for x in text.split(",")]


def cmd_predict(args) -> None:
    images, csv = resolve_data(args.data, args.csv, default_csv="test.csv")
    check_output(args.out, outputs.FILE, [args.model_dir, csv], other_outputs=[args.proba])
    if args.proba:
        check_output(args.proba, outputs.FILE, [args.model_dir, csv], other_outputs=[args.out])
    with outputs.output_locks(args.out, args.proba):
        _predict(args, images, csv)


def _one_cpu(args) -> bool:
    """One process on the CPU: a model folder can then run from its exported ONNX copy (no torch to load)."""
    from .runtime import gpu_driver_present

    device = args.device or ("cuda" if gpu_driver_present() else "cpu")
    return (
        device == "cpu"
        and getattr(args, "devices", 1) <= 1
        and getattr(args, "num_nodes", 1) <= 1
        and getattr(args, "accelerator", "cpu") == "cpu"
    )


def _predict(args, images, csv) -> None:
    from .estimator import FuseLabel
    from .predict import predict_csv
    from .tables import read_table

    # One process on a CPU runs from the exported copy: no torch to load. Several ranks place it themselves.
    model = FuseLabel.from_pretrained(
        args.model_dir, exported=_one_cpu(args), device=args.device, **given_settings(args)
    )
    progress = _progress(args)
    records = read_table(csv, _columns(args), trained=model.bundle_.table)
    result = predict_csv(
        model,
        _image_dir(args, images, records),
        records,
        args.out,
        proba_out=args.proba,
        strict=args.strict,
        chunk_size=args.chunk_size,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        accelerator=args.accelerator,
        progress=progress,
    )
    if not result:  # a rank other than the one that writes the outputs
        return
    counts = result["status_counts"]
    print(
        f"wrote {result['out']}: {result['rows']} rows in {result['seconds']:.1f}s "
        f"({result['rows_per_s']:.0f} rows/s) with {result['engine']}"
    )
    if result.get("texts_cut"):
        print(
            f"  {result['texts_cut']} of {result['rows']} texts were longer than the model's text length and "
            "were cut to it"
        )
    degraded = counts["caption_only"] + counts["image_only"] + counts["no_input"]
    if degraded:
        print(
            f"  {counts['caption_only']} rows predicted from the caption alone (no usable photo), "
            f"{counts['image_only']} from the photo alone (empty caption), "
            f"{counts['no_input']} with neither (no labels written)"
        )
        names = result["no_input_rows"]
        if names:
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            print(f"  rows with neither photo nor caption: {', '.join(names[:10])}{more}")


def cmd_evaluate(args) -> None:
    from .estimator import FuseLabel
    from .metrics import format_report
    from .predict import evaluate_csv
    from .tables import read_table

    images, csv = resolve_data(args.data, args.csv)
    if args.json:
        check_output(args.json, outputs.FILE, [args.model_dir, csv])
    # on a CPU, from the exported copy: no torch
    model = FuseLabel.from_pretrained(
        args.model_dir, exported=_one_cpu(args), device=args.device, **given_settings(args)
    )
    records = read_table(csv, _columns(args), trained=model.bundle_.table, need_labels=True)
    report = evaluate_csv(model, _image_dir(args, images, records), records, split=args.split, strict=args.strict)
    print(format_report(report))
    print(f"predicted with {model.predictor().engine.name}")
    if args.json:
        from .writers import atomic_write_text

        with outputs.output_lock(args.json):
            atomic_write_text(args.json, [json.dumps(report, indent=2) + "\n"])
        print(f"wrote {args.json}")


def cmd_inspect(args) -> None:
    from .inspection import format_summary, summarize
    from .labels import find_label_names
    from .tables import read_table

    images, csv = resolve_data(args.data, args.csv)
    records = read_table(csv, _columns(args), strict=False)
    names, _ = find_label_names(args.label_names, [csv.parent, Path(args.data), Path(args.data).parent])
    summary = summarize(records, _image_dir(args, images, records), names or None)
    print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else format_summary(summary))


def cmd_experiment(args) -> int:
    """0: every run succeeded; 1: some runs failed (recorded in the results); 2 (a ValueError): unusable grid."""

    from .experiment import default_out, format_plan, plan_runs, run_experiment

    plan = plan_runs(args.config, dict(args.set))
    if args.dry_run:
        print(format_plan(plan))
        return 0
    out = Path(args.out) if args.out else default_out(plan)
    rows = run_experiment(args.config, out, args.data, args.csv, overrides=dict(args.set), verbose=args.verbose)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def cmd_convert(args) -> None:
    from .bundle import convert_bundle

    in_place = Path(args.out).resolve() == Path(args.model_dir).resolve()  # re-saving a folder in place is fine
    check_output(args.out, outputs.MODEL, [] if in_place else [args.model_dir])
    size = convert_bundle(args.model_dir, args.out, args.save_dtype, args.max_size_mb)
    print(f"wrote {args.out}: {size / 1e6:.1f} MB ({args.save_dtype})")


def cmd_info(args) -> None:
    from .onnx_folder import describe_exported, is_onnx_folder

    if is_onnx_folder(args.model_dir):
        print(describe_exported(args.model_dir))
        return
    from .bundle import describe

    print(describe(args.model_dir))


def cmd_export(args) -> None:
    from .export import ONNX_DIR, export_onnx, format_report

    out = Path(args.out) if args.out else Path(args.model_dir) / ONNX_DIR
    check_output(out, outputs.ONNX, [args.model_dir])
    with outputs.output_lock(out):
        print(format_report(export_onnx(args.model_dir, out, int8=args.int8, check_rows=args.check_rows)))


def cmd_serve(args) -> None:
    from pydantic import ValidationError

    from .config import ServeSettings
    from .serve import run

    # The parsed values of the serve group's fields (what ``flags.group_values`` gives once serve's flags are
    # generated from ServeSettings).
    values = {key: getattr(args, key) for key in ServeSettings.model_fields if getattr(args, key, None) is not None}
    try:
        settings = ServeSettings(**values)
    except ValidationError as err:
        raise ValueError(
            "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        ) from None
    run(args.model_dir, settings, **given_settings(args))


def cmd_report(args) -> None:
    from .report import build_comparison, build_report, report_target
    from .tables import read_table

    images, csv = resolve_data(args.data, args.csv)
    records = read_table(csv, _columns(args), strict=True)
    report_target(args.out, [*args.model_dir, csv, images])  # refuses an output that is not a report's
    build = build_report if len(args.model_dir) == 1 else build_comparison
    with outputs.output_lock(args.out):
        page = build(
            args.model_dir[0] if len(args.model_dir) == 1 else args.model_dir,
            _image_dir(args, images, records),
            records,
            args.out,
            split=args.split,
            columns=_columns(args),
        )
    print(f"wrote {page}")


COMMANDS = {
    "train": cmd_train,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "inspect": cmd_inspect,
    "info": cmd_info,
    "convert": cmd_convert,
    "export": cmd_export,
    "experiment": cmd_experiment,
    "serve": cmd_serve,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _show_log(quiet=getattr(args, "quiet", False))
    try:
        code = COMMANDS[args.command](args)
    except Exception as err:
        limit = outputs.explain_error(err)  # a full disk, a read-only folder ...: the path and what to do
        if limit is None and not isinstance(err, _user_errors()):
            raise
        if limit and args.command == "train":
            limit += "; the finished part of the run is kept: run the same command with --resume to continue"
        print(f"fuselabel: error: {limit or _reason(err)}", file=sys.stderr)
        return 2
    return code or 0


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (it may be replaced after the handler is made)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _show_log(quiet: bool) -> None:
    """The library logs; the command shows its messages (only warnings with --quiet)."""
    logger = logging.getLogger("fuselabel")
    if not any(getattr(h, "fuselabel_cli", False) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.fuselabel_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:  # the libraries' notices (accelerators found, tips, weight-loading reports) as well
        for name in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.set_verbosity_error()
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def _user_errors() -> tuple[type, ...]:
    """Errors that mean bad input, not a bug. Only modules already loaded can have raised theirs, and
    looking them up this way keeps ``predict`` on an exported ONNX folder free of torch."""
    from .images import ImageError
    from .records import RecordsError

    types = [RecordsError, ImageError, ValueError, FileNotFoundError]
    for module, name in (("fuselabel.bundle", "BundleError"), ("fuselabel.encoders", "EncoderError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def _reason(err: BaseException) -> str:
    """The error's own message: a DataLoader worker re-raises it wrapped in the worker's traceback."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(name) :] if last.startswith(name) else last


if __name__ == "__main__":
    sys.exit(main())
