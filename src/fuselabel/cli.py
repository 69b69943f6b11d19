"""The ``fuselabel`` command: a thin shell over train, predict and the model folder."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

def resolve_data(data: str | None, csv: str | None, default_csv: str = "train.csv") -> tuple[Path, Path]:
    from .records import resolve_data as find_data

    return find_data(data, csv, default_csv)   # a ValueError names what is missing; main exits with status 2


def _kv(text: str):
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


TRAIN_OPTIONS = [  # (flag, config key, type, help)
    ("--kind", "kind", str, "image | text | early | late"),
    ("--fusion", "late_combine", str, "late fusion rule: weighted | union"),
    ("--late-weight", "late_weight", float, "image weight in weighted late fusion (default: tuned on validation)"),
    ("--image-model", "image_model", str, "timm model name"),
    ("--image-weights", "image_weights", str, "local checkpoint for the image backbone"),
    ("--image-size", "image_size", int, "input size (default 320; 0: the backbone's own)"),
    ("--image-crop-pct", "image_crop_pct", float, "centre crop share (default 1.0: the whole photo, squashed; 0: the backbone's own)"),
    ("--image-pool", "image_pool", str, "avg | avgmax"),
    ("--image-layers", "image_layers", int, "pool this many feature stages (default 1)"),
    ("--decoder", "decoder", str, "head for image/text/early kinds: mlp | query | lstm"),
    ("--text-model", "text_model", str, "Hugging Face name or local folder (default: packaged minilm-l6)"),
    ("--text-max-length", "text_max_length", int, "caption tokens kept"),
    ("--regime", "regime", str, "auto | frozen | hybrid | finetune"),
    ("--epochs", "epochs", int, None), ("--batch-size", "batch_size", int, None),
    ("--lr", "lr", float, "head learning rate"), ("--lr-image", "lr_image", float, None),
    ("--lr-text", "lr_text", float, None), ("--loss", "loss", str, "bce | focal | asl"),
    ("--sampler", "sampler", str, "none | oversample"), ("--augment", "augment", str, None),
    ("--threshold-method", "threshold_method", str, "global | per_class | balanced"),
    ("--seed", "seed", int, None), ("--val-fraction", "val_fraction", float, None),
    ("--missing-images", "missing_images", str, "error | caption_only"),
    ("--accelerator", "accelerator", str, None), ("--devices", "devices", str, None),
    ("--num-nodes", "num_nodes", int, None), ("--strategy", "strategy", str, "auto | ddp | ..."),
    ("--precision", "precision", str, None), ("--num-workers", "num_workers", int, None),
    ("--cache-dir", "cache_dir", str, "frozen-feature cache (default ~/.cache/fuselabel)"),
    ("--save-dtype", "save_dtype", str, "fp16 | int8 | fp32"), ("--max-size-mb", "max_size_mb", float, None),
    ("--max-steps", "max_steps", int, None), ("--patience", "patience", int, None),
]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder, or a folder with data/ and the CSV")
    p.add_argument("--csv", help="CSV file (default DATA/train.csv)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselabel", description="Multi-label classification of image + caption "
                                     "pairs: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write its folder")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--config", help="YAML file of settings (keys as in config.json)")
    p.add_argument("--preset", help="named settings: cpu-fast, cpu, cpu-best, gpu-best, seed")
    p.add_argument("--label-names", help="CSV Label,Name (default: label_names.csv beside the CSV)")
    p.add_argument("--work-dir", help="checkpoints and logs (default: OUT.work, removed once the model is saved)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run interrupted in the work folder (same settings and data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; only warnings and errors")
    p.add_argument("--tta-flip", action="store_true", default=None, help="average features of flipped images")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation for both encoders")
    p.add_argument("--set", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="any setting of config.json, e.g. --set hidden_dim=1024")
    for flag, _, typ, help_ in TRAIN_OPTIONS:
        p.add_argument(flag, type=typ, help=help_)

    p = sub.add_parser("predict", help="write a submission CSV (ImageID,Labels)")
    p.add_argument("model_dir", help="a model folder, or an exported ONNX folder (runs without PyTorch)")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--proba", help="also write per-label probabilities (and each row's inputs) to this CSV")
    _add_inference_args(p, distributed=True)

    p = sub.add_parser("evaluate", help="metrics of a model folder on a labelled CSV")
    p.add_argument("model_dir")
    _add_data_args(p)
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--split", default="all", choices=("all", "val", "train"),
                   help="only the rows on this side of the model's own split (split.json)")
    _add_inference_args(p)

    p = sub.add_parser("inspect", help="what the reader makes of a CSV and image folder")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("info", help="size, parts and settings of a model folder")
    p.add_argument("model_dir")

    p = sub.add_parser("experiment", help="train a grid of settings over seeds; tabulate mean ± std",
                       description="Train a grid of settings over seeds; tabulate mean ± std "
                                   "(the grid file is described in fuselabel.experiment).")
    p.add_argument("--config", required=True, help="grid YAML (name, base, grid, runs, seeds, keep_models)")
    p.add_argument("--out", help="results folder (default runs/<grid name>)")
    p.add_argument("--data", help="image folder, or a folder with data/ and the CSV (default: the grid's)")
    p.add_argument("--csv", help="CSV file (default: the grid's, then DATA/train.csv)")
    p.add_argument("--set", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="a setting for every run, after the grid's (e.g. --set epochs=1)")
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
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest request body")
    p.add_argument("--max-batch", type=int, default=32, help="most items in one /predict/batch request")

    p = sub.add_parser("report", help="an HTML page of figures about a model on labelled rows")
    p.add_argument("model_dir")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="folder to write (index.html and its figures)")
    p.add_argument("--split", default="all", choices=("all", "val", "train"),
                   help="only the rows on this side of the model's own split (split.json)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return parser


def _add_inference_args(p: argparse.ArgumentParser, distributed: bool = False) -> None:
    p.add_argument("--engine", default="auto", choices=("auto", "torch", "onnx"),
                   help="encoder runtime (auto: onnxruntime on a CPU, PyTorch on a GPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--num-workers", type=int, help="threads decoding photos (default: up to 8 cores)")
    p.add_argument("--cache-dir", help="where exported encoder graphs are kept (default ~/.cache/fuselabel)")
    p.add_argument("--strict", action="store_true",
                   help="a row without a usable photo or caption is an error (default: predicted from the other)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if distributed:
        p.add_argument("--chunk-size", type=int, default=512, help="rows per chunk, a multiple of 64 (bounds memory)")
        p.add_argument("--devices", type=int, default=1, help="processes per machine (Lightning ranks)")
        p.add_argument("--num-nodes", type=int, default=1, help="machines (under SLURM or torchrun)")
        p.add_argument("--strategy", default="auto", help="Lightning strategy when --devices > 1 (default ddp)")
        p.add_argument("--accelerator", default="cpu", help="cpu | gpu for the ranks")


def _load_model(args):
    from .predict import load_model

    runtime = {"feature_engine": args.engine, "num_workers": args.num_workers, "cache_dir": args.cache_dir}
    model = load_model(args.model_dir, **{k: v for k, v in runtime.items() if v is not None})
    model.predictor(device=args.device)  # built here, once, on the chosen device
    return model


def cmd_train(args) -> None:
    from .config import build_config
    from .train import fit

    images, csv = resolve_data(args.data, args.csv)
    overrides = {key: getattr(args, key_attr(flag)) for flag, key, _, _ in TRAIN_OPTIONS}
    if overrides.get("devices") is not None:
        overrides["devices"] = _devices(overrides["devices"])
    overrides["tta_flip"] = args.tta_flip
    if args.no_pretrained:
        overrides.update(image_pretrained=False, text_pretrained=False)
    overrides.update(dict(args.set))
    config = build_config(args.preset, args.config, **overrides)
    fit(config, images, csv, args.out, label_names=args.label_names, work_dir=args.work_dir, resume=args.resume,
        progress=_progress(args))


def _progress(args) -> bool:
    """Progress bars only for a person watching a terminal."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def key_attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _devices(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        return [int(x) for x in text.split(",")]


