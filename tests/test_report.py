"""``fuselabel report``: one self-contained HTML file, its figures, its averages, its run section, the comparison
of two models, its likely-label-errors ranking, and a report on hundreds of labels (test_report_browser opens the
pages in a real browser).

Two tiny models are trained per module (as in test_cli) on rows whose labels carry names; the reports run on a
copy of those rows where a few rows' labels are swapped for wrong ones, which the page must rank among its likely
label errors.
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import io
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LABELS, TINY_SETTINGS, make_tiny_dataset
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from PIL import Image
from sklearn.metrics import f1_score, precision_recall_fscore_support
from test_cli import TINY_TRAIN

from fuselabel import __version__, figures
from fuselabel.cli import main
from fuselabel.metrics import evaluate
from fuselabel.outputs import OutputError
from fuselabel.records import read_records
from fuselabel.report import (
    build_comparison,
    build_report,
    compare,
    describe_run,
    draw,
    fusion,
    read_history,
    short_names,
    summarize,
    write_report,
)
from fuselabel.runtime import decide
from fuselabel.thresholds import apply_argmax

# Names that appear nowhere else on the page (captions use the plain words).
NAMES = {label: f"{word}-label" for label, (_, word) in TINY_LABELS.items()}
FLIPPED = ["5.jpg", "17.jpg", "30.jpg"]
SECTIONS = [
    "summary",
    "run",
    "per-label",
    "thresholds",
    "calibration",
    "training",
    "labels",
    "inputs",
    "worst-rows",
    "label-errors",
]


def _write_csv(records, path: Path, labels_for=lambda r: r.labels) -> None:
    lines = ["ImageID,Labels,Caption"] + [f'{r.image_id},{" ".join(labels_for(r))},"{r.caption}"' for r in records]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def reported(tmp_path_factory, session_cache):
    """Two models (12 epochs, and 1 epoch to compare with), the data, the report of the first and the comparison.

    Twelve epochs rather than test_cli's two: a model must be sure of itself before it disputes a label.
    """
    root = tmp_path_factory.mktemp("report")
    image_dir, csv = make_tiny_dataset(root)
    (root / "label_names.csv").write_text("Label,Name\n" + "".join(f"{k},{v}\n" for k, v in NAMES.items()))
    model, weak = root / "model", root / "weak"
    for folder, epochs in ((model, "12"), (weak, "1")):
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(image_dir),
                    "--csv",
                    str(csv),
                    "--out",
                    str(folder),
                    "--cache-dir",
                    session_cache,
                    *TINY_TRAIN,
                    "--epochs",
                    epochs,
                ]
            )
            == 0
        )
    # Each flipped row gets exactly the labels it does not have.
    flipped = root / "flipped.csv"
    _write_csv(
        read_records(csv).records,
        flipped,
        lambda r: sorted(set(NAMES) - set(r.labels), key=int) if r.image_id in FLIPPED else r.labels,
    )
    out = root / "out" / "report.html"
    code = main(["report", str(model), "--data", str(image_dir), "--csv", str(flipped), "--out", str(out)])
    compared = root / "out" / "compare.html"
    compare_code = main(
        ["report", str(weak), str(model), "--data", str(image_dir), "--csv", str(flipped), "--out", str(compared)]
    )
    return {
        "model": model,
        "weak": weak,
        "images": image_dir,
        "csv": flipped,
        "out": out,
        "code": code,
        "compared": compared,
        "compare_code": compare_code,
    }


class _Page(html.parser.HTMLParser):
    """Every URL the page refers to, its images, meta tags, contents links, section ids, the rows of its
    galleries (by table id) and every table's cells (by table id), and its text."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.scripts: list[dict] = []
        self.urls: list[str] = []
        self.meta: dict[str, str] = {}
        self.toc: list[str] = []
        self.ids: list[str] = []
        self.tags: list[str] = []
        self.row_ids: dict[str, list[str]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._table = self._nav = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        for key in ("src", "href", "srcset", "poster", "data"):
            if attrs.get(key):
                self.urls.append(attrs[key])
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts.append(attrs)
        if tag == "meta" and "name" in attrs:
            self.meta[attrs["name"]] = attrs.get("content", "")
        if tag == "nav":
            self._nav = True
        if tag == "a" and self._nav:
            self.toc.append(attrs["href"])
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table":
            self._table = attrs.get("id") or attrs.get("class") or ""
            self.tables.setdefault(self._table, [])
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
            if "data-image-id" in attrs:
                self.row_ids.setdefault(self._table, []).append(attrs["data-image-id"])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag == "nav":
            self._nav = False
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _page(path: Path) -> _Page:
    return _Page(path.read_text(encoding="utf-8"))


def _decoded(src: str) -> Image.Image:
    kind, data = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src).groups()
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.format == kind.upper()
    img.load()
    return img


