"""``FuseLabel``, the model object: settings checked up front, fit from a CSV or from memory, predict on any
mix of paths, PIL images, bytes and missing inputs, and model folders that save, load and say their format."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import TINY_SETTINGS as TINY
from conftest import shared_data_or_skip
from PIL import Image

from fuselabel import FuseLabel
from fuselabel.records import read_records
from fuselabel.writers import write_rows


@pytest.fixture(scope="module")
def tiny(tiny_model):
    root, image_dir, csv = tiny_model
    return FuseLabel.from_pretrained(root / "model"), image_dir, csv, root


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(epochs="ten"), "epochs"),
        (dict(batch_size=-3), "batch_size"),
        (dict(no_such_setting=1), "no_such_setting"),
        (dict(kind="middle"), "kind"),
        (dict(preset="nope"), "nope"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(bad, key, tmp_path):
    model = FuseLabel(**bad)  # stored untouched, as scikit-learn's contract asks
    assert model.get_params()[next(iter(bad))] == next(iter(bad.values()))
    with pytest.raises(ValueError, match=key):
        model.get_config()
    with pytest.raises(ValueError, match=key):  # fit checks before any work
        model.fit(images=[None, None], captions=["a", "b"], labels=[["x"], ["y"]], out=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_settings_are_converted_to_their_type():
    config = FuseLabel(lr="1e-4", epochs="3", image_size="0").get_config()
    assert config.lr == pytest.approx(1e-4) and config.epochs == 3 and config.image_size is None


def test_predict_mixes_paths_pil_bytes_and_missing(tiny):
    model, image_dir, csv, _ = tiny
    rows = read_records(csv).records[:4]
    path = image_dir / rows[0].image_id
    pil = Image.open(image_dir / rows[1].image_id)
    raw = (image_dir / rows[2].image_id).read_bytes()
    captions = [r.caption for r in rows]
    details = model.predict_details([path, pil, raw, None], captions)
    assert details.status == ["ok", "ok", "ok", "caption_only"]
    # the same photos given three ways give the same numbers as giving paths
    by_path = model.predict_proba([image_dir / r.image_id for r in rows[:3]], captions[:3])
    np.testing.assert_allclose(details.probs[:3], by_path, atol=1e-6)
    # the photo-less row is judged by the caption head alone
    np.testing.assert_allclose(details.probs[3], details.parts["text"][3], atol=1e-7)
    labels = model.predict([path, None], [captions[0], ""])
    assert labels[1] == [] and all(isinstance(x, int) for x in labels[0]) and labels[0]
    assert model.labels_ == [1, 2, 3, 4]


def test_fit_in_memory_matches_folder_layout(tiny, tmp_path, session_cache):
    _, image_dir, csv, _ = tiny
    rows = read_records(csv).records
    images = [
        Image.open(image_dir / r.image_id)
        if i % 3 == 0
        else (image_dir / r.image_id).read_bytes()
        if i % 3 == 1
        else image_dir / r.image_id
        for i, r in enumerate(rows)
    ]
    labels = [[int(x) for x in r.labels] for r in rows]
    model = FuseLabel(**TINY, cache_dir=session_cache).fit(
        images=images, captions=[r.caption for r in rows], labels=labels, progress=False
    )
    assert model.labels_ == [1, 2, 3, 4]
    probs = model.predict_proba(images[:5], [r.caption for r in rows[:5]])
    assert probs.shape == (5, 4) and np.isfinite(probs).all()


def test_save_and_load_round_trip(tiny, tmp_path):
    model, image_dir, csv, _ = tiny
    rows = read_records(csv).records[:6]
    images, captions = [image_dir / r.image_id for r in rows], [r.caption for r in rows]
    model.save_pretrained(tmp_path / "copy")
    again = FuseLabel.from_pretrained(tmp_path / "copy")
    np.testing.assert_allclose(again.predict_proba(images, captions), model.predict_proba(images, captions), atol=1e-6)
    assert again.label_names_ == model.label_names_ and (again.thresholds_ == model.thresholds_).all()


def test_model_folder_has_a_format_and_no_machine_paths(tiny):
    _, _, _, root = tiny
    folder = root / "model"
    assert json.loads((folder / "fuselabel.json").read_text())["format_version"] == 2
    config, run = json.loads((folder / "config.json").read_text()), json.loads((folder / "run.json").read_text())
    assert "cache_dir" not in config and "cache_dir" not in run and "devices" not in run and "epochs" in run
    text = "".join(p.read_text(errors="ignore") for p in folder.glob("*.json"))
    assert str(root) not in text and "/tmp" not in text


def test_newer_folder_format_is_refused_with_reason(tiny, tmp_path):
    import shutil

    from fuselabel.bundle import BundleError

    _, _, _, root = tiny
    shutil.copytree(root / "model", tmp_path / "m")
    (tmp_path / "m" / "fuselabel.json").write_text(json.dumps({"format_version": 99, "fuselabel": "9.0"}))
    with pytest.raises(BundleError, match=r"format 99 .*fuselabel 9\.0.*upgrade"):
        FuseLabel.from_pretrained(tmp_path / "m")


def test_older_folder_format_loads(tiny, tmp_path):
    """Format 1: every setting (devices and cache folder included) in config.json, no fuselabel.json."""
    import shutil

    model, image_dir, csv, root = tiny
    shutil.copytree(root / "model", tmp_path / "m")
    old = {
        **json.loads((tmp_path / "m" / "run.json").read_text()),
        **json.loads((tmp_path / "m" / "config.json").read_text()),
        "cache_dir": "/somewhere",
        "devices": "auto",
    }
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    (tmp_path / "m" / "run.json").unlink()
    (tmp_path / "m" / "fuselabel.json").unlink()
    again = FuseLabel.from_pretrained(tmp_path / "m")
    assert again.config_.epochs == model.config_.epochs and again.config_.cache_dir is None


def test_course_snippet_on_real_rows(tmp_path, session_cache):
    """The README's snippet as written, on 500 rows of the course data, with a batch mixing PIL, paths and None."""
    data = shared_data_or_skip("the model-object snippet runs on 500 real rows")
    records = read_records(data / "train.csv")
    chosen = sorted(random.Random(0).sample(range(len(records)), 500))
    write_rows(records, chosen, tmp_path / "train.csv")
    model = FuseLabel(preset="cpu", epochs=20, cache_dir=session_cache)
    model.fit(tmp_path / "train.csv", images=data / "data", progress=False)
    rows = [records.records[i] for i in chosen[:3]]
    img = Image.open(data / "data" / rows[0].image_id)
    labels = model.predict(
        images=[img, data / "data" / rows[1].image_id, None],
        captions=[rows[0].caption, rows[1].caption, rows[2].caption],
    )
    assert len(labels) == 3 and all(labels) and all(lab in model.labels_ for row in labels for lab in row)
    probs = model.predict_proba(images=[img], captions=["a dog on a sofa"])
    assert probs.shape == (1, len(model.labels_))
    report = model.evaluate(tmp_path / "train.csv", images=data / "data")
    assert report["rows"] == 500 and report["mean_f1"] > 0.6
    model.save_pretrained(tmp_path / "m1")
    assert FuseLabel.from_pretrained(tmp_path / "m1").predict(images=[img], captions=[rows[0].caption]) == labels[:1]