def cmd_predict(args) -> None:
    from .predict import predict_csv

    images, csv = resolve_data(args.data, args.csv, default_csv="test.csv")
    model = _load_model(args)
    progress = _progress(args)
    result = predict_csv(model, images, csv, args.out, proba_out=args.proba, strict=args.strict,
                         chunk_size=args.chunk_size, devices=args.devices, num_nodes=args.num_nodes,
                         strategy=args.strategy, accelerator=args.accelerator, progress=progress)
    if not result:  # a rank other than the one that writes the outputs
        return
    counts = result["status_counts"]
    print(f"wrote {result['out']}: {result['rows']} rows in {result['seconds']:.1f}s "
          f"({result['rows_per_s']:.0f} rows/s) with {result['engine']}")
    degraded = counts["caption_only"] + counts["image_only"] + counts["no_input"]
    if degraded:
        print(f"  {counts['caption_only']} rows predicted from the caption alone (no usable photo), "
              f"{counts['image_only']} from the photo alone (empty caption), "
              f"{counts['no_input']} with neither (no labels written)")
        names = result["no_input_rows"]
        if names:
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            print(f"  rows with neither photo nor caption: {', '.join(names[:10])}{more}")


def cmd_evaluate(args) -> None:
    from .metrics import format_report
    from .predict import evaluate_csv

    images, csv = resolve_data(args.data, args.csv)
    model = _load_model(args)
    report = evaluate_csv(model, images, csv, split=args.split, strict=args.strict)
    print(format_report(report))
    print(f"predicted with {model.predictor().engine.name}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def cmd_inspect(args) -> None:
    from .inspection import format_summary, summarize
    from .labels import read_label_names
    from .records import read_records

    images, csv = resolve_data(args.data, args.csv)
    records = read_records(csv, strict=False)
    names_path = csv.with_name("label_names.csv")
    names = read_label_names(names_path) if names_path.exists() else None
    summary = summarize(records, images, names)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def cmd_experiment(args) -> int:
    """0: every run succeeded; 1: some runs failed (recorded in the results); 2 (a ValueError): unusable grid."""
    import logging

    from .experiment import default_out, format_plan, plan_runs, run_experiment

    plan = plan_runs(args.config, dict(args.set))
    if args.dry_run:
        print(format_plan(plan))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else default_out(plan)
    rows = run_experiment(args.config, out, args.data, args.csv, overrides=dict(args.set), verbose=args.verbose)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def cmd_convert(args) -> None:
    from .bundle import convert_bundle

    size = convert_bundle(args.model_dir, args.out, args.save_dtype, args.max_size_mb)
    print(f"wrote {args.out}: {size / 1e6:.1f} MB ({args.save_dtype})")


def cmd_info(args) -> None:
    from .bundle import describe

    print(describe(args.model_dir))


def cmd_export(args) -> None:
    from .export import export_onnx, format_report

    print(format_report(export_onnx(args.model_dir, args.out, int8=args.int8, check_rows=args.check_rows)))


def cmd_serve(args) -> None:
    from .serve import run

    run(args.model_dir, args.host, args.port, max_upload_mb=args.max_upload_mb, max_batch=args.max_batch)


def cmd_report(args) -> None:
    from .report import build_report

    images, csv = resolve_data(args.data, args.csv)
    page = build_report(args.model_dir, images, csv, args.out, split=args.split)
    print(f"wrote {page}")


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "inspect": cmd_inspect,
            "info": cmd_info, "convert": cmd_convert, "export": cmd_export, "experiment": cmd_experiment,
            "serve": cmd_serve, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _show_log(quiet=getattr(args, "quiet", False))
    try:
        code = COMMANDS[args.command](args)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"fuselabel: error: {_reason(err)}", file=sys.stderr)
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
    if quiet:  # Lightning's notices (accelerators found, tips) as well
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


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
    return last[len(name):] if last.startswith(name) else last


if __name__ == "__main__":
    sys.exit(main())
