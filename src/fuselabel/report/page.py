"""The report's page: the figures drawn (:func:`draw`), embedded (:func:`figure_html`) and laid out by the
Jinja2 templates beside this module (``templates/``, autoescaped), for one model (:func:`report_html`) or a
comparison (:func:`comparison_html`)."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from .. import figures
from ..images import ImageError, load_rgb
from .provenance import data_facts
from .summary import AVERAGES

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 160  # longest side, pixels
FIGURE_DPI = 192  # figures are shown at 96 CSS px an inch: twice the density, sharp on high-density screens
# Each page's sections, (anchor, heading), in the order its template draws them.
REPORT_SECTIONS = (
    ("summary", "Summary"),
    ("run", "Model, run and data"),
    ("per-label", "Per-label scores"),
    ("thresholds", "Thresholds and ranking"),
    ("calibration", "Calibration"),
    ("training", "Training"),
    ("labels", "Labels"),
    ("inputs", "How much each input carries"),
    ("worst-rows", "Worst rows"),
    ("label-errors", "Likely label errors"),
)
COMPARISON_SECTIONS = (
    ("summary", "Summary"),
    ("run", "Models, runs and data"),
    ("per-label", "Per-label F1"),
    ("disagreements", "Rows where the models disagree"),
)

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def _breakable(value) -> Markup:
    """A value whose paths may wrap after each "/" on a narrow screen, so that no folder name is split."""
    return Markup("/<wbr>").join(escape(str(value)).split("/"))


_TEMPLATES.filters["breakable"] = _breakable


def _render(template: str, sections, **context) -> str:
    """A page from its template: the contents list and each section's heading from ``sections``."""
    return _TEMPLATES.get_template(template).render(toc=sections, headings=dict(sections), **context)


def draw(summary: dict) -> dict[str, tuple[object, str]]:
    """``{name: (figure, caption)}`` for every figure the summary supports, in page order."""
    out = {
        "scores": (figures.per_label_scores(summary), "Per-label precision, recall and F1"),
        "confusion": (figures.confusion_matrices(summary), "Confusion matrices"),
        "thresholds": (figures.threshold_curve(summary), "Mean F1 against the global threshold"),
        "pr_curves": (figures.pr_curves(summary), "Precision-recall curves"),
        "calibration": (figures.reliability(summary), "Reliability diagrams"),
    }
    if summary["history"]:
        out["training"] = (figures.training_curves(summary["history"]), "Training curves")
    out["frequency"] = (figures.label_frequency(summary), "Label frequency")
    out["cooccurrence"] = (figures.cooccurrence(summary), "Label co-occurrence")
    out["modality"] = (figures.modality_share(summary), "How much each input carries")
    return out


def figure_html(fig, caption: str) -> Markup:
    """A matplotlib figure as an embedded PNG at twice the screen's density, shown at its size in CSS px and
    scaled down to the width of a narrower screen."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, facecolor="white")
    width, height = (round(v * FIGURE_DPI) // 2 for v in fig.get_size_inches())
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Markup(
        '<figure><img class="figure" src="data:image/png;base64,{}" width="{}" height="{}" alt="{}"></figure>'
    ).format(data, width, height, caption)


class _Thumbnails:
    """Each row's photo as a small embedded JPEG (made once, however often the row is shown)."""

    def __init__(self, rows: list[dict]):
        self.rows, self.made = rows, {}

    def __call__(self, row: int) -> Markup:
        if row not in self.made:
            self.made[row] = self._make(row)
        return self.made[row]

    def _make(self, row: int) -> Markup:
        info = self.rows[row]
        path = info.get("image")
        if path is None:
            return Markup('<span class="note">no photo</span>')
        try:  # decoded at about the thumbnail's size: a large photo never costs its full size here
            img = load_rgb(path, size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        except ImageError as err:
            log.info("no thumbnail for row %d: %s", row, err)
            return Markup('<span class="note">no usable photo</span>')
        img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=80)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return Markup(
            '<img class="thumb" src="data:image/jpeg;base64,{}" width="{}" height="{}" alt="photo of {}">'
        ).format(data, img.width, img.height, info["image_id"])


def _gallery_row(summary: dict, row: dict, rows: list[dict], thumbs: _Thumbnails) -> dict:
    """A row of a gallery with its labels as names: given, predicted, missed and extra."""
    info, names = rows[row["row"]], summary["names"]
    true, pred = set(row["true"]), set(row["pred"])
    return {
        **row,
        "thumb": thumbs(row["row"]),
        "image_id": info["image_id"],
        "caption": info.get("caption") or "",
        "true": [names[j] for j in sorted(true)],
        "pred": [names[j] for j in sorted(pred)],
        "missed": [names[j] for j in sorted(true - pred)],
        "extra": [names[j] for j in sorted(pred - true)],
    }


def basis(rows: int, data: dict | None) -> str:
    """The rows a figure is computed over, in words: how many, which side of the split, of which table."""
    data = data or {}
    split = data.get("split", "all")
    where = f"{split} rows of {data['table_name']}" if data.get("table_name") else f"{split} rows given"
    return f"{rows} rows ({where})"


