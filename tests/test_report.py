"""``fuselabel report``: the HTML page, its figures, its likely-label-errors ranking, and a real browser on it.

One tiny model is trained per module (as in test_cli) on rows whose labels carry names; the report runs
on a copy of those rows where a few rows' labels are swapped for wrong ones, which the page must rank
among its likely label errors.
"""

from __future__ import annotations

import html.parser
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_LABELS, make_tiny_dataset
from fuselabel import figures
from fuselabel.cli import main
from fuselabel.records import read_records
from fuselabel.report import read_history, summarize, write_report
from test_cli import TINY_TRAIN

CHROMIUM = Path("/usr/bin/chromium")
# Names that appear nowhere else on the page (captions use the plain words).
NAMES = {label: f"{word}-label" for label, (_, word) in TINY_LABELS.items()}
FLIPPED = ["5.jpg", "17.jpg", "30.jpg"]


def _write_csv(records, path: Path, labels_for=lambda r: r.labels) -> None:
    lines = ["ImageID,Labels,Caption"] + [f'{r.image_id},{" ".join(labels_for(r))},"{r.caption}"' for r in records]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def reported(tmp_path_factory, session_cache):
    """(model folder, image dir, CSV with wrong labels on FLIPPED rows, report folder, exit code).

    Twelve epochs rather than test_cli's two: a model must be sure of itself before it disputes a label.
    """
    root = tmp_path_factory.mktemp("report")
    image_dir, csv = make_tiny_dataset(root)
    (root / "label_names.csv").write_text("Label,Name\n" + "".join(f"{k},{v}\n" for k, v in NAMES.items()))
    model = root / "model"
    assert main(["train", "--data", str(image_dir), "--csv", str(csv), "--out", str(model),
                 "--cache-dir", session_cache, *TINY_TRAIN, "--epochs", "12"]) == 0
    # Each flipped row gets exactly the labels it does not have.
    flipped = root / "flipped.csv"
    _write_csv(read_records(csv).records, flipped,
               lambda r: sorted(set(NAMES) - set(r.labels), key=int) if r.image_id in FLIPPED else r.labels)
    out = root / "out" / "report"
    code = main(["report", str(model), "--data", str(image_dir), "--csv", str(flipped), "--out", str(out)])
    return model, image_dir, flipped, out, code


