"""Running models over a table and writing the page: :func:`build_report`, :func:`build_comparison`,
:func:`write_report`, and what an existing ``--out`` may be (:func:`report_target`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import outputs
from ..labels import labels_to_matrix
from ..writers import atomic_write_text
from .comparison import compare
from .page import comparison_html, report_html
from .provenance import describe_run, fusion, overlap, table_digest
from .summary import read_history, summarize

log = logging.getLogger(__name__)

# The files the earlier report (a folder with index.html) wrote beside its page: removed when it is rewritten.
_OLD_REPORT_FILES = (
    "scores.png",
    "confusion.png",
    "thresholds.png",
    "pr_curves.png",
    "calibration.png",
    "training.png",
    "frequency.png",
    "cooccurrence.png",
    "modality.png",
)


def report_target(out, inputs=()) -> Path:
    """The HTML file ``--out`` means, refusing any path whose writing would destroy something.

    ``out`` names the file to write (``report.html``). An existing file is replaced only if it is a fuselabel
    report. A folder written by an earlier fuselabel (``index.html`` with its figures beside it) gets the new
    page as its ``index.html``, and the figure and thumbnail files that report wrote are removed (nothing
    else in it is touched); any other folder is refused.
    """
    out = Path(out)
    kind = outputs.kind_of(out)
    if kind == outputs.REPORT:
        outputs.check_output(out, outputs.REPORT, inputs)
        return out / "index.html"
    if out.is_dir():
        raise outputs.OutputError(f"{out}: is a folder; --out names the HTML file to write, e.g. {out / 'report.html'}")
    outputs.check_output(out, outputs.FILE, inputs)
    if kind == outputs.FILE and not outputs.is_report_page(out):
        raise outputs.OutputError(
            f"{out}: already exists and is not a fuselabel report, which a report may not "
            "replace: choose a new path, or move the file away first"
        )
    return out


def _write_page(page: str, out) -> Path:
    """Write the page atomically (an interrupted write leaves the earlier file whole) to the file ``out``
    means (:func:`report_target`)."""
    target = report_target(out)
    if target.suffix.lower() not in (".html", ".htm"):
        log.warning(f"{out}: a report is an HTML file; a name ending in .html opens in a browser by a double click")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, [page])
    if target.name == "index.html" and target.parent == Path(out):  # an earlier report's folder, now one file
        for name in _OLD_REPORT_FILES:
            (target.parent / name).unlink(missing_ok=True)
        for thumb in target.parent.glob("thumb_*.jpg"):
            thumb.unlink(missing_ok=True)
    return target


def write_report(
    summary: dict,
    rows: list[dict],
    out,
    *,
    title: str = "fuselabel report",
    run: dict | None = None,
    data: dict | None = None,
) -> Path:
    """Write the one-file report to ``out`` (:func:`report_target` says what an existing ``out`` may be);
    returns the file written. Everything is drawn before anything is written."""
    return _write_page(report_html(summary, rows, title=title, run=run, data=data), out)


def _labelled_rows(model_dir, table, columns, split: str):
    """The model, the table and its labelled rows on the ``split`` side of the model's split; labels the model
    never saw are named in a warning (they are left out of its figures)."""
    from ..estimator import FuseLabel
    from ..evaluation import split_rows
    from ..tables import read_table, require_labels

    model = FuseLabel.from_pretrained(model_dir)
    records = read_table(table, columns, trained=model.bundle_.table, need_labels=True)
    require_labels(records, "the report")
    rows = split_rows(model.bundle_, records.records, split)
    unseen = sorted({label for r in rows for label in r.labels} - set(model.bundle_.labels))
    if unseen:
        log.warning(
            f"{records.path}: label(s) {model_dir} never saw are left out of its figures: {', '.join(unseen[:10])}"
        )
    return model, records, rows


def _photos(rows, data_dir) -> tuple[list, list[dict]]:
    """Each row's photo path (None without one), and the rows as the page shows them."""
    images = [str(Path(data_dir) / r.image_id) if r.image_id else None for r in rows]
    return images, [{"image_id": r.id, "caption": r.caption, "image": img} for r, img in zip(rows, images)]


def _data(records, data_dir, ids: list[str], split: str, runs: list[dict]) -> dict:
    """The provenance of the rows reported: the table (path, name, digest), the photos' folder, the rows and
    how many of them each model trained or tuned on."""
    path = getattr(records, "path", None)
    trained = sum(i in r["split"]["train"] for r in runs if r.get("split") for i in ids)
    return {
        "table": str(Path(path).resolve()) if path else None,
        "table_name": Path(path).name if path else None,
        "digest": table_digest(path),
        "images": str(Path(data_dir).resolve()) if data_dir else None,
        "rows_in_table": len(records.records),
        "rows_reported": len(ids),
        "split": split,
        "overlap": [(None if len(runs) == 1 else r["name"], overlap(ids, r)) for r in runs],
        "trained_rows": trained,
    }


