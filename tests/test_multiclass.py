"""``task="multiclass"``: one label a row, softmax heads, cross-entropy, the arg-max label through every engine."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, make_tiny_dataset
from torch import nn

from fuselabel import Config, FuseLabel
from fuselabel.bundle import describe, load_bundle
from fuselabel.losses import SoftmaxFocalLoss, build_loss, class_weight_from_labels, probabilities
from fuselabel.records import read_records
from fuselabel.runtime import decide
from fuselabel.thresholds import apply_argmax, argmax_rule


def _one_hot(index, classes):
    return torch.nn.functional.one_hot(torch.as_tensor(index), classes).float()


# ---------------------------------------------------------------------------------------------- losses and rules


def test_bce_means_cross_entropy_and_focal_reduces_to_it():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(12, 5, generator=g), torch.randint(0, 5, (12,), generator=g)
    ce = nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(build_loss("bce", task="multiclass")(logits, _one_hot(target, 5)), ce)
    torch.testing.assert_close(build_loss("focal", task="multiclass", gamma=0.0)(logits, _one_hot(target, 5)), ce)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    torch.testing.assert_close(
        SoftmaxFocalLoss(gamma=0.0, weight=weight)(logits, target),
        nn.functional.cross_entropy(logits, target, weight=weight),
    )
    # focusing lowers the loss of rows already right
    assert SoftmaxFocalLoss(gamma=2.0)(logits, target) < ce
    smooth = build_loss("bce", task="multiclass", label_smoothing=0.1)(logits, _one_hot(target, 5))
    torch.testing.assert_close(smooth, nn.functional.cross_entropy(logits, target, label_smoothing=0.1))


def test_multilabel_only_options_are_refused():
    with pytest.raises(ValueError, match="asl"):
        Config(task="multiclass", loss="asl")
    with pytest.raises(ValueError, match="asl"):
        build_loss("asl", task="multiclass")
    with pytest.raises(ValueError, match="alpha"):
        build_loss("focal", task="multiclass", alpha=0.25)
    with pytest.raises(ValueError, match="gamma_neg"):
        build_loss("bce", task="multiclass", gamma_neg=2)
    with pytest.raises(ValueError, match="task"):
        Config(task="multi")


def test_class_weights_favour_rare_classes():
    y = np.eye(3)[[0, 0, 0, 0, 1, 1, 2, 0]]
    w = class_weight_from_labels(y)
    assert w[2] > w[1] > w[0]
    np.testing.assert_allclose(w.numpy(), [8 / (3 * 5), 8 / (3 * 2), 8 / 3], rtol=1e-6)


def test_softmax_probabilities_and_argmax_decision():
    logits = torch.randn(7, 4)
    p = probabilities(logits, "multiclass")
    torch.testing.assert_close(p.sum(1), torch.ones(7))
    torch.testing.assert_close(probabilities(logits), torch.sigmoid(logits))
    # Union of two softmaxes: two classes can pass any threshold; the decision is still one label.
    union = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.6], [np.nan] * 3])
    out = decide(union, np.full(3, 0.5), True, task="multiclass")
    assert out.tolist() == [[True, False, False], [False, False, True], [False, False, False]]
    assert decide(union, np.full(3, 0.5), True)[0].sum() == 2  # multilabel keeps both
    rule = argmax_rule(np.eye(3)[[0, 2]], union[:2])
    assert rule["method"] == "argmax" and rule["val_accuracy"] == 1.0 and rule["val_mean_f1"] == 1.0
    assert apply_argmax(np.zeros((2, 3))).sum(1).tolist() == [1, 1]


# ------------------------------------------------------------------------------------------ training and prediction


def _single_label_data(root):
    """The tiny data set with only each row's first label (its photo's colour blends both: a little noise)."""
    image_dir, csv = make_tiny_dataset(root)
    out = []
    for line in csv.read_text().splitlines():
        if re.match(r"\d+\.jpg,", line):  # a row's first line (one caption runs over two lines)
            image_id, labels, caption = line.split(",", 2)
            line = f"{image_id},{labels.split()[0]},{caption}"
        out.append(line)
    single = root / "single.csv"
    single.write_text("\n".join(out) + "\n")
    return image_dir, csv, single


@pytest.fixture(scope="module")
def multiclass_model(tmp_path_factory, session_cache):
    root = tmp_path_factory.mktemp("multiclass")
    image_dir, multi_csv, csv = _single_label_data(root)
    model = FuseLabel(**TINY_SETTINGS, task="multiclass", cache_dir=session_cache)
    model.fit(csv, images=image_dir, out=root / "model", progress=False)
    return model, root, image_dir, csv, multi_csv


def test_rows_without_exactly_one_label_are_refused_first(tmp_path, session_cache):
    image_dir, multi_csv, _ = _single_label_data(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"row 1\.jpg \(line 3\) has 2 labels \(1 2\) \(and \d+ more rows\); "
        r"task=multiclass needs exactly one label",
    ):
        FuseLabel(**TINY_SETTINGS, task="multiclass", cache_dir=str(tmp_path / "cache")).fit(
            multi_csv, images=image_dir, out=tmp_path / "model", progress=False
        )
    assert not (tmp_path / "model").exists() and not (tmp_path / "cache").exists()  # nothing was computed
    with pytest.raises(ValueError, match="has no label"):
        FuseLabel(**TINY_SETTINGS, task="multiclass").fit(
            images=[None, None, None], captions=["a", "b", "c"], labels=[["1"], [], ["2"]], progress=False
        )


def test_one_label_a_row_and_softmax(multiclass_model):
    model, root, image_dir, csv, _ = multiclass_model
    assert model.bundle_.config.task == "multiclass"
    rows = read_records(csv).records[:8]
    images = [image_dir / r.image_id for r in rows]
    captions = [r.caption for r in rows]
    images[1], captions[2] = None, ""  # a caption-only and a photo-only row
    p = model.predict_details(images=images, captions=captions)
    assert p.predicted.sum(1).tolist() == [1] * 8
    for name, part in p.parts.items():
        np.testing.assert_allclose(part.sum(1), 1.0, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(p.probs.sum(1), 1.0, rtol=1e-5)  # weighted late fusion keeps a distribution
    assert (p.predicted.argmax(1) == p.probs.argmax(1)).all()
    assert all(len(labels) == 1 for labels in model.predict(images=images, captions=captions))


def test_folder_records_the_rule_and_accuracy(multiclass_model):
    model, root, *_ = multiclass_model
    folder = root / "model"
    thresholds = json.loads((folder / "thresholds.json").read_text())
    assert thresholds["method"] == "argmax" and thresholds["alternatives"] == {}
    validation = json.loads((folder / "metrics.json").read_text())["validation"]
    assert validation["accuracy"] == pytest.approx(validation["mean_f1"])  # one true label, one predicted
    assert json.loads((folder / "config.json").read_text())["task"] == "multiclass"
    assert "task multiclass" in describe(folder)


def test_save_load_and_every_engine_agree(multiclass_model, tmp_path):
    model, root, image_dir, csv, _ = multiclass_model
    rows = read_records(csv).records
    images = [image_dir / r.image_id for r in rows]
    captions = [r.caption for r in rows]
    expected = model.predict_details(images=images, captions=captions)

    model.save_pretrained(tmp_path / "copy")
    for engine in ("torch", "onnx"):  # eager torch; onnxruntime encoders over the model folder
        again = FuseLabel.from_pretrained(tmp_path / "copy", feature_engine=engine, num_workers=0)
        p = again.predict_details(images=images, captions=captions)
        assert p.predicted.sum(1).tolist() == [1] * len(rows)
        assert (p.predicted == expected.predicted).all(), engine
        np.testing.assert_allclose(p.probs, expected.probs, atol=1e-4)
    assert load_bundle(tmp_path / "copy").config.task == "multiclass"


def test_exported_folder_gives_one_label_a_row(multiclass_model, tmp_path):
    from fuselabel.export import export_onnx
    from fuselabel.predict import predict_csv

    model, root, image_dir, csv, _ = multiclass_model
    manifest = export_onnx(root / "model", tmp_path / "onnx", check_rows=8)
    assert manifest["task"] == "multiclass" and "arg-max" in manifest["head"]["rule"]
    assert manifest["checks"]["rows_identical"] == 1.0
    onnx = FuseLabel.from_pretrained(tmp_path / "onnx")
    assert onnx.predictor().task == "multiclass"
    sub = tmp_path / "submission.csv"
    predict_csv(onnx, image_dir, csv, sub, progress=False)
    lines = sub.read_text().splitlines()[1:]
    assert lines and all(len(line.split(",", 1)[1].split()) == 1 for line in lines)