def test_report_is_one_file_that_needs_nothing_beside_it(reported):
    assert reported["code"] == 0 and reported["compare_code"] == 0
    # Nothing is written beside the two pages: no figures, thumbnails, temporary files or locks.
    assert sorted(p.name for p in reported["out"].parent.iterdir()) == ["compare.html", "report.html"]
    page = _page(reported["out"])
    assert page.meta["viewport"] == "width=device-width, initial-scale=1"
    assert page.meta["generator"] == "fuselabel report"
    assert "link" not in page.tags and "iframe" not in page.tags
    assert len(page.scripts) == 1 and not page.scripts[0], "one inline script (sorting and filtering tables)"
    # Every reference is inside the file: embedded images, or anchors on the page itself.
    outside = [u for u in page.urls if not (u.startswith("data:image/") or u.startswith("#"))]
    assert not outside, f"references to other files: {outside}"
    assert "url(" not in reported["out"].read_text(), "the style sheet must not fetch anything"
    figures_ = [img for img in page.images if img["class"] == "figure"]
    thumbs = [img for img in page.images if img["class"] == "thumb"]
    assert len(figures_) == 9, "the model folder has history.csv, so training curves are drawn too"
    assert thumbs, "worst-row gallery thumbnails"
    for img in figures_:
        png = _decoded(img["src"])
        # Twice the density it is shown at: sharp on a high-density screen.
        assert abs(png.width - 2 * int(img["width"])) <= 2 and abs(png.height - 2 * int(img["height"])) <= 2
    for img in thumbs:
        jpeg = _decoded(img["src"])
        assert max(jpeg.size) <= 160 and (jpeg.width, jpeg.height) == (int(img["width"]), int(img["height"]))


def test_report_has_contents_linking_every_section(reported):
    page = _page(reported["out"])
    assert page.toc == [f"#{s}" for s in SECTIONS]
    assert set(SECTIONS) <= set(page.ids)


def test_report_names_every_label(reported):
    text = " ".join(_page(reported["out"]).text)
    for name in NAMES.values():
        assert name in text, name
    for case in ("both inputs", "photo removed", "caption removed"):
        assert case in text


def test_run_section_names_the_model_its_training_and_the_data(reported):
    model = reported["model"]
    facts = dict(_page(reported["out"]).tables["facts"])
    split = json.loads((model / "split.json").read_text())
    config = json.loads((model / "config.json").read_text())
    metrics = json.loads((model / "metrics.json").read_text())
    weights = json.loads((model / "sha256.json").read_text())["model.safetensors"]
    assert facts["model"] == "model"
    assert facts["model id (weights sha256)"] == weights[:16]
    assert facts["training rows"] == str(len(split["train_ids"]))
    assert facts["validation rows"] == str(len(split["val_ids"]))
    assert facts["epochs"] == f"{metrics['epochs_run']} run of 12"
    assert facts["image encoder"] == f"{config['image_model']} at {config['image_size']} px"
    assert facts["training time"].endswith(" s")
    assert facts["table"] == str(reported["csv"].resolve()) and facts["rows in the table"] == "48"
    assert facts["table sha256"] == hashlib.sha256(reported["csv"].read_bytes()).hexdigest()[:16]
    assert facts["image folder"] == str(reported["images"].resolve())
    assert facts["rows reported"] == "48 (all rows)"
    train, val = len(split["train_ids"]), len(split["val_ids"])
    assert facts["overlap with the model's split"] == (
        f"{train} in model's training rows, {val} in its validation rows (of 48 reported)"
    )
    assert facts["by"] == f"fuselabel {__version__}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d.*", facts["report written"])
    assert str(model.resolve()) not in reported["out"].read_text(), "the model is named by its folder's name"


