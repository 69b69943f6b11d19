"""Explaining by occlusion: heat where covering the photo lowers the logit, word scores that are the logit's falls."""

import math

import numpy as np
import pytest
from PIL import Image

from fuselabel import FuseLabel
from fuselabel.occlusion import GRID, _covered, explain
from fuselabel.runtime import Predictor

SIZE = 28  # the fake encoder's input square


class QuadrantEngine:
    """A late-fusion model whose photo head sees only the top-right quarter of its input (the mean of its first
    channel) and whose caption head counts the word "dog": where the evidence lies is known exactly."""

    kind, task, late_combine, late_weight = "late", "multilabel", "weighted", 0.5
    data_config = {"input_size": [3, SIZE, SIZE], "crop_pct": 1.0, "interpolation": "bilinear"}
    tta_flip, feature_dims, name, texts_cut, image_batch = False, {"image": 1, "text": 1}, "quadrant", 0, 1
    tokenizer = None

    def image_features(self, pixels):
        return pixels[:, 0, : SIZE // 2, SIZE // 2 :].mean(axis=(1, 2))[:, None]

    def text_features(self, captions):
        return np.array([[c.split().count("dog")] for c in captions], np.float32)

    def heads(self, feats):
        sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        return {"image": sigmoid(3 * feats["image_feat"]), "text": sigmoid(2 * feats["text_feat"] - 1)}


def _quadrant_explanation(photo, caption):
    return explain(Predictor(QuadrantEngine(), ["1"], [0.5]), 0, photo, caption)


def test_the_heat_lies_where_the_photo_head_looks():
    photo = Image.new("RGB", (90, 60), "white")  # not square: the model sees it squashed (crop_pct 1)
    result = _quadrant_explanation(photo, None)
    heat = result.heatmap
    assert result.method == "occlusion" and heat.shape == (60, 90) and result.words is None
    assert result.heatmap_logit == pytest.approx(3 * np.float32((1 - 0.485) / 0.229), abs=1e-4)
    height, width = heat.shape
    assert heat[: int(0.4 * height), int(0.6 * width) :].min() > 0.5  # the quarter the head reads is hot
    # The rest is cold, past the middle cells that straddle the quarter's edge (and the half cell they blend into).
    assert heat[int(0.65 * height) :, :].max() == 0 and heat[:, : int(0.35 * width)].max() == 0
    assert heat.max() == 1


def test_each_word_scores_the_fall_of_the_logit_without_it():
    caption = "a dog  on the dog mat"  # two spaces: a word's offsets are its own
    result = _quadrant_explanation(None, caption)
    assert result.heatmap is None
    assert [caption[w["start"] : w["end"]] for w in result.words] == caption.split()
    # Two dogs: logit 2 * 2 - 1 = 3; without one of them 1, without anything else still 3.
    assert [w["score"] for w in result.words] == pytest.approx([0, 2, 0, 0, 2, 0], abs=1e-5)
    assert result.words_logit == pytest.approx(3, abs=1e-5)
    assert result.words_baseline_logit == pytest.approx(-1, abs=1e-5)
    assert result.words_target == "text head logit"


def test_each_cell_is_covered_once():
    pixels = np.ones((3, 30, 23), np.float32)  # sides GRID does not divide
    covered = _covered(pixels)
    assert covered.shape == (GRID * GRID, 3, 30, 23)
    assert ((covered == 0).sum(axis=0) == 1).all()  # every pixel is covered by exactly one copy
    assert all((c[0] == 0).sum() in (16, 20, 12, 15) for c in covered)  # each copy one cell, of 4-5 x 3-4 pixels


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_a_trained_model_explains_the_numbers_it_predicts(tiny_model):
    """The heat and the words explain the very logits prediction gives, and a word's score is the logit's fall
    when that caption is predicted without it."""
    root, image_dir, _ = tiny_model
    model = FuseLabel.from_pretrained(root / "model")
    photo = Image.open(image_dir / "3.jpg").convert("RGB")
    caption = "a small dog runs after a red ball"
    parts = model.predict_details([photo], [caption]).parts
    result = model.explain(1, photo, caption)
    assert result.method == "occlusion"
    assert result.heatmap.shape == (photo.height, photo.width) and 0 <= result.heatmap.min() <= result.heatmap.max()
    assert result.heatmap_logit == pytest.approx(_logit(parts["image"][0, 1]), abs=1e-4)
    assert result.words_logit == pytest.approx(_logit(parts["text"][0, 1]), abs=1e-4)
    words = caption.split()
    for i, word in enumerate(result.words):
        without = " ".join(words[:i] + [""] + words[i + 1 :])
        fallen = model.predict_details([photo], [without]).parts["text"][0, 1]
        assert word["score"] == pytest.approx(result.words_logit - _logit(fallen), abs=1e-4), word["text"]
    assert len({round(w["score"], 6) for w in result.words}) > 1


def test_words_past_the_token_limit_are_not_scored(tiny_model):
    model = FuseLabel.from_pretrained(tiny_model[0] / "model")
    caption = " ".join(["dog"] * 200)
    words = model.explain(0, None, caption).words
    reading = model.predictor().read_caption(caption)
    scored = [w["score"] is not None for w in words]
    assert len(words) == 200 and sum(scored) == reading.words_read and scored == sorted(scored, reverse=True)


class EarlyQuadrantEngine(QuadrantEngine):
    """The same evidence through early fusion's one head, which reads both inputs at once."""

    kind = "early"

    def heads(self, feats):
        z = 3 * feats["image_feat"] * feats["image_present"][:, None] + (2 * feats["text_feat"] - 1)
        return {"early": 1 / (1 + np.exp(-z))}


def test_early_fusion_holds_the_other_input_at_its_value():
    photo = Image.new("RGB", (40, 40), "white")
    result = explain(Predictor(EarlyQuadrantEngine(), ["1"], [0.5]), 0, photo, "one dog")
    both = 3 * np.float32((1 - 0.485) / 0.229) + 1  # the photo's part and one dog's
    assert result.heatmap_target == result.words_target == "early head logit"
    assert result.heatmap_logit == pytest.approx(both, abs=1e-4) and result.words_logit == pytest.approx(both, abs=1e-4)
    assert [w["score"] for w in result.words] == pytest.approx([0, 2], abs=1e-4)
    assert result.words_baseline_logit == pytest.approx(both - 2, abs=1e-4)
    assert result.heatmap[:10, 30:].min() > 0.5 and result.heatmap[30:, :].max() == 0
