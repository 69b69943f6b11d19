"""``fuselabel report``: one self-contained HTML page about a model on labelled rows.

Three steps, each usable alone: :func:`summarize` computes every figure's numbers from arrays (truth,
probabilities, per-head parts, thresholds, names) into a plain dict; fuselabel.figures draws it; and
:func:`write_report` writes ``index.html`` with the PNGs and photo thumbnails beside it. The page links
only to those files, so the folder can be copied or archived as it is. :func:`build_report` runs the
model over a CSV and does all three.
"""

from __future__ import annotations

import csv
import html
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, precision_recall_curve

from . import figures
from .bundle import replace_folder
from .images import ImageError, load_rgb
from .labels import labels_to_matrix
from .metrics import evaluate, mean_f1, row_f1
from .runtime import decide
from .thresholds import DEFAULT_GRID, apply_thresholds

log = logging.getLogger(__name__)

CALIBRATION_BINS = 10
GALLERY_ROWS = 24        # worst rows shown
ISSUE_ROWS = 30          # likely label errors shown
THUMBNAIL_SIZE = 160     # longest side, pixels
MODALITY_CASES = ("both inputs", "photo removed", "caption removed")


def _calibration(truth: np.ndarray, probs: np.ndarray) -> dict:
    y, p = truth.ravel(), probs.ravel()
    prob_true, prob_pred = calibration_curve(y, p, n_bins=CALIBRATION_BINS)
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    # The same binning as calibration_curve, whose output skips empty bins.
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=CALIBRATION_BINS)
    weights = counts[counts > 0] / len(p)
    return {"prob_true": prob_true, "prob_pred": prob_pred, "edges": edges, "counts": counts,
            # expected calibration error: the bins' gaps between confidence and frequency, weighted by size
            "ece": float(np.sum(weights * np.abs(prob_true - prob_pred))),
            "brier": float(brier_score_loss(y, p))}


def _pr_curves(truth: np.ndarray, probs: np.ndarray, per_label: list[dict]) -> list[dict]:
    curves = []
    for j, r in enumerate(per_label):
        if not truth[:, j].any():
            curves.append({"ap": None})
            continue
        precision, recall, _ = precision_recall_curve(truth[:, j], probs[:, j])
        curves.append({"precision": precision, "recall": recall, "point": (r["recall"], r["precision"]),
                       "ap": float(average_precision_score(truth[:, j], probs[:, j]))})
    return curves