def _inputs(model) -> dict:
    engine = model.predictor().engine
    weight = float(engine.late_weight) if engine.kind == "late" and engine.late_combine != "union" else None
    return fusion(engine.kind, engine.late_combine if engine.kind == "late" else None, weight)


def _degraded(model, full, parts, images, captions) -> dict:
    """Fused probabilities with the photo, then the caption, taken away (absent where nothing would be left)."""
    config = model.bundle_.config
    if config.kind == "late":  # late fusion answers a one-input row with that input's head: already computed
        return {"photo removed": parts["text"], "caption removed": parts["image"]}
    out = {}
    if config.uses_text:
        out["photo removed"] = model.predict_details(images=[None] * len(images), captions=captions).probs
    if config.uses_image:
        out["caption removed"] = model.predict_details(images=images, captions=[None] * len(images)).probs
    return out


def _summary_of(model, model_dir, rows, images) -> dict:
    """Run the model over the rows and summarise what it decides, by its own task and rule."""
    captions = [r.caption for r in rows]
    full = model.predict_details(images=images, captions=captions)
    seen = {"image": full.image_present, "text": full.caption_present}  # each head scored where it had input
    parts = {
        head: np.where(seen.get(head, full.image_present | full.caption_present)[:, None], p, np.nan)
        for head, p in full.parts.items()
    }
    known = set(model.bundle_.labels)
    truth = labels_to_matrix([[label for label in r.labels if label in known] for r in rows], model.bundle_.labels)
    return summarize(
        truth,
        full.probs,
        model.thresholds_,
        model.label_names_,
        labels=model.bundle_.labels,
        parts=parts,
        degraded=_degraded(model, full, parts, images, captions),
        ensure_nonempty=model.bundle_.thresholds.get("ensure_nonempty", True),
        history=read_history(Path(model_dir) / "history.csv"),
        task=model.bundle_.config.task,
        inputs=_inputs(model),
    )


def build_report(model_dir, data_dir, csv_path, out, *, split: str = "all", columns=None) -> Path:
    """Run the model over the labelled rows of a table (path, DataFrame or RecordSet) and write the report to
    ``out``. Labels the model never saw are left out of its figures, with a warning naming them."""
    model, records, rows = _labelled_rows(model_dir, csv_path, columns, split)
    images, page_rows = _photos(rows, data_dir)
    summary = _summary_of(model, model_dir, rows, images)
    name = Path(records.path).name if getattr(records, "path", None) else "a table"
    run = describe_run(model_dir)
    title = f"fuselabel report: {run['name']} on {name} ({split} rows)"
    data = _data(records, data_dir, [r.id for r in rows], split, [run])
    return write_report(summary, page_rows, out, title=title, run=run, data=data)


def short_names(model_dirs) -> list[str]:
    """What a page calls each model: its folder's name, with as many parent folders as tell the models apart."""
    parts = [Path(m).resolve().parts for m in model_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(m) for m in model_dirs]  # the same folder named twice: the user's own spelling


def _predictions(models, names, chosen, data_dir) -> tuple[list[dict], list[dict], list]:
    rows = [models[0][1][i] for i in chosen]  # each model's copy of a row holds the same photo, caption, labels
    images, page_rows = _photos(rows, data_dir)
    entries = []
    for name, (model, _) in zip(names, models):
        pred = model.predict_details(images=images, captions=[r.caption for r in rows]).predicted  # its own rule
        entries.append(
            {"name": name, "labels": list(model.bundle_.labels), "names": list(model.label_names_), "pred": pred}
        )
    return entries, page_rows, [list(r.labels) for r in rows]


def build_comparison(model_dirs, data_dir, table, out, *, split: str = "all", columns=None) -> Path:
    """Run each model over the same labelled rows of a table and write one page comparing them to ``out``.

    With ``split`` other than ``all``, the rows are those on that side of every model's own split.
    """
    model_dirs = [Path(m) for m in model_dirs]
    names = short_names(model_dirs)
    models, chosen, records = [], None, None
    for model_dir in model_dirs:
        model, records, rows = _labelled_rows(model_dir, table, columns, split)
        by_id = {r.id: r for r in rows}
        chosen = [r.id for r in rows] if chosen is None else [i for i in chosen if i in by_id]
        models.append((model, by_id))
    if not chosen:
        raise ValueError(f"the models' {split} sides share no row of the table: compare them with --split all")
    entries, page_rows, truth_rows = _predictions(models, names, chosen, data_dir)
    runs = [describe_run(m, name) for m, name in zip(model_dirs, names)]
    table_name = Path(records.path).name if getattr(records, "path", None) else "a table"
    title = f"fuselabel report: {' vs '.join(names)} on {table_name} ({split} rows)"
    data = _data(records, data_dir, chosen, split, runs)
    page = comparison_html(compare(entries, truth_rows), page_rows, title=title, runs=runs, data=data)
    return _write_page(page, out)
