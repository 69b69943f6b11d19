"""One truth for every number: the validation figure a model folder records is what its predictions give.

The fusion weight and thresholds are tuned on the stored model (weights rounded to their saved type) through
``runtime.Predictor``, so ``evaluate --split val`` on the folder gives back the recorded mean F1.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import TINY_SETTINGS, make_tiny_dataset

from fuselabel import FuseLabel


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(save_dtype="int8"), dict(kind="early"), dict(late_combine="union", regime="hybrid", epochs=1)],
    ids=["late-fp16", "late-int8", "early", "hybrid-union"],
)
def test_recorded_validation_f1_is_what_evaluate_gives(tmp_path, session_cache, settings):
    image_dir, csv = make_tiny_dataset(tmp_path / "d", 64)
    model = FuseLabel(**{**TINY_SETTINGS, **settings}, cache_dir=session_cache).fit(
        csv, images=image_dir, out=tmp_path / "m", progress=False
    )
    recorded = json.loads((tmp_path / "m" / "metrics.json").read_text())["validation"]
    again = FuseLabel.from_pretrained(tmp_path / "m", cache_dir=session_cache)
    for loaded in (model, again):
        got = loaded.evaluate(csv, images=image_dir, split="val")
        assert got["rows"] == recorded["rows"]
        assert abs(got["mean_f1"] - recorded["mean_f1"]) <= 0.0005, (got["mean_f1"], recorded["mean_f1"])
    thresholds = json.loads((tmp_path / "m" / "thresholds.json").read_text())
    if "late_weight" in thresholds:  # an fp16 value: what the folder stores is what was tuned
        import numpy as np

        assert float(np.float16(thresholds["late_weight"])) == thresholds["late_weight"]


def _evaluate_val(model_dir, csv, image_dir, tmp_path, session_cache) -> dict:
    """``fuselabel evaluate MODEL --split val`` as a user runs it; its JSON report."""
    from fuselabel.cli import main

    out = tmp_path / "val-report.json"
    argv = ["evaluate", str(model_dir), "--data", str(image_dir), "--csv", str(csv), "--split", "val"]
    assert main([*argv, "--json", str(out), "--cache-dir", session_cache]) == 0
    return json.loads(out.read_text())


def _checkpoint_figure_is_recorded_figure(model_dir) -> dict:
    """The best epoch's validation F1 (what picked the checkpoint) is the recorded one: one scoring path."""
    metrics = json.loads((model_dir / "metrics.json").read_text())
    best = max(row["val_f1"] for row in metrics["val_f1_by_time"])
    # fp32 weights: the stored model is the best checkpoint itself, scored the same way on the same rows.
    assert abs(best - metrics["validation"]["mean_f1"]) <= 0.0005, (best, metrics["validation"]["mean_f1"])
    return metrics


@pytest.mark.parametrize("kind", ["late", "early"])
def test_checkpoint_monitor_equals_evaluate_on_the_validation_rows(tmp_path, session_cache, kind):
    image_dir, csv = make_tiny_dataset(tmp_path / "d", 64)
    settings = {**TINY_SETTINGS, "kind": kind, "save_dtype": "fp32", "epochs": 3}
    FuseLabel(**settings, cache_dir=session_cache).fit(csv, images=image_dir, out=tmp_path / "m", progress=False)
    metrics = _checkpoint_figure_is_recorded_figure(tmp_path / "m")
    got = _evaluate_val(tmp_path / "m", csv, image_dir, tmp_path, session_cache)
    assert got["rows"] == metrics["validation"]["rows"] >= 12
    assert abs(got["mean_f1"] - metrics["validation"]["mean_f1"]) <= 0.0005


def test_checkpoint_monitor_equals_evaluate_on_course_rows(tmp_path, session_cache):
    from conftest import shared_data_or_skip

    from fuselabel.records import read_records
    from fuselabel.writers import write_rows

    data = shared_data_or_skip("validation F1 of a few hundred course rows")
    csv = tmp_path / "train.csv"
    write_rows(read_records(data / "train.csv"), range(400), csv)
    settings = dict(preset="cpu-fast", epochs=4, val_fraction=0.25, save_dtype="fp32", max_size_mb=200)
    settings.update(accelerator="cpu", num_workers=1)
    FuseLabel(**settings, cache_dir=session_cache).fit(csv, images=data / "data", out=tmp_path / "m", progress=False)
    metrics = _checkpoint_figure_is_recorded_figure(tmp_path / "m")
    got = _evaluate_val(tmp_path / "m", csv, data / "data", tmp_path, session_cache)
    assert got["rows"] == metrics["validation"]["rows"] > 50
    assert abs(got["mean_f1"] - metrics["validation"]["mean_f1"]) <= 0.0005


def test_stage_timings_are_recorded_and_summarised(tmp_path, caplog):
    from fuselabel.tracking import STAGES

    image_dir, csv = make_tiny_dataset(tmp_path / "d", 48)
    model = FuseLabel(**TINY_SETTINGS, cache_dir=str(tmp_path / "fresh-cache"))
    with caplog.at_level("INFO", logger="fuselabel.train"):
        model.fit(csv, images=image_dir, out=tmp_path / "m", progress=False)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation mean F1")]
    assert len(summary) == 1, summary
    timings = json.loads((tmp_path / "m" / "metrics.json").read_text())["timings"]
    assert set(STAGES) <= set(timings), timings
    # The summary names each stage that took half a second or more, with its seconds, and no other.
    shown = re.findall(r"([a-z0-9 ]+?) (\d+)s", summary[0].rpartition("(")[2])
    expected = [(k.removesuffix("_s").replace("_", " "), f"{timings[k]:.0f}") for k in STAGES if timings[k] >= 0.5]
    assert [(name.strip(" ,"), s) for name, s in shown] == expected, summary
    assert expected or summary[0].endswith("(no stage took a second)"), summary
    # A fresh cache: both encoders ran over every row, and every stage is part of the whole.
    assert timings["image_encoder_s"] > 0 and timings["text_encoder_s"] > 0 and timings["save_s"] > 0
    assert sum(timings[k] for k in STAGES) <= timings["total_s"] + 1e-6
