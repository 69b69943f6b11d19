"""One truth for every number: the validation figure a model folder records is what its predictions give.

The fusion weight and thresholds are tuned on the stored model (weights rounded to their saved type) through
``runtime.Predictor``, so ``evaluate --split val`` on the folder gives back the recorded mean F1.
"""

from __future__ import annotations

import json

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