# ---------------------------------------------------------------------------------------------------------------
# The neighbours' contracts: scikit-learn and Hugging Face


def test_scikit_learn_contract_before_fit():
    from sklearn.base import clone, is_classifier
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    model = FuseLabel(preset="cpu", epochs=3, lr=1e-3)
    assert model.get_params() == {"preset": "cpu", "config": None, "epochs": 3, "lr": 1e-3}
    assert repr(model) == "FuseLabel(preset='cpu', epochs=3, lr=0.001)"
    twin = clone(model)
    assert twin is not model and twin.get_params() == model.get_params()
    assert model.set_params(epochs=5, preset=None) is model and model.get_params()["epochs"] == 5
    with pytest.raises(ValueError, match="no_such"):
        model.set_params(no_such=1)
    assert is_classifier(model)
    with pytest.raises(NotFittedError):
        check_is_fitted(model)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        model.predict(["x.jpg"], ["a dog"])


def test_scikit_learn_contract_after_fit_pickles_after_predicting(tiny):
    import pickle

    from sklearn.base import clone
    from sklearn.utils.validation import check_is_fitted

    model, image_dir, csv, _ = tiny
    rows = read_records(csv).records[:4]
    images, captions = [image_dir / r.image_id for r in rows], [r.caption for r in rows]
    check_is_fitted(model)
    before = model.predict_proba(images, captions)
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.predict_proba(images, captions), before)
    assert list(again.classes_) == model.labels_
    unfitted = clone(model)
    assert getattr(unfitted, "bundle_", None) is None


