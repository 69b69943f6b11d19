"""The ``fuselabel`` command: a thin shell over train, predict and the model folder."""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
from pathlib import Path

from . import outputs
from .console import reason, show_log, user_errors
from .options import ONE_PROCESS, build_parser, check, columns, image_dir, read_rows, reader_options, resolve_data
from .outputs import check_output


def _kv(text: str):
    import yaml

    if "=" not in text:
        raise ValueError(f"--set: expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def given_settings(args) -> dict:
    """The settings given as flags (those left out stay with the preset, the YAML file or the default)."""
    from .config import Config
    from .flags import group_values

    return group_values(args, Config)


def cmd_train(args) -> None:
    from .config import build_config

    # Everything a user can get wrong is checked before the heavy imports and any work.
    images, csv = resolve_data(args.data, args.csv)
    overrides = given_settings(args)
    if not args.pretrained:
        overrides.update(image_pretrained=False, text_pretrained=False)
    overrides.update(_set(args))
    config = build_config(args.preset, args.config, **overrides)

    if args.val_csv and args.split_col:
        raise ValueError("give either --val-csv or --split-col, not both")
    records = read_rows(args, csv, columns(args, split=True), need_labels=True)
    inputs = [csv, images, args.label_names, args.val_csv]  # refused as outputs before any work starts
    check_output(args.out, outputs.MODEL, inputs)
    if args.work_dir:
        check_output(args.work_dir, outputs.WORK, inputs, other_outputs=[args.out])
    from .train import fit

    show_log(quiet=args.quiet)  # again: importing Lightning set its own loggers up
    with outputs.output_locks(args.out, args.work_dir):  # one training per model (and work) folder at a time
        run = dict(label_names=args.label_names, work_dir=args.work_dir, resume=args.resume, val=args.val_csv)
        where = image_dir(args, images, records)
        result = fit(config, where, records, args.out, progress=_progress(args), columns=columns(args), **run)
    from .encoding import gpu_driver_present

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


def _set(args) -> dict:
    """--set KEY=VALUE flags, in order (a later one wins)."""
    return dict(_kv(text) for text in args.set or [])


def cmd_predict(args) -> None:
    spread = {**ONE_PROCESS, **given_settings(args)}
    # the process count: several processes build the model on their own devices
    args.devices, args.num_nodes = _processes(spread["devices"], spread["accelerator"]), spread["num_nodes"]
    args.accelerator, args.strategy = spread["accelerator"], spread["strategy"]
    images, csv = resolve_data(args.data, args.csv, default_csv="test.csv")
    check_output(args.out, outputs.FILE, [args.model_dir, csv], other_outputs=[args.proba])
    if args.proba:
        check_output(args.proba, outputs.FILE, [args.model_dir, csv], other_outputs=[args.out])
    with outputs.output_locks(args.out, args.proba):
        _predict(args, images, csv)


def _processes(devices, accelerator: str) -> int:
    """How many processes predict starts for --devices: a number, the first GPUs as a list (0,1), or auto (one)."""
    if devices == "auto":
        return 1
    if isinstance(devices, list):
        if devices != list(range(len(devices))) and accelerator != "cpu":
            raise ValueError(f"devices={devices!r}: predict spreads over the first GPUs; list them from 0 (0,1,...)")
        return len(devices)
    return devices


def _one_cpu(args) -> bool:
    """One process on the CPU: a model folder can then run from its exported ONNX copy (no torch to load)."""
    from .encoding import gpu_driver_present

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
    from .predict_rows import first_rows

    # One process on a CPU runs from the exported copy: no torch to load. Several ranks place it themselves.
    model = FuseLabel.from_pretrained(
        args.model_dir, exported=_one_cpu(args), device=args.device, **given_settings(args)
    )
    # The table is streamed, not read here: its first rows say where the photo paths start.
    reading = {"columns": columns(args), "reader": reader_options(args)}
    first = first_rows(csv, reading["columns"], trained=model.bundle_.table, **reading["reader"])
    spread = {k: getattr(args, k) for k in ("devices", "num_nodes", "strategy", "accelerator")}
    outputs_ = dict(proba_out=args.proba, strict=args.strict, chunk_size=args.chunk_size, progress=_progress(args))
    result = predict_csv(model, image_dir(args, images, first), csv, args.out, **outputs_, **reading, **spread)
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

    images, csv = resolve_data(args.data, args.csv)
    if args.json_report not in (None, "-"):
        check_output(args.json_report, outputs.FILE, [args.model_dir, csv])
    # on a CPU, from the exported copy: no torch
    model = FuseLabel.from_pretrained(
        args.model_dir, exported=_one_cpu(args), device=args.device, **given_settings(args)
    )
    records = read_rows(args, csv, columns(args), trained=model.bundle_.table, need_labels=True)
    report = evaluate_csv(model, image_dir(args, images, records), records, split=args.split, strict=args.strict)
    if _write_json(args, report):
        return
    print(format_report(report))
    print(f"predicted with {model.predictor().engine.name}")


def cmd_inspect(args) -> None:
    from .inspection import format_summary, summarize
    from .labels import find_label_names
    from .tables import iter_table

    images, csv = resolve_data(args.data, args.csv)
    if args.json_report not in (None, "-"):
        check_output(args.json_report, outputs.FILE, [csv, images])
    # a batch of rows at a time, so memory does not grow with the table; the first batch places the photos
    batches = iter_table(csv, columns(args), strict=False, **reader_options(args))
    first = next(batches)
    names, _ = find_label_names(args.label_names, [csv.parent, Path(args.data), Path(args.data).parent])
    summary = summarize(itertools.chain([first], batches), image_dir(args, images, first), names or None)
    if not _write_json(args, summary):
        print(format_summary(summary))


def _write_json(args, report: dict) -> bool:
    """--json: the report printed as JSON (no FILE) or written to FILE as well as shown; False without --json."""
    if args.json_report is None:
        return False
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    if args.json_report == "-":
        print(text, end="")
        return True
    from .writers import atomic_write_text

    with outputs.output_lock(args.json_report):
        atomic_write_text(args.json_report, [text])
    print(f"wrote {args.json_report}")
    return False


def cmd_experiment(args) -> int:
    """0: every run succeeded; 1: some runs failed (recorded in the results); 2 (a ValueError): unusable grid."""

    from .experiment import default_out, format_plan, plan_runs, run_experiment

    plan = plan_runs(args.config, _set(args))
    if args.dry_run:
        print(format_plan(plan))
        return 0
    out = Path(args.out) if args.out else default_out(plan)
    rows = run_experiment(args.config, out, args.data, args.csv, overrides=_set(args), verbose=args.verbose)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def cmd_tune(args) -> None:
    from .config import TuneSettings, build_config
    from .flags import group_values

    images, csv = resolve_data(args.data, args.csv)
    config = build_config(args.preset, args.config, **_set(args))
    settings = TuneSettings(**group_values(args, TuneSettings))
    records = read_rows(args, csv, columns(args), need_labels=True)
    check_output(args.out, outputs.MODEL, [csv, images, args.label_names])  # before the heavy imports
    from .tune import search

    show_log(quiet=args.quiet)  # again: importing Lightning set its own loggers up
    result = search(config, image_dir(args, images, records), records, args.out, settings, label_names=args.label_names)
    print(result.summary)


def cmd_convert(args) -> None:
    from .bundle import convert_bundle

    in_place = Path(args.out).resolve() == Path(args.model_dir).resolve()  # re-saving a folder in place is fine
    check_output(args.out, outputs.MODEL, [] if in_place else [args.model_dir])
    settings = given_settings(args)
    size = convert_bundle(args.model_dir, args.out, settings["save_dtype"], settings.get("max_size_mb"))
    print(f"wrote {args.out}: {size / 1e6:.1f} MB ({settings['save_dtype']})")


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
    from .config import ServeSettings
    from .flags import group_values
    from .serve import run

    run(args.model_dir, ServeSettings(**group_values(args, ServeSettings)), **given_settings(args))


def cmd_report(args) -> None:
    from .report import build_comparison, build_report, report_target

    images, csv = resolve_data(args.data, args.csv)
    records = read_rows(args, csv, columns(args), strict=True)
    report_target(args.out, [*args.model_dir, csv, images])  # refuses an output that is not a report's
    build = build_report if len(args.model_dir) == 1 else build_comparison
    with outputs.output_lock(args.out):
        page = build(
            args.model_dir[0] if len(args.model_dir) == 1 else args.model_dir,
            image_dir(args, images, records),
            records,
            args.out,
            split=args.split,
            columns=columns(args),
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
    "tune": cmd_tune,
    "serve": cmd_serve,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    show_log(quiet=getattr(args, "quiet", False))
    try:
        check(args)
        code = COMMANDS[args.command](args)
    except Exception as err:
        limit = outputs.explain_error(err)  # a full disk, a read-only folder ...: the path and what to do
        if limit is None and not isinstance(err, user_errors()):
            raise
        if limit and args.command == "train":
            limit += "; the finished part of the run is kept: run the same command with --resume to continue"
        print(f"fuselabel: error: {limit or reason(err)}", file=sys.stderr)
        return 2
    return code or 0


def run() -> None:
    """The ``fuselabel`` command: ``main`` on the command line's arguments, then exit with its status."""
    code = main()
    # What the command wrote is closed and synced by now. The interpreter's teardown would end with a garbage
    # collection over every object the libraries made at import, 0.05 s of each command; frozen, they are left
    # to the operating system. Exit handlers (logging, experiment trackers) still run.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