def _shown_note(summary: dict) -> str:
    total, shown = len(summary["names"]), len(summary["shown"])
    if shown == total:
        return ""
    return (
        f"The figures show {shown} of the {total} labels: the most frequent, the worst F1 and the most confused, "
        "in turn, most frequent first. The table lists every label."
    )


def report_html(
    summary: dict,
    rows: list[dict],
    *,
    title: str = "fuselabel report",
    run: dict | None = None,
    data: dict | None = None,
) -> str:
    """The page for one model; ``rows[i]`` has ``image_id``, ``caption``, ``image`` (a path or None)."""
    data = data or {}
    thumbs = _Thumbnails(rows)
    r = summary["report"]
    where = basis(summary["rows"], data)
    names = summary["names"]
    issues = [
        {
            **_gallery_row(summary, i, rows, thumbs),
            "disputed": [(names[j], p, k == "given") for j, p, k in i["disputed"]],
        }
        for i in summary["label_issues"]
    ]
    return _render(
        "report.html.j2",
        REPORT_SECTIONS,
        title=title,
        summary=summary,
        inputs=summary.get("inputs"),
        basis=where,
        headline=[
            ("rows", summary["rows"]),
            ("mean F1", f"{r['mean_f1']:.4f}"),
            ("macro F1", f"{r['macro_f1']:.4f}"),
            ("micro F1", f"{r['micro_f1']:.4f}"),
            ("exact match", f"{r['exact_match']:.4f}"),
        ],
        run=run,
        data_facts=data_facts(data),
        figures={name: figure_html(f, caption) for name, (f, caption) in draw(summary).items()},
        shown_note=_shown_note(summary),
        label_rows=[
            (row, "argmax" if summary.get("task") == "multiclass" else f"{t:.2f}")
            for row, t in zip(r["per_label"], summary["thresholds"])
        ],
        worst=[_gallery_row(summary, w, rows, thumbs) for w in summary["worst"]],
        issues=issues,
        advise_val=bool(data.get("trained_rows")) and data.get("split") != "val",
        trained_rows=data.get("trained_rows", 0),
    )


def _run_rows(runs: list[dict]) -> tuple[list, list]:
    """The runs' facts side by side, and the settings whose values differ between them."""
    keys = list(dict.fromkeys(k for r in runs for k, _ in r["facts"]))
    values = [dict(r["facts"]) for r in runs]
    facts = [(k, [v.get(k, "-") for v in values]) for k in keys]
    differ = []
    for k in dict.fromkeys(k for r in runs for k in (*r["settings"], *r["run"])):
        seen = [json.dumps({**r["settings"], **r["run"]}.get(k)) for r in runs]
        if len(set(seen)) > 1:
            differ.append((k, seen))
    return facts, differ


def identical_weights(runs: list[dict]) -> list[str]:
    """A sentence for each pair of models whose folders hold the same weights (by ``sha256.json``)."""
    notes = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a.get("weights") and a["weights"] == b.get("weights"):
                notes.append(f"{a['name']} and {b['name']}: the two folders hold identical weights.")
    return notes


def comparison_html(
    comparison: dict, rows: list[dict], *, title: str, runs: list[dict] | None = None, data: dict | None = None
) -> str:
    """The page comparing models on the same rows; ``rows[i]`` as for :func:`report_html`."""
    models, thumbs, label_name = comparison["models"], _Thumbnails(rows), comparison["names"]
    run_rows, differ = _run_rows(runs) if runs else ([], [])
    fig = figures.f1_deltas(comparison)
    changed = len(figures.changed_labels(comparison, limit=len(comparison["per_label"])))
    averages = {
        f"{name} {key.replace('f1-score', 'F1')}": [m["averages"][name][key] for m in models]
        for name in AVERAGES
        for key in ("precision", "recall", "f1-score")
    }
    # macro F1 beside mean F1, the two headline figures; then every other average
    lines = [("mean F1", [m["mean_f1"] for m in models]), ("macro avg F1", averages.pop("macro avg F1"))]
    lines += averages.items()
    disagree = [
        {
            "thumb": thumbs(d["row"]),
            "image_id": rows[d["row"]]["image_id"],
            "caption": rows[d["row"]].get("caption") or "",
            "true": [label_name.get(t, t) for t in d["true"]],
            "pred": [([label_name.get(t, t) for t in p], f) for p, f in zip(d["pred"], d["f1"])],
        }
        for d in comparison["disagree"]
    ]
    return _render(
        "comparison.html.j2",
        COMPARISON_SECTIONS,
        title=title,
        comparison=comparison,
        names=[m["name"] for m in models],
        basis=basis(comparison["rows"], data),
        identical=identical_weights(runs or []),
        lines=lines,
        runs=runs,
        run_rows=run_rows,
        differ=differ,
        data_facts=data_facts(data or {}),
        deltas=None if fig is None else figure_html(fig, "Per-label F1 differences"),
        deltas_note=f"The {min(changed, 30)} labels whose F1 differs most of the {changed} that differ."
        if changed > 30
        else "",
        disagree=disagree,
    )