def test_report_ranks_wrong_labels_as_likely_errors(reported):
    ranked = _page(reported["out"]).row_ids["label-issues"]
    assert ranked, "no likely label errors listed"
    top = ranked[: len(FLIPPED) + 2]
    assert set(FLIPPED) <= set(top), f"flipped rows {FLIPPED}, top of the ranking {top}"


def test_report_on_an_unlabelled_table_fails_cleanly_and_keeps_the_old_report(reported, tmp_path, capsys):
    before = reported["out"].read_bytes()
    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text(
        "ImageID,Caption\n" + "".join(f'{r.image_id},"{r.caption}"\n' for r in read_records(reported["csv"]).records)
    )
    capsys.readouterr()
    code = main(
        [
            "report",
            str(reported["model"]),
            "--data",
            str(reported["images"]),
            "--csv",
            str(unlabelled),
            "--out",
            str(reported["out"]),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Labels column" in err and str(unlabelled) in err and "Traceback" not in err
    assert reported["out"].read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# Two models side by side


def test_two_models_compare_on_the_same_rows(reported):
    page = _page(reported["compared"])
    single = _page(reported["out"])
    labels = page.tables["compare-labels"]
    assert labels[0] == ["label", "name", "support", "weak", "model", "model − weak"]
    assert [row[1] for row in labels[1:]] == list(NAMES.values())
    for row in labels[1:]:
        weak, strong, delta = float(row[3]), float(row[4]), float(row[5])
        assert delta == pytest.approx(strong - weak, abs=1.5e-4), row
    # The stronger model's column is its own report's figures, on the same rows.
    summary = {row[0]: row[1:] for row in page.tables["compare-summary"][1:]}
    assert [row[0] for row in page.tables["compare-summary"][1:3]] == ["mean F1", "macro avg F1"]
    single_mean = dict(single.tables["headline"])["mean F1"]
    assert summary["mean F1"][1] == single_mean
    averages = {row[0]: row[1:] for row in single.tables["averages"][1:]}
    assert summary["macro avg F1"][1] == averages["macro avg"][2]
    assert float(summary["mean F1"][2]) == pytest.approx(
        float(summary["mean F1"][1]) - float(summary["mean F1"][0]), abs=1.5e-4
    )
    # The disagreements: real rows of the table, each shown with both models' label sets.
    text = " ".join(page.text)
    count, rows = map(int, re.search(r"(\d+) of (\d+) rows get different label sets", text).groups())
    assert rows == 48 and 0 < count <= rows
    shown = page.row_ids["disagreements"]
    assert len(shown) == min(count, 30) and set(shown) <= {r.image_id for r in read_records(reported["csv"]).records}
    assert all(img["src"].startswith("data:image/") for img in page.images)
    assert page.toc == ["#summary", "#run", "#per-label", "#disagreements"]
    assert page.meta["viewport"].startswith("width=device-width")


def test_compare_from_arrays_matches_sklearn_and_finds_every_disagreement():
    rng = np.random.default_rng(3)
    tokens = ["a", "b", "c", "d"]
    truth = (rng.random((60, 4)) < 0.4).astype(int)
    first = np.where(rng.random(truth.shape) < 0.8, truth, 1 - truth)
    second = np.where(rng.random(truth.shape) < 0.9, truth, 1 - truth)
    truth_rows = [[t for t, v in zip(tokens, row) if v] for row in truth]
    # The second model knows one more label, which no row holds: it is listed, with no delta.
    result = compare(
        [
            {"name": "A", "labels": tokens, "names": tokens, "pred": first},
            {"name": "B", "labels": tokens + ["e"], "names": tokens + ["e"], "pred": np.c_[second, np.zeros(60, int)]},
        ],
        truth_rows,
    )
    f1_a, f1_b = (
        f1_score(truth, first, average=None, zero_division=0),
        f1_score(truth, second, average=None, zero_division=0),
    )
    for j, row in enumerate(result["per_label"][:4]):
        assert row["f1"] == pytest.approx([f1_a[j], f1_b[j]])
        assert row["delta"] == [pytest.approx(f1_b[j] - f1_a[j])]
    assert result["per_label"][4]["f1"][0] is None and result["per_label"][4]["delta"] == [None]
    differ = np.flatnonzero((first != second).any(1))
    assert result["disagree_count"] == len(differ)
    assert len(result["disagree"]) == min(len(differ), 30)
    assert {d["row"] for d in result["disagree"]} <= set(differ)
    spreads = [max(d["f1"]) - min(d["f1"]) for d in result["disagree"]]
    assert spreads == sorted(spreads, reverse=True)
    with pytest.raises(ValueError, match="at least two"):
        compare(result["models"][:1], truth_rows)


# ---------------------------------------------------------------------------------------------------------------
# The page from arrays


def _arrays(rows=120, labels=5, seed=0):
    rng = np.random.default_rng(seed)
    truth = (rng.random((rows, labels)) < 0.3).astype(np.int64)
    truth[np.arange(rows), rng.integers(0, labels, rows)] = 1
    probs = 1 / (1 + np.exp(-((2 * truth - 1) * 2.5 + rng.normal(0, 1.2, truth.shape))))
    return truth, probs


def _synthetic(rows=120, labels=5, seed=0, **kwargs) -> dict:
    truth, probs = _arrays(rows, labels, seed)
    return summarize(truth, probs, np.full(labels, 0.45), [f"name{j}" for j in range(labels)], **kwargs)


def _rows(n: int) -> list[dict]:
    return [{"image_id": f"{i}.jpg", "caption": f"caption {i}", "image": None} for i in range(n)]


def test_averages_on_the_page_are_sklearns(tmp_path):
    truth, probs = _arrays()
    thresholds = np.array([0.3, 0.45, 0.5, 0.6, 0.45])
    summary = summarize(truth, probs, thresholds, [f"name{j}" for j in range(5)])
    pred = decide(probs, thresholds, True)
    table = _page(write_report(summary, _rows(120), tmp_path / "r.html")).tables["averages"]
    assert table[0] == ["", "precision", "recall", "F1", "support"]
    shown = {row[0]: [float(v) for v in row[1:]] for row in table[1:]}
    assert list(shown) == ["micro avg", "macro avg", "weighted avg", "samples avg"]
    for name, values in shown.items():
        p, r, f, _ = precision_recall_fscore_support(truth, pred, average=name.split()[0], zero_division=0)
        assert values == pytest.approx([p, r, f, truth.sum()], abs=5e-5), name


def test_summary_marks_the_model_threshold_and_leaves_out_rows_without_input():
    rng = np.random.default_rng(1)
    truth = (rng.random((50, 3)) < 0.5).astype(int)
    truth[:, 0] = 1
    probs = np.clip(truth * 0.7 + rng.random((50, 3)) * 0.3, 0, 1)
    probs[[4, 9]] = np.nan
    s = summarize(truth, probs, np.full(3, 0.5), ["a", "b", "c"], degraded={"photo removed": np.full((50, 3), np.nan)})
    assert s["rows"] == 48 and s["rows_without_input"] == 2
    curve = s["threshold_curve"]
    assert curve["chosen"] == 0.5
    # The marked point lies on the curve: the curve at 0.5 is the model's own mean F1.
    at_half = curve["mean_f1"][np.flatnonzero(np.isclose(curve["grid"], 0.5))[0]]
    assert at_half == pytest.approx(s["report"]["mean_f1"])
    # A degraded case with no input at all predicts nothing (F1 0); one not given is not scored.
    assert s["modality"]["photo removed"] == 0.0 and s["modality"]["caption removed"] is None
    assert set(s["calibration"]) == {"fused"}
    per_class = summarize(truth, probs, np.array([0.3, 0.5, 0.7]), ["a", "b", "c"])
    assert per_class["threshold_curve"]["chosen"] is None


@pytest.mark.parametrize("labels, name", [(4, "x"), (18, "motorcycle"), (40, "traffic light"), (500, "label")])
def test_figures_have_readable_text_and_little_blank(labels, name):
    """No text under 8 points (11 CSS px as shown); the frequency and co-occurrence plots fill their figures."""
    truth, probs = _arrays(rows=200, labels=labels)
    summary = summarize(
        truth,
        probs,
        np.full(labels, 0.45),
        [f"{name} {j}" for j in range(labels)],
        history=[{"epoch": 0, "train_loss": 1.0, "val_loss": 0.9, "val_f1": 0.5}],
    )
    for key, (fig, _) in draw(summary).items():
        FigureCanvasAgg(fig).draw()
        small = {t.get_text() for t in fig.findobj(Text) if t.get_text() and t.get_visible() and t.get_fontsize() < 8}
        assert not small, f"{key}: text under 8 pt: {sorted(small)[:5]}"
        if key in ("frequency", "cooccurrence"):
            box = fig.axes[0].get_position()
            assert box.width * box.height > 0.5, f"{key}: the plot fills {box.width * box.height:.0%} of its figure"


def test_page_without_history_says_so_and_draws_no_training_figure(tmp_path):
    s = _synthetic()
    assert s["history"] is None and read_history(tmp_path / "history.csv") is None
    page = _page(write_report(s, _rows(120), tmp_path / "r.html"))
    assert "no history.csv" in " ".join(page.text)
    assert "Training curves" not in [img["alt"] for img in page.images]
    assert len(page.images) == 8


def test_interrupted_report_leaves_the_earlier_one(tmp_path, monkeypatch):
    out = tmp_path / "r.html"
    write_report(_synthetic(), _rows(120), out)
    before = out.read_bytes()

    def broken(summary):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "cooccurrence", broken)
    with pytest.raises(RuntimeError):
        write_report(_synthetic(seed=2), _rows(120), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_what_an_existing_output_may_be(tmp_path):
    s, rows = _synthetic(), _rows(120)
    # A folder an earlier fuselabel wrote (index.html with its figures and thumbnails beside it): the page becomes
    # its index.html, the files that report wrote go, and nothing else in it is touched.
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.html").write_text("<!DOCTYPE html>\n<html><head><title>fuselabel report: m on t.csv</title>")
    for name in ("scores.png", "pr_curves.png", "thumb_3.jpg"):
        (old / name).write_bytes(b"old")
    (old / "notes.txt").write_text("mine")
    assert write_report(s, rows, old) == old / "index.html"
    assert sorted(p.name for p in old.iterdir()) == ["index.html", "notes.txt"]
    assert (old / "notes.txt").read_text() == "mine" and "data:image/png" in (old / "index.html").read_text()
    # Any other folder, or a file that is not a report, is refused and left as it was.
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.jpg").write_bytes(b"photo")
    with pytest.raises(OutputError, match="is a folder; --out names the HTML file"):
        write_report(s, rows, mine)
    assert [p.name for p in mine.iterdir()] == ["a.jpg"]
    page = tmp_path / "page.html"
    page.write_text("<html><title>my page</title></html>")
    with pytest.raises(OutputError, match="not a fuselabel report"):
        write_report(s, rows, page)
    assert page.read_text() == "<html><title>my page</title></html>"
    # A report file is replaced.
    report = tmp_path / "report.html"
    write_report(s, rows, report)
    write_report(_synthetic(seed=4), rows, report)
    assert report.read_text().count("data:image/png") == 8


def test_read_history_from_a_lightning_metrics_file(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(
        "epoch,step,train_loss_epoch,train_loss_step,val_f1,val_loss\n"
        "0,1,,0.9,,\n0,2,,,0.5,0.8\n0,2,0.85,,,\n1,5,,,0.6,0.7\n1,5,0.6,,,\n"
    )
    assert read_history(path) == [
        {"epoch": 0, "train_loss": 0.85, "val_loss": 0.8, "val_f1": 0.5},
        {"epoch": 1, "train_loss": 0.6, "val_loss": 0.7, "val_f1": 0.6},
    ]


# ---------------------------------------------------------------------------------------------------------------
# What the figures rest on: the rows, the model's own rule, the inputs it uses


def _section(path: Path, anchor: str) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(f'<section id="{anchor}">')
    return text[start : text.index("</section>", start)]


def test_headline_figures_name_their_rows_and_the_errors_note_fits_the_table(reported, tmp_path):
    summary = _section(reported["out"], "summary")
    assert "<caption>48 rows (all rows of flipped.csv)</caption>" in summary
    headline = [row[0] for row in _page(reported["out"]).tables["headline"]]
    assert headline[:3] == ["rows", "mean F1", "macro F1"], "macro beside mean"
    # Every reported row is one the model trained or tuned on: the note says so and points to --split val.
    assert "--split val" in _section(reported["out"], "label-errors")
    # Rows the model never saw (here: no split to compare with) get no such advice.
    truth, probs = _arrays()
    truth[:6] = 1 - truth[:6]  # wrong labels, for the model to dispute
    s = summarize(truth, probs, np.full(5, 0.45), [f"name{j}" for j in range(5)])
    page = write_report(s, _rows(120), tmp_path / "r.html", data={"table_name": "other.csv", "split": "all"})
    assert "<caption>120 rows (all rows of other.csv)</caption>" in _section(page, "summary")
    assert s["label_issues"] and "--split val" not in page.read_text()


def test_a_multiclass_summary_decides_by_argmax_as_evaluate_does():
    rng = np.random.default_rng(5)
    truth = np.eye(4, dtype=int)[rng.integers(0, 4, 80)]
    # The max of two softmaxes (union fusion): two labels of a row over 0.5, which thresholds would both keep.
    probs = rng.random(truth.shape) * 0.7 + truth * 0.3
    assert ((probs >= 0.5).sum(1) > 1).any()
    s = summarize(truth, probs, np.full(4, 0.5), list("abcd"), task="multiclass")
    expected = evaluate(truth, apply_argmax(probs), list("abcd"))
    assert s["report"] == expected
    assert s["report"]["mean_f1"] != summarize(truth, probs, np.full(4, 0.5), list("abcd"))["report"]["mean_f1"]
    assert s["threshold_curve"]["rule"] == "argmax" and s["threshold_curve"]["chosen"] is None


@pytest.fixture(scope="module")
def multiclass_union(tmp_path_factory, session_cache):
    from test_multiclass import _single_label_data

    from fuselabel import FuseLabel

    root = tmp_path_factory.mktemp("multiclass-union")
    image_dir, _, csv = _single_label_data(root)
    model = FuseLabel(**TINY_SETTINGS, task="multiclass", kind="late", late_combine="union", cache_dir=session_cache)
    model.fit(csv, images=image_dir, out=root / "model", progress=False)
    return model, root, image_dir, csv


def test_a_multiclass_union_report_agrees_with_evaluate(multiclass_union):
    model, root, image_dir, csv = multiclass_union
    page = _page(build_report(root / "model", image_dir, csv, root / "report.html"))
    expected = model.evaluate(csv, images=image_dir)
    headline = dict(page.tables["headline"])
    for key, name in (("mean F1", "mean_f1"), ("macro F1", "macro_f1"), ("micro F1", "micro_f1")):
        assert headline[key] == f"{expected[name]:.4f}", key
    assert headline["exact match"] == f"{expected['exact_match']:.4f}"
    shown = {row[0]: row for row in page.tables["per-label-table"][1:] if len(row) == 8}
    for r in expected["per_label"]:
        assert shown[r["label"]][2] == "argmax"
        assert shown[r["label"]][5:8] == [f"{r['f1']:.3f}", str(r["support"]), str(r["predicted"])], r["label"]


def test_the_image_size_is_the_one_the_model_uses(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "late", "image_model": "tf_efficientnet_lite0"}))
    (folder / "preprocessing.json").write_text(json.dumps({"input_size": [3, 224, 224]}))
    facts = dict(describe_run(folder)["facts"])
    assert facts["image encoder"] == "tf_efficientnet_lite0 at 224 px"
    (folder / "config.json").write_text(json.dumps({"kind": "text", "text_model": "minilm-l6"}))
    assert dict(describe_run(folder)["facts"])["image encoder"] == "-"


def test_a_model_that_ignores_an_input_is_named_so(tmp_path):
    assert fusion("late", "weighted", 0.0)["reads"] == "caption only"
    assert fusion("late", "weighted", 1.0)["reads"] == "photo only"
    assert fusion("late", "weighted", 0.35)["reads"] == "both"
    assert "by 0.3501 and the caption head by 0.6499." in fusion("late", "weighted", 0.350098)["sentence"]
    assert fusion("late", "union", None)["reads"] == "both"
    page = write_report(_synthetic(inputs=fusion("late", "weighted", 0.0)), _rows(120), tmp_path / "r.html")
    summary, inputs = _section(page, "summary"), _section(page, "inputs")
    assert "caption-only: its photo weight is 0" in summary and "caption-only: its photo weight is 0" in inputs
    photo = write_report(_synthetic(inputs=fusion("late", "weighted", 1.0)), _rows(120), tmp_path / "p.html")
    assert "photo-only: its caption weight is 0" in _section(photo, "summary")
    both = write_report(_synthetic(inputs=fusion("late", "weighted", 0.5)), _rows(120), tmp_path / "b.html")
    assert "-only" not in _section(both, "summary") and "weighs the photo head by 0.5" in _section(both, "inputs")


def test_copies_of_one_model_compare_as_identical_under_short_names(reported, tmp_path):
    for side in ("a", "b"):
        shutil.copytree(reported["model"], tmp_path / side / "model")
    out = build_comparison(
        [tmp_path / "a" / "model", tmp_path / "b" / "model"], reported["images"], reported["csv"], tmp_path / "c.html"
    )
    page = _page(out)
    assert page.tables["compare-labels"][0][3:] == ["a/model", "b/model", "b/model − a/model"]
    assert str(tmp_path) not in out.read_text().split("<h3>Data and this report</h3>")[0], "no absolute path as a name"
    assert "a/model and b/model: the two folders hold identical weights." in _section(out, "summary")
    per_label = _section(out, "per-label")
    assert "No differences" in per_label and "<img" not in per_label
    assert short_names([tmp_path / "x" / "m1", tmp_path / "y" / "m2"]) == ["m1", "m2"]


# ---------------------------------------------------------------------------------------------------------------
# Hundreds of labels


def test_a_500_label_model_gets_a_report_that_fits(tmp_path, session_cache):
    """A text model over 500 labels (trained in seconds on synthetic captions), reported on 300 rows: every label
    in the table, at most 30 in a figure, no figure over 4,000 px, the page under 5 MB."""
    from fuselabel import FuseLabel

    rng = np.random.default_rng(0)
    lines = ["ImageID,Labels,Caption"]
    for i in range(500):
        labels = sorted({i + 1, int(rng.integers(1, 501))})
        lines.append(f'{i}.jpg,{" ".join(map(str, labels))},"a photo of {" and ".join(f"thing{j}" for j in labels)}"')
    (tmp_path / "many.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "part.csv").write_text("\n".join(lines[:301]) + "\n")
    (tmp_path / "data").mkdir()
    settings = {**TINY_SETTINGS, "epochs": 1, "kind": "text", "cache_dir": session_cache}
    FuseLabel(**settings).fit(tmp_path / "many.csv", images=tmp_path / "data", out=tmp_path / "model", progress=False)
    start = time.perf_counter()
    out = build_report(tmp_path / "model", tmp_path / "data", tmp_path / "part.csv", tmp_path / "r.html")
    print(f"500 labels, 300 rows: report in {time.perf_counter() - start:.1f} s, {out.stat().st_size / 1e6:.2f} MB")
    assert out.stat().st_size < 5e6
    page = _page(out)
    assert len([row for row in page.tables["per-label-table"][1:] if len(row) == 8]) == 500
    assert "The figures show 30 of the 500 labels" in _section(out, "per-label")
    for img in page.images:
        png = _decoded(img["src"])
        assert max(png.size) <= 4000, (img["alt"], png.size)
    summary = summarize(*_arrays(rows=300, labels=500), np.full(500, 0.45), [f"label {j}" for j in range(500)])
    assert len(summary["shown"]) == 30 and len(summary["frequent"]) == 30
    worst = min(r["f1"] for r in summary["report"]["per_label"] if r["support"])
    assert any(summary["report"]["per_label"][j]["f1"] == worst for j in summary["shown"]), "the worst label is shown"
    top = int(np.argmax(summary["frequency"]))
    assert top in summary["shown"] and summary["frequent"][0] == top
