"""Where a report's figures come from: the model (:func:`describe_run`), how it combines its inputs
(:func:`fusion`) and the rows it was scored on (:func:`data_facts`)."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from ..runtime import inputs_read

MISSING = "not recorded"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _duration(seconds) -> str:
    if seconds is None:
        return MISSING
    seconds = float(seconds)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _image_size(config: dict, preprocessing: dict) -> str:
    """The side the photos are resized to: the setting, or (when it asks for the backbone's own) the size the
    model folder's preprocessing records."""
    size = config.get("image_size") or (preprocessing.get("input_size") or [None])[-1]
    return f"{size} px" if size else "the backbone's own size"


def _kind(config: dict) -> str:
    kind = config.get("kind", MISSING)
    return kind + (f", {config.get('late_combine', MISSING)} fusion" if kind == "late" else "")


def describe_run(model_dir, name: str | None = None) -> dict:
    """What the model folder records about the model and its training: names and plain values only (no paths).

    ``{"name", "id", "written_by", "settings": {config.json}, "run": {run.json}, "split": {"train": ids, "val":
    ids} or None, "facts": [(key, value)]}``; anything the folder lacks is "not recorded". ``name`` is what
    the page calls the model (default: its folder's name).
    """
    folder = Path(model_dir)
    config, run = _read_json(folder / "config.json"), _read_json(folder / "run.json")
    metrics, split = _read_json(folder / "metrics.json"), _read_json(folder / "split.json")
    weights = _read_json(folder / "sha256.json").get("model.safetensors")
    written = _read_json(folder / "fuselabel.json").get("fuselabel")
    validation = metrics.get("validation", {})
    train_rows, val_rows = split.get("train_ids"), split.get("val_ids")
    name = name or folder.resolve().name
    image = "-" if config.get("kind") == "text" else f"{config.get('image_model', MISSING)} at "
    text = "-" if config.get("kind") == "image" else f"{config.get('text_model', MISSING)}, "
    facts = [
        ("model", name),
        ("model id (weights sha256)", weights[:16] if weights else MISSING),
        ("written by", f"fuselabel {written}" if written else MISSING),
        ("kind", _kind(config)),
        ("task", config.get("task", "multilabel")),
        (
            "image encoder",
            image if image == "-" else image + _image_size(config, _read_json(folder / "preprocessing.json")),
        ),
        ("text encoder", text if text == "-" else text + f"{config.get('text_max_length', '?')} tokens"),
        ("regime", metrics.get("regime") or run.get("regime", MISSING)),
        ("thresholds", config.get("threshold_method", MISSING)),
        ("training rows", len(train_rows) if train_rows is not None else MISSING),
        ("validation rows", len(val_rows) if val_rows is not None else MISSING),
        ("epochs", f"{metrics.get('epochs_run', '?')} run of {run.get('epochs', '?')}"),
        ("training time", _duration(metrics.get("timings", {}).get("total_s"))),
        ("validation mean F1", f"{validation['mean_f1']:.4f}" if "mean_f1" in validation else MISSING),
        ("seed", run.get("seed", MISSING)),
    ]
    return {
        "name": name,
        "id": weights[:16] if weights else None,
        "weights": weights,
        "written_by": written,
        "settings": config,
        "run": run,
        "split": None if train_rows is None else {"train": set(train_rows), "val": set(val_rows or ())},
        "facts": facts,
    }


def fusion(kind: str, combine: str | None, image_weight: float | None) -> dict:
    """Which inputs a model's decisions rest on: ``{"kind", "combine", "image_weight", "reads", "sentence"}``,
    ``reads`` as :func:`fuselabel.runtime.inputs_read` decides it (the rule the service's answers state)."""
    reads = inputs_read(kind, combine, image_weight)
    w = round(float(image_weight), 4) if image_weight is not None else None  # fp16: 0.35 reads back as 0.350098
    sentence = "The model combines the photo and the caption"
    if kind == "image":
        sentence = "The model reads the photo only: it has no caption head"
    elif kind == "text":
        sentence = "The model reads the caption only: it has no photo head"
    elif kind == "early":
        sentence = "The model reads the photo and the caption together, through one head"
    elif kind == "late" and combine == "union":
        sentence = "The model takes, per label, the larger of its photo head's and its caption head's probability"
    elif reads == "caption only":
        sentence = "The model is caption-only: its photo weight is 0, so the photo changes no decision"
    elif reads == "photo only":
        sentence = "The model is photo-only: its caption weight is 0, so the caption changes no decision"
    elif kind == "late" and w is not None:
        sentence = f"The model weighs the photo head by {w:g} and the caption head by {round(1 - w, 4):g}"
    if kind == "late" and reads != "both":
        sentence += " (a row without that input is decided by the other head)"
    return {"kind": kind, "combine": combine, "image_weight": image_weight, "reads": reads, "sentence": sentence + "."}


def table_digest(path) -> str | None:
    """The first 16 hex digits of the table file's sha256: which version of the table the figures come from."""
    if not path or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def overlap(ids: list[str], run: dict) -> str:
    """How many of the reported rows the model trained or tuned on (its ``split.json``), in words."""
    if not run or run.get("split") is None:
        return MISSING + " (the model folder has no split.json)"
    train = sum(i in run["split"]["train"] for i in ids)
    val = sum(i in run["split"]["val"] for i in ids)
    if not train and not val:
        return f"none: no reported row is in {run['name']}'s training or validation rows"
    return f"{train} in {run['name']}'s training rows, {val} in its validation rows (of {len(ids)} reported)"


def data_facts(data: dict) -> list[tuple[str, object]]:
    """The provenance table: the table, its digest, the photos' folder, the rows, the overlap with each model's
    split, the date and the fuselabel version."""
    from .. import __version__

    facts = [
        ("table", data.get("table") or "a table in memory"),
        ("table sha256", data.get("digest") or "-"),
        ("image folder", data.get("images") or "-"),
        ("rows in the table", data.get("rows_in_table", "?")),
        ("rows reported", f"{data.get('rows_reported', '?')} ({data.get('split', 'all')} rows)"),
    ]
    facts += [
        ("overlap with the model's split" if k is None else f"overlap with {k}'s split", v)
        for k, v in data.get("overlap", [])
    ]
    facts += [
        ("report written", data.get("date") or datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("by", f"fuselabel {__version__}"),
    ]
    return facts