def test_from_pretrained_takes_where_it_runs_settings_only(tiny):
    _, _, _, root = tiny
    assert FuseLabel.from_pretrained(root / "model", num_workers=0).config_.num_workers == 0
    with pytest.raises(ValueError, match=r"epochs, kind cannot be set here.*num_workers"):
        FuseLabel.from_pretrained(root / "model", kind="early", epochs=999)
    with pytest.raises(ValueError, match="unknown setting.*nope"):
        FuseLabel.from_pretrained(root / "model", nope=1)


def test_one_row_given_bare_and_arrays_as_photos(tiny, caplog):
    import logging

    model, image_dir, csv, _ = tiny
    row = read_records(csv).records[0]
    path = image_dir / row.image_id
    pixels = np.asarray(Image.open(path).convert("RGB"))
    one = model.predict_proba(str(path), row.caption)
    assert one.shape == (1, 4)
    np.testing.assert_allclose(model.predict_proba(pixels, row.caption), one, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba([pixels, path], [row.caption] * 2)[1], one[0], atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        model.predict(np.zeros((4, 4), np.float32), "a dog")
    with caplog.at_level(logging.WARNING, logger="fuselabel"):
        model.predict([image_dir / "nope.jpg", path], ["a", "b"])
    assert "1 of 2 rows were predicted without their photo" in caplog.text


def test_save_pretrained_after_fit_in_memory_keeps_the_run(tiny, tmp_path, session_cache):
    _, image_dir, csv, _ = tiny
    rows = read_records(csv).records
    model = FuseLabel(**TINY, cache_dir=session_cache).fit(
        images=[image_dir / r.image_id for r in rows],
        captions=[r.caption for r in rows],
        labels=[list(r.labels) for r in rows],
        progress=False,
    )
    assert model.bundle_.path is None  # the temporary folder is gone, and nothing points at it
    model.save_pretrained(tmp_path / "saved")
    for name in ("split.json", "metrics.json", "history.csv"):
        assert (tmp_path / "saved" / name).is_file(), name
    import pandas as pd

    table = pd.DataFrame(
        {
            "image": [str((image_dir / r.image_id).resolve()) for r in rows],
            "text": [r.caption for r in rows],
            "labels": [list(r.labels) for r in rows],
        }
    )
    val = model.evaluate(table, images=image_dir, split="val")  # the split, from memory
    assert val["rows"] == len(json.loads((tmp_path / "saved" / "split.json").read_text())["val_ids"]) > 0


def test_an_exported_onnx_folder_loads_like_a_model_folder(tiny, tmp_path, capsys):
    from fuselabel.cli import main

    model, image_dir, csv, root = tiny
    assert main(["export", str(root / "model"), "--out", str(tmp_path / "onnx"), "--check-rows", "0"]) == 0
    exported = FuseLabel.from_pretrained(tmp_path / "onnx")
    rows = read_records(csv).records[:6]
    images, captions = [image_dir / r.image_id for r in rows], [r.caption for r in rows]
    np.testing.assert_allclose(
        exported.predict_proba(images, captions), model.predict_proba(images, captions), atol=1e-4
    )
    assert exported.labels_ == model.labels_
    # the exported copy's report is the model folder's (the same label sets on the same rows)
    assert exported.evaluate(csv, images=image_dir)["mean_f1"] == pytest.approx(
        model.evaluate(csv, images=image_dir)["mean_f1"], abs=1e-9
    )
    with pytest.raises(ValueError, match="exported ONNX folder"):
        exported.save_pretrained(tmp_path / "again")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "onnx")]) == 0
    assert "exported ONNX folder" in capsys.readouterr().out
