"""``fuselabel report``: one self-contained HTML file, its figures, its averages, its run section, the comparison
of two models, its likely-label-errors ranking, and a real browser on it at a phone's width.

Two tiny models are trained per module (as in test_cli) on rows whose labels carry names; the reports run on a
copy of those rows where a few rows' labels are swapped for wrong ones, which the page must rank among its likely
label errors.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LABELS, make_tiny_dataset
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from PIL import Image
from sklearn.metrics import f1_score, precision_recall_fscore_support
from test_cli import TINY_TRAIN

from fuselabel import __version__, figures
from fuselabel.cli import main
from fuselabel.outputs import OutputError
from fuselabel.records import read_records
from fuselabel.report import compare, draw, read_history, summarize, write_report
from fuselabel.runtime import decide

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
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
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
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
    assert facts["table"] == "flipped.csv" and facts["rows in the table"] == "48"
    assert facts["rows reported"] == "48 (all rows)"
    assert facts["by"] == f"fuselabel {__version__}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d.*", facts["report written"])
    assert str(model.parent) not in reported["out"].read_text(), "no path of the machine that wrote it"


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


@pytest.mark.parametrize("labels, name", [(4, "x"), (18, "motorcycle"), (40, "traffic light")])
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
# A real browser


@pytest.mark.parametrize("which", ["out", "compared"])
def test_every_image_loads_and_a_phone_never_scrolls_sideways(reported, which):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    path = reported[which]
    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for width in (1280, 390):
                page = browser.new_page(viewport={"width": width, "height": 800})
                requests = []
                page.on("request", lambda r: requests.append(r.url))
                page.goto(path.resolve().as_uri(), wait_until="load")
                seen[width] = page.evaluate("""() => ({
                    images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),
                    scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth,
                    wide: Array.from(document.querySelectorAll('body *')).filter(e =>
                        e.getBoundingClientRect().right > document.documentElement.clientWidth + 1 &&
                        !e.closest('.scroll')).map(e => e.tagName + '.' + e.className).slice(0, 5)})""")
                seen[width]["requests"] = [u for u in requests if not u.startswith(("file:", "data:"))]
                seen[width]["title"] = page.title()
                page.close()
        finally:
            browser.close()
    expected = len(_page(path).images)
    for width, found in seen.items():
        assert len(found["images"]) == expected > 0
        assert all(done and natural > 0 for done, natural in found["images"]), f"{width}px: an image did not load"
        assert found["scroll"] <= found["client"], f"{width}px: the page scrolls sideways; too wide: {found['wide']}"
        assert not found["wide"], f"{width}px: elements wider than the screen outside a scroll box: {found['wide']}"
        assert not found["requests"], f"the page fetched {found['requests']}"
        assert found["title"].startswith("fuselabel report")
