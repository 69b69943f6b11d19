"""One preprocessing for every path: the model's Preprocess, the photo tensors each path makes from it, and the
model folder that keeps it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fuselabel.data import PairDataset, build_transform
from fuselabel.encoding import read_photos_uint8
from fuselabel.geometry import normalize
from fuselabel.gpu_decode import iter_uint8
from fuselabel.image_cache import ImageCache
from fuselabel.images import normalise
from fuselabel.preprocess import Preprocess, resample_weights
from fuselabel.records import Record

# Photo sizes on both sides of the 73 px resize, wide and tall, each under twice it (so every path decodes
# every pixel; larger photos are decoded smaller on the PIL path, see images.load_rgb).
SIZES = [(120, 90), (90, 120), (40, 30), (73, 73), (140, 50), (61, 144)]


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(5)
    records = []
    for i, (w, h) in enumerate(SIZES):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
        pixels = np.clip(ramp + rng.integers(-50, 50, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=92)
        records.append(Record(f"{i}.jpg", f"photo {i}", ("1",), i + 2))
    return tmp_path, records


@pytest.mark.parametrize("crop_pct,interpolation", [(64 / 73, "bicubic"), (1.0, "bicubic"), (0.9, "bilinear")])
def test_every_path_gives_the_same_tensor(photos, monkeypatch, crop_pct, interpolation):
    """The PIL path (runtime), the training dataset's evaluation transform, the device decoder's code and the
    image cache (both decoders) give the same bytes for the same photo."""
    image_dir, records = photos
    pp = Preprocess(
        size=64, crop_pct=crop_pct, interpolation=interpolation, mean=(0.5, 0.45, 0.4), std=(0.2, 0.3, 0.25)
    )
    ids = [r.image_id for r in records]
    uint8, errors = read_photos_uint8(ids, image_dir, pp)
    assert errors == [None] * len(ids)
    want = torch.from_numpy(normalise(np.stack(uint8), pp.table))

    dataset = PairDataset(records, image_dir, build_transform(pp, train=False))
    assert torch.equal(torch.stack([dataset[i]["pixels"] for i in range(len(records))]), want)

    for decoder in ("0", "force"):
        _, pixels, present = next(
            iter_uint8(records, image_dir, pp, device="cpu", gpu_decode=decoder == "force", num_workers=0)
        )
        assert bool(present.all()) and torch.equal(normalize(pixels, pp), want), decoder
        monkeypatch.setenv("FUSELABEL_GPU_DECODE", decoder)
        cache = ImageCache.build(records, image_dir, pp, device="cpu", num_workers=0, progress=False)
        assert cache.images.shape[-1] == pp.resize
        batch = {"cache_index": torch.arange(len(records)), "image_present": torch.ones(len(records))}
        assert torch.equal(cache.materialize(batch, train=False)["pixels"], want), decoder


def test_crop_inside_the_cache_square_is_the_evaluation_crop():
    """Odd margins round differently at each step; the cache square is placed so that its centre is the crop."""
    pp = Preprocess(size=31, crop_pct=31 / 36)
    assert pp.resize == 36
    for width, height in [(36, 36), (37, 36), (36, 38), (51, 36), (36, 52), (99, 36)]:
        left, top, right, bottom = pp.crop_box(width, height)
        cl, ct, cr, cb = pp.crop_box(width, height, pp.resize)
        assert (cr - cl, cb - ct) == (36, 36) and 0 <= cl <= width - 36 and 0 <= ct <= height - 36
        inner = pp.crop_box(36, 36)
        assert (cl + inner[0], ct + inner[1]) == (left, top), (width, height)


def test_resize_weights_are_pillows():
    """One pass of the shared weights over every pixel gives Pillow's own single-axis resize."""
    rng = np.random.default_rng(0)
    row = rng.integers(0, 256, (1, 57, 3), dtype=np.uint8)
    for name, resample in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        for out in (20, 57 * 2 + 3):
            weights = resample_weights(57, out, name)
            assert np.all(weights.sum(0) >= (1 << 22) - out)  # each output's weights add up to one
            ours = np.clip((row[0].T.astype(np.int64) @ weights + (1 << 21)) >> 22, 0, 255).T
            want = np.asarray(Image.fromarray(row).resize((out, 1), resample))[0]
            assert np.array_equal(ours, want), (name, out)


def test_preprocess_knows_its_real_size():
    pp = Preprocess.of({"input_size": [3, 288, 288], "mean": [0.5] * 3, "std": [0.5] * 3})
    assert (pp.size, pp.crop_pct, pp.interpolation, pp.resize) == (288, 0.875, "bicubic", 329)
    assert pp.to_config()["input_size"] == [3, 288, 288] and pp.to_config()["crop_pct"] == 0.875
    with pytest.raises(ValueError, match="input_size"):
        Preprocess.of({"mean": [0.5] * 3})
    wide = Preprocess(64, 1.0).photo_box(400, 300)
    assert wide == (0.0, 0.0, 400.0, 300.0)
    left, top, right, bottom = Preprocess(64, 0.8).photo_box(400, 300)  # short side 300 -> 80, crop 64 of it
    assert right - left == pytest.approx(240, abs=4) and bottom - top == pytest.approx(240, abs=4)
    assert (left + right) / 2 == pytest.approx(200, abs=4) and (top + bottom) / 2 == pytest.approx(150, abs=4)


def _image_bundle(preprocessing: dict):
    from fuselabel import Config
    from fuselabel.bundle import Bundle
    from fuselabel.network import FuseLabelNet

    config = Config(kind="image", image_model="tf_efficientnet_lite0", image_size=64, save_dtype="fp16")
    thresholds = {"method": "global", "thresholds": [0.5, 0.5], "val_mean_f1": 0.5, "ensure_nonempty": True}
    return Bundle(
        net=FuseLabelNet(config, 2, pretrained=False),
        config=config,
        labels=["1", "2"],
        label_names={},
        thresholds=thresholds,
        preprocessing=preprocessing,
        tokenizer=None,
    )


def test_model_folder_round_trips_its_preprocess(tmp_path):
    from fuselabel.bundle import load_bundle, save_bundle

    pp = Preprocess(size=64, crop_pct=0.9, interpolation="bilinear", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    config = dict(pp.to_config(), int8_calibration={"kept": [1, 2]})
    save_bundle(tmp_path / "model", _image_bundle(config))
    loaded = load_bundle(tmp_path / "model").preprocessing
    assert Preprocess.of(loaded) == pp and loaded["int8_calibration"] == {"kept": [1, 2]}

    # A folder written before the preprocessing was complete: timm's keys only where they were set.
    old = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    (tmp_path / "model" / "preprocessing.json").write_text(json.dumps(old))
    loaded = load_bundle(tmp_path / "model").preprocessing
    assert Preprocess.of(loaded) == Preprocess(64, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert loaded["crop_pct"] == 0.875 and loaded["input_size"] == [3, 64, 64]