class _Page(html.parser.HTMLParser):
    """Image sources, table rows of the likely-label-errors table, and the text of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.issue_rows: list[str] = []
        self.text: list[str] = []
        self._in_issues = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self._in_issues = attrs.get("id") == "label-issues"
        if tag == "tr" and self._in_issues and "data-image-id" in attrs:
            self.issue_rows.append(attrs["data-image-id"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_issues = False

    def handle_data(self, data):
        self.text.append(data)


def _page(out: Path) -> _Page:
    return _Page((out / "index.html").read_text(encoding="utf-8"))


def test_report_page_and_every_image_it_references(reported):
    model, _, _, out, code = reported
    assert code == 0
    page = _page(out)
    pngs = [src for src in page.images if src.endswith(".png")]
    expected = {"scores.png", "confusion.png", "thresholds.png", "pr_curves.png", "calibration.png", "training.png",
                "frequency.png", "cooccurrence.png", "modality.png"}
    assert set(pngs) == expected, "the model folder has history.csv, so training curves are drawn"
    assert any(src.endswith(".jpg") for src in page.images), "worst-row gallery thumbnails"
    for src in page.images:
        assert "/" not in src and ":" not in src, f"{src}: links must be relative, beside the page"
        with Image.open(out / src) as img:
            img.verify()
            assert img.format == ("PNG" if src.endswith(".png") else "JPEG")
    # Nothing is left beside the report but the report itself.
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_report_names_every_label(reported):
    _, _, _, out, _ = reported
    text = " ".join(_page(out).text)
    for name in NAMES.values():
        assert name in text, name
    for case in ("both inputs", "photo removed", "caption removed"):
        assert case in text


def test_report_ranks_wrong_labels_as_likely_errors(reported):
    _, _, _, out, _ = reported
    ranked = _page(out).issue_rows
    assert ranked, "no likely label errors listed"
    top = ranked[:len(FLIPPED) + 2]
    assert set(FLIPPED) <= set(top), f"flipped rows {FLIPPED}, top of the ranking {top}"


def test_report_on_an_unlabelled_csv_fails_cleanly_and_keeps_the_old_report(reported, tmp_path, capsys):
    model, image_dir, flipped, out, _ = reported
    old = tmp_path / "old"
    shutil.copytree(out, old)
    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text("ImageID,Caption\n" + "".join(f'{r.image_id},"{r.caption}"\n'
                                                         for r in read_records(flipped).records))
    capsys.readouterr()
    code = main(["report", str(model), "--data", str(image_dir), "--csv", str(unlabelled), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Labels column" in err and str(unlabelled) in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in old.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The page from arrays


def _synthetic(rows=120, labels=5, seed=0, **kwargs) -> dict:
    rng = np.random.default_rng(seed)
    truth = (rng.random((rows, labels)) < 0.3).astype(np.int64)
    truth[np.arange(rows), rng.integers(0, labels, rows)] = 1
    probs = 1 / (1 + np.exp(-((2 * truth - 1) * 2.5 + rng.normal(0, 1.2, truth.shape))))
    return summarize(truth, probs, np.full(labels, 0.45), [f"name{j}" for j in range(labels)], **kwargs)


def _rows(n: int) -> list[dict]:
    return [{"image_id": f"{i}.jpg", "caption": f"caption {i}", "image": None} for i in range(n)]


def test_summary_marks_the_model_threshold_and_leaves_out_rows_without_input():
    rng = np.random.default_rng(1)
    truth = (rng.random((50, 3)) < 0.5).astype(int)
    truth[:, 0] = 1
    probs = np.clip(truth * 0.7 + rng.random((50, 3)) * 0.3, 0, 1)
    probs[[4, 9]] = np.nan
    s = summarize(truth, probs, np.full(3, 0.5), ["a", "b", "c"],
                  degraded={"photo removed": np.full((50, 3), np.nan)})
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


def test_page_without_history_says_so_and_draws_no_training_figure(tmp_path):
    s = _synthetic()
    assert s["history"] is None and read_history(tmp_path / "history.csv") is None
    page = write_report(s, _rows(120), tmp_path / "r")
    text = page.read_text()
    assert "no history.csv" in text and "training.png" not in text
    assert not (tmp_path / "r" / "training.png").exists()


def test_interrupted_report_leaves_the_earlier_one(tmp_path, monkeypatch):
    out = tmp_path / "r"
    write_report(_synthetic(), _rows(120), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(summary):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "cooccurrence", broken)
    with pytest.raises(RuntimeError):
        write_report(_synthetic(seed=2), _rows(120), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_read_history_from_a_lightning_metrics_file(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,step,train_loss_epoch,train_loss_step,val_f1,val_loss\n"
                    "0,1,,0.9,,\n0,2,,,0.5,0.8\n0,2,0.85,,,\n1,5,,,0.6,0.7\n1,5,0.6,,,\n")
    assert read_history(path) == [{"epoch": 0, "train_loss": 0.85, "val_loss": 0.8, "val_f1": 0.5},
                                  {"epoch": 1, "train_loss": 0.6, "val_loss": 0.7, "val_f1": 0.6}]


# ---------------------------------------------------------------------------------------------------------------
# A real browser


def test_every_image_loads_in_a_headless_browser(reported):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    _, _, _, out, _ = reported
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto((out / "index.html").resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
            title = page.title()
        finally:
            browser.close()
    assert len(images) == len(_page(out).images) > 9
    broken = [src for src, width in images if width == 0]
    assert not broken, f"images that did not load: {broken}"
    assert title.startswith("fuselabel report")
