"""``FuseLabel``, the model object: settings checked up front, fit from a CSV or from memory, predict on any
mix of paths, PIL images, bytes and missing inputs, and model folders that save, load and say their format."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_SETTINGS as TINY
from conftest import shared_data_or_skip
from fuselabel import FuseLabel
from fuselabel.records import read_records
from fuselabel.writers import write_rows

@pytest.fixture(scope="module")
def tiny(tiny_model):
    root, image_dir, csv = tiny_model
    return FuseLabel.from_pretrained(root / "model"), image_dir, csv, root


@pytest.mark.parametrize("bad, key", [(dict(epochs="ten"), "epochs"), (dict(batch_size=-3), "batch_size"),
                                      (dict(no_such_setting=1), "no_such_setting"), (dict(kind="middle"), "kind"),
                                      (dict(preset="nope"), "nope")])
def test_bad_settings_are_refused_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        FuseLabel(**bad)


def test_settings_are_converted_to_their_type():
    model = FuseLabel(lr="1e-4", epochs="3", image_size="0")
    assert model.config.lr == pytest.approx(1e-4) and model.config.epochs == 3 and model.config.image_size is None


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
    images = [Image.open(image_dir / r.image_id) if i % 3 == 0 else
              (image_dir / r.image_id).read_bytes() if i % 3 == 1 else image_dir / r.image_id
              for i, r in enumerate(rows)]
    labels = [[int(x) for x in r.labels] for r in rows]
    model = FuseLabel(**TINY, cache_dir=session_cache).fit(images=images, captions=[r.caption for r in rows],
                                                          labels=labels, progress=False)
    assert model.labels_ == [1, 2, 3, 4]
    probs = model.predict_proba(images[:5], [r.caption for r in rows[:5]])
    assert probs.shape == (5, 4) and np.isfinite(probs).all()


def test_save_and_load_round_trip(tiny, tmp_path):
    model, image_dir, csv, _ = tiny
    rows = read_records(csv).records[:6]
    images, captions = [image_dir / r.image_id for r in rows], [r.caption for r in rows]
    model.save_pretrained(tmp_path / "copy")
    again = FuseLabel.from_pretrained(tmp_path / "copy")
    np.testing.assert_allclose(again.predict_proba(images, captions), model.predict_proba(images, captions),
                               atol=1e-6)
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
    old = {**json.loads((tmp_path / "m" / "run.json").read_text()),
           **json.loads((tmp_path / "m" / "config.json").read_text()), "cache_dir": "/somewhere", "devices": "auto"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    (tmp_path / "m" / "run.json").unlink()
    (tmp_path / "m" / "fuselabel.json").unlink()
    again = FuseLabel.from_pretrained(tmp_path / "m")
    assert again.config.epochs == model.config.epochs and again.config.cache_dir is None


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
    labels = model.predict(images=[img, data / "data" / rows[1].image_id, None],
                           captions=[rows[0].caption, rows[1].caption, rows[2].caption])
    assert len(labels) == 3 and all(labels) and all(lab in model.labels_ for row in labels for lab in row)
    probs = model.predict_proba(images=[img], captions=["a dog on a sofa"])
    assert probs.shape == (1, len(model.labels_))
    report = model.evaluate(tmp_path / "train.csv", images=data / "data")
    assert report["rows"] == 500 and report["mean_f1"] > 0.6
    model.save_pretrained(tmp_path / "m1")
    assert FuseLabel.from_pretrained(tmp_path / "m1").predict(images=[img], captions=[rows[0].caption]) == labels[:1]