def _label_issues(truth: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> tuple[list[dict], str]:
    """Rows whose given labels the model most confidently disputes (cleanlab, multi-label), best first."""
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues

    given = [[int(j) for j in np.flatnonzero(row)] for row in truth]
    try:
        with warnings.catch_warnings(record=True) as caught:
            # cleanlab warns once per rare label per call; said once in the log instead of dozens of times
            warnings.simplefilter("always")
            ranked = find_label_issues(labels=given, pred_probs=probs, return_indices_ranked_by="self_confidence",
                                       n_jobs=1)  # a process pool per label costs more than it saves
            quality = get_label_quality_scores(given, probs)
    except ValueError as err:  # e.g. a label that no row holds
        return [], f"cleanlab could not rank these rows: {err}"
    for message in sorted({str(w.message) for w in caught}):
        log.info("cleanlab: %s", message)
    issues = []
    for i in ranked[:ISSUE_ROWS]:
        # What the model disputes: labels given that it does not predict, labels it predicts that are not given;
        # the most confident first.
        disputed = [(int(j), float(probs[i, j]), "given" if truth[i, j] else "missing")
                    for j in np.flatnonzero(truth[i].astype(bool) != pred[i])]
        disputed.sort(key=lambda d: d[1] if d[2] == "given" else 1 - d[1])
        issues.append({"row": int(i), "quality": float(quality[i]), "disputed": disputed})
    if not issues:
        return [], "cleanlab flags no row: the model disputes none of the given label sets"
    return issues, f"{len(ranked)} rows flagged by cleanlab; the {len(issues)} most confident shown"


def summarize(truth, probs, thresholds, names, *, labels=None, parts=None, degraded=None,
              ensure_nonempty: bool = True, history: list[dict] | None = None) -> dict:
    """Every number the report shows, from arrays.

    Args:
        truth: ``(n, L)`` 0/1 given labels.
        probs: ``(n, L)`` fused probabilities; rows with NaN (no usable input) are left out and counted.
        thresholds: ``(L,)`` the model's own thresholds.
        names: ``L`` label names, for every figure and table.
        labels: ``L`` label tokens (default: the names).
        parts: ``{head: (n, L)}`` per-head probabilities, each with NaN where that head had no input.
        degraded: ``{"photo removed": (n, L), "caption removed": (n, L)}`` fused probabilities with one
            input taken away (a case the model cannot be scored on is absent or None).
        ensure_nonempty: the model's fallback when no label reaches its threshold.
        history: per-epoch ``{"epoch", "train_loss", "val_loss", "val_f1"}`` of the run, if known.

    Returns:
        A dict of plain values and numpy arrays; row indices in it refer to the rows given.
    """
    truth = np.asarray(truth).astype(np.uint8)
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    names = [str(n) for n in names]
    labels = [str(x) for x in (labels if labels is not None else names)]
    if truth.shape != probs.shape or truth.shape[1] != len(names) or thresholds.shape != (len(names),):
        raise ValueError(f"report arrays disagree: truth {truth.shape}, probabilities {probs.shape}, "
                         f"thresholds {thresholds.shape}, {len(names)} label names")
    usable = np.flatnonzero(np.isfinite(probs).all(1))
    if len(usable) == 0:
        raise ValueError("no row has a usable photo or caption, so there is nothing to report")
    y, p = truth[usable], probs[usable]
    pred = decide(p, thresholds, ensure_nonempty)
    report = evaluate(y, pred, labels, dict(zip(labels, names)))

    uniform = bool(np.all(thresholds == thresholds[0]))
    curve = np.array([row_f1(y, apply_thresholds(p, t, ensure_nonempty)).mean() for t in DEFAULT_GRID])

    calibration = {}
    for head, values in (parts or {}).items():
        values = np.asarray(values, dtype=np.float64)[usable]
        rows = np.isfinite(values).all(1)
        if rows.any():
            calibration[head] = _calibration(y[rows], values[rows])
    calibration["fused"] = _calibration(y, p)

    modality = {MODALITY_CASES[0]: report["mean_f1"]}
    for case in MODALITY_CASES[1:]:
        other = (degraded or {}).get(case)
        modality[case] = None if other is None else mean_f1(
            y, decide(np.asarray(other, dtype=np.float64)[usable], thresholds, ensure_nonempty))

    # Worst rows: lowest row F1, then the largest gap between the given labels and the probabilities.
    f1 = row_f1(y, pred)
    gap = np.abs(y - p).sum(1)
    order = np.lexsort((-gap, f1))[:GALLERY_ROWS]
    worst = [{"row": int(usable[i]), "f1": float(f1[i]), "true": np.flatnonzero(y[i]).tolist(),
              "pred": np.flatnonzero(pred[i]).tolist()} for i in order]

    issues, issue_note = _label_issues(y, p, pred)
    for issue in issues:
        local = issue["row"]
        issue.update(row=int(usable[local]), true=np.flatnonzero(y[local]).tolist(),
                     pred=np.flatnonzero(pred[local]).tolist())

    return {
        "labels": labels, "names": names, "rows": len(usable), "rows_given": len(truth),
        "rows_without_input": len(truth) - len(usable), "thresholds": thresholds, "ensure_nonempty": ensure_nonempty,
        "report": report,
        "threshold_curve": {"grid": DEFAULT_GRID, "mean_f1": curve, "chosen": float(thresholds[0]) if uniform else None,
                            "model_mean_f1": report["mean_f1"]},
        "pr": _pr_curves(y, p, report["per_label"]),
        "calibration": calibration,
        "frequency": y.sum(0).astype(int),
        "cooccurrence": (y.T.astype(np.int64) @ y.astype(np.int64)),
        "modality": modality,
        "history": history,
        "worst": worst,
        "label_issues": issues, "label_issue_note": issue_note,
    }


def read_history(path: str | Path) -> list[dict] | None:
    """Per-epoch training loss, validation loss and validation mean F1 from a Lightning CSVLogger file."""
    path = Path(path)
    if not path.is_file():
        return None
    epochs: dict[int, dict] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            entry = epochs.setdefault(int(float(row["epoch"])), {})
            for key, column in (("train_loss", "train_loss_epoch"), ("val_loss", "val_loss"), ("val_f1", "val_f1")):
                if row.get(column):
                    entry[key] = float(row[column])
    return [{"epoch": e, **v} for e, v in sorted(epochs.items()) if v] or None


def draw(summary: dict) -> dict[str, tuple[object, str]]:
    """``{file name: (figure, caption)}`` for every figure the summary supports, in page order."""
    out = {
        "scores.png": (figures.per_label_scores(summary), "Per-label precision, recall and F1"),
        "confusion.png": (figures.confusion_matrices(summary), "Confusion matrices"),
        "thresholds.png": (figures.threshold_curve(summary), "Mean F1 against the global threshold"),
        "pr_curves.png": (figures.pr_curves(summary), "Precision-recall curves"),
        "calibration.png": (figures.reliability(summary), "Reliability diagrams"),
    }
    if summary["history"]:
        out["training.png"] = (figures.training_curves(summary["history"]), "Training curves")
    out["frequency.png"] = (figures.label_frequency(summary), "Label frequency")
    out["cooccurrence.png"] = (figures.cooccurrence(summary), "Label co-occurrence")
    out["modality.png"] = (figures.modality_share(summary), "How much each input carries")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The page

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
img.figure { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.gallery td { max-width: 320px; }
.caption { white-space: pre-wrap; }
.note { color: #555; font-style: italic; }
.miss { color: #b22; } .extra { color: #b60; }
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _names(summary: dict, columns) -> str:
    return ", ".join(_esc(summary["names"][j]) for j in columns) or "<i>none</i>"


def _thumbnail(image_path, out_dir: Path, row: int) -> str | None:
    """A small JPEG of the row's photo beside the page; its file name, or None when the photo is unusable."""
    if image_path is None:
        return None
    try:
        img = load_rgb(image_path)
    except ImageError as err:
        log.info("no thumbnail for row %d: %s", row, err)
        return None
    img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    name = f"thumb_{row}.jpg"
    img.save(out_dir / name, "JPEG", quality=80)
    return name


def _row_cells(summary: dict, row: dict, rows: list[dict], out_dir: Path) -> str:
    info = rows[row["row"]]
    thumb = _thumbnail(info.get("image"), out_dir, row["row"])
    picture = (f'<img src="{_esc(thumb)}" alt="photo of {_esc(info["image_id"])}">' if thumb
               else '<span class="note">no usable photo</span>')
    true, pred = set(row["true"]), set(row["pred"])
    return (f"<td>{picture}</td><td>{_esc(info['image_id'])}<div class=\"caption\">{_esc(info.get('caption') or '')}"
            f"</div></td><td>{_names(summary, sorted(true))}</td><td>{_names(summary, sorted(pred))}"
            f"<div class=\"miss\">missed: {_names(summary, sorted(true - pred))}</div>"
            f"<div class=\"extra\">extra: {_names(summary, sorted(pred - true))}</div></td>")


def _headline(summary: dict, title: str) -> str:
    r = summary["report"]
    items = [("rows", summary["rows"]), ("mean F1", f"{r['mean_f1']:.4f}"), ("micro F1", f"{r['micro_f1']:.4f}"),
             ("macro F1", f"{r['macro_f1']:.4f}"), ("exact match", f"{r['exact_match']:.4f}")]
    body = "".join(f"<tr><th>{_esc(k)}</th><td class=\"num\">{_esc(v)}</td></tr>" for k, v in items)
    note = ""
    if summary["rows_without_input"]:
        note = (f'<p class="note">{summary["rows_without_input"]} of {summary["rows_given"]} rows had neither a '
                "usable photo nor a caption and are left out of every figure.</p>")
    return f"<h1>{_esc(title)}</h1><table>{body}</table>{note}"


def _label_table(summary: dict) -> str:
    head = "<tr><th>label</th><th>name</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th>" \
           "<th>support</th><th>predicted</th></tr>"
    body = "".join(
        f"<tr><td>{_esc(r['label'])}</td><td>{_esc(r['name'])}</td><td class=\"num\">{t:.2f}</td>"
        f"<td class=\"num\">{r['precision']:.3f}</td><td class=\"num\">{r['recall']:.3f}</td>"
        f"<td class=\"num\">{r['f1']:.3f}</td><td class=\"num\">{r['support']}</td>"
        f"<td class=\"num\">{r['predicted']}</td></tr>"
        for r, t in zip(summary["report"]["per_label"], summary["thresholds"]))
    return f"<table>{head}{body}</table>"


def _modality_table(summary: dict) -> str:
    cells = "".join(f"<tr><th>{_esc(k)}</th><td class=\"num\">{'-' if v is None else f'{v:.4f}'}</td></tr>"
                    for k, v in summary["modality"].items())
    return (f"<table>{cells}</table><p class=\"note\">Photo removed: every row predicted from its caption alone; "
            "caption removed: from its photo alone ('-': the model does not read that input, so removing the other "
            "leaves it nothing).</p>")


def _issues_table(summary: dict, rows: list[dict], out_dir: Path) -> str:
    if not summary["label_issues"]:
        return f'<p class="note">{_esc(summary["label_issue_note"])}</p>'
    head = "<tr><th>#</th><th>photo</th><th>row</th><th>given labels</th><th>predicted</th>" \
           "<th>disputed (probability)</th><th>label quality</th></tr>"
    body = []
    for rank, issue in enumerate(summary["label_issues"], 1):
        disputed = "; ".join(f"{'given' if kind == 'given' else 'not given'}: {_esc(summary['names'][j])} ({p:.2f})"
                             for j, p, kind in issue["disputed"]) or "-"
        cells = _row_cells(summary, issue, rows, out_dir)
        row_id = _esc(rows[issue["row"]]["image_id"])
        body.append(f"<tr data-image-id=\"{row_id}\"><td class=\"num\">{rank}</td>{cells}<td>{disputed}</td>"
                    f"<td class=\"num\">{issue['quality']:.3f}</td></tr>")
    return (f"<p>{_esc(summary['label_issue_note'])}. The model has learnt the labels of the rows it trained on, "
            "so the ranking is sharpest on rows it did not (<code>--split val</code>).</p>"
            f"<table class=\"gallery\" id=\"label-issues\">{head}{''.join(body)}</table>")


def write_report(summary: dict, rows: list[dict], out: str | Path, *, title: str = "fuselabel report") -> Path:
    """Write ``out/index.html`` with its figures and thumbnails; ``rows[i]`` has ``image_id``, ``caption``, ``image``.

    The folder is built beside ``out`` and renamed into place when complete, so an interrupted report
    leaves any earlier one as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sections = [_headline(summary, title)]
        figs = draw(summary)
        for name, (fig, _) in figs.items():
            fig.savefig(tmp / name, dpi=90)
        img = {name: f'<img class="figure" src="{name}" alt="{_esc(caption)}">' for name, (_, caption) in figs.items()}
        sections.append("<h2>Per-label scores</h2>" + img["scores.png"] + _label_table(summary) + img["confusion.png"])
        sections.append("<h2>Thresholds and ranking</h2>" + img["thresholds.png"] + img["pr_curves.png"])
        sections.append("<h2>Calibration</h2>" + img["calibration.png"])
        sections.append("<h2>Training</h2>" + (img.get("training.png") or
                        '<p class="note">The model folder has no history.csv, so there are no training curves.</p>'))
        sections.append("<h2>Labels</h2>" + img["frequency.png"] + img["cooccurrence.png"])
        sections.append("<h2>How much each input carries</h2>" + img["modality.png"] + _modality_table(summary))
        gallery = "".join(f"<tr><td class=\"num\">{w['f1']:.2f}</td>{_row_cells(summary, w, rows, tmp)}</tr>"
                          for w in summary["worst"])
        sections.append("<h2>Worst rows</h2><table class=\"gallery\"><tr><th>row F1</th><th>photo</th><th>row</th>"
                        f"<th>given labels</th><th>predicted</th></tr>{gallery}</table>")
        sections.append("<h2>Likely label errors</h2>" + _issues_table(summary, rows, tmp))
        page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
                f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
        (tmp / "index.html").write_text(page, encoding="utf-8")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


# ---------------------------------------------------------------------------------------------------------------
# From a model folder and a CSV


def build_report(model_dir, data_dir, csv_path, out, *, split: str = "all") -> Path:
    """Run the model over the labelled rows of ``csv_path`` and write the report to ``out``."""
    from .estimator import FuseLabel, split_rows
    from .records import read_records

    records = read_records(csv_path)
    if not records.labelled:
        raise ValueError(f"{csv_path}: the report needs a Labels column (header ImageID,Labels,Caption)")
    rows = split_rows(model_dir, records.records, split)
    model = FuseLabel.from_pretrained(model_dir)
    config = model.bundle_.config
    images = [str(Path(data_dir) / r.image_id) for r in rows]
    captions = [r.caption for r in rows]
    full = model.predict_details(images=images, captions=captions)
    # Each head's figures cover only the rows that had its input.
    seen = {"image": full.image_present, "text": full.caption_present}
    parts = {head: np.where(seen.get(head, full.image_present | full.caption_present)[:, None], p, np.nan)
             for head, p in full.parts.items()}
    degraded = {}
    if config.kind == "late":
        # Late fusion answers a one-input row with that input's head: the heads already hold the answers.
        degraded["photo removed"] = parts["text"]
        degraded["caption removed"] = parts["image"]
    else:  # taking away the only input a model reads leaves nothing to score
        if config.uses_text:
            degraded["photo removed"] = model.predict_details(images=[None] * len(rows), captions=captions).probs
        if config.uses_image:
            degraded["caption removed"] = model.predict_details(images=images, captions=[None] * len(rows)).probs
    truth = labels_to_matrix([r.labels for r in rows], model.bundle_.labels)
    summary = summarize(truth, full.probs, model.thresholds_, model.label_names_, labels=model.bundle_.labels,
                        parts=parts, degraded=degraded,
                        ensure_nonempty=model.bundle_.thresholds.get("ensure_nonempty", True),
                        history=read_history(Path(model_dir) / "history.csv"))
    page_rows = [{"image_id": r.image_id, "caption": r.caption, "image": img} for r, img in zip(rows, images)]
    title = f"fuselabel report: {Path(model_dir).name} on {Path(csv_path).name} ({split} rows)"
    return write_report(summary, page_rows, out, title=title)
