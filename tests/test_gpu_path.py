"""The tensor data path (fuselabel.geometry, gpu_decode, image_cache) on CPU tensors: the code a GPU runs, on "cpu".

Tolerances: the tensor path (torchvision.io.decode_jpeg + antialiased torch resize) against the PIL
path (PIL decode + torchvision Resize/CenterCrop on PIL images), in normalised pixel units, must
agree to a mean absolute difference < 0.02 over a batch and < 0.05 for every single image
(measured: about 0.0015 on the course JPEGs; a normalised unit is 1/(255 std), i.e. 0.008
to 0.017 per grey level for the usual std). Resize kernels differ slightly, so exact equality is
not expected; the PIL-in-workers mode of the same path must match the PIL path exactly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import shared_data_or_skip
from PIL import Image

from fuselabel import Config
from fuselabel.data import ImageError, build_transform, load_rgb
from fuselabel.geometry import (
    Geometry,
    augment_batch,
    center_batch,
    center_offsets,
    crop_resize,
    normalize,
    random_resized_crop_boxes,
    resized_hw,
)
from fuselabel.gpu_decode import gpu_decode_enabled, iter_uint8, jpeg_frame, nvjpeg_friendly
from fuselabel.image_cache import CachedRows, ImageCache
from fuselabel.records import Record, read_records

# torchvision >= 0.29 flags its JPEG codecs as deprecated (TorchCodec); the GPU machine's 0.26 does not
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

DATA_CONFIG = {
    "input_size": [3, 64, 64],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}
LITE2 = {"input_size": [3, 260, 260], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.89}


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _eval_both(records, image_dir, data_config):
    """(tensor-path pixels, PIL-path pixels, present) for ``records`` at the evaluation geometry."""
    geo = Geometry.from_data_config(data_config)
    batches = list(
        iter_uint8(records, image_dir, geo, geo.size, device="cpu", gpu_decode=True, num_workers=0, batch_size=32)
    )
    pos = torch.cat([b[0] for b in batches])
    assert pos.tolist() == list(range(len(records)))
    ours = normalize(torch.cat([b[1] for b in batches]), geo.mean, geo.std)
    tf = build_transform(data_config, train=False)
    ref = torch.stack([tf(load_rgb(image_dir / r.image_id)) for r in records])
    return ours, ref, torch.cat([b[2] for b in batches])


# ---------------------------------------------------------------------------------------------------------------
# Geometry, decoding, evaluation preprocessing


@pytest.mark.parametrize("w,h", [(320, 240), (240, 320), (137, 250), (300, 300), (301, 57)])
def test_resize_and_crop_geometry_match_torchvision(w, h):
    from torchvision import transforms as T

    img = Image.new("RGB", (w, h))
    out = T.Resize(73)(img)
    assert resized_hw(h, w, 73) == (out.height, out.width)
    x = torch.arange(h * w, dtype=torch.float32).view(1, h, w)
    top, left = center_offsets(h, w, 50)
    assert torch.equal(T.CenterCrop(50)(x), x[:, top : top + 50, left : left + 50])


def test_geometry_from_backbone_config():
    geo = Geometry.from_data_config(LITE2)
    assert (geo.size, geo.resize, geo.interpolation) == (260, 292, "bicubic")  # S = round(260 / 0.89)
    assert Geometry.from_data_config(dict(LITE2, interpolation="random")).interpolation == "bilinear"


def test_jpeg_routing_by_frame_header():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    assert jpeg_frame(_jpeg_bytes(rgb)) == (0xC0, 3) and nvjpeg_friendly(_jpeg_bytes(rgb))
    assert jpeg_frame(_jpeg_bytes(rgb, progressive=True))[0] == 0xC2
    assert nvjpeg_friendly(_jpeg_bytes(rgb.convert("L")))
    assert jpeg_frame(_jpeg_bytes(rgb.convert("CMYK")))[1] == 4
    assert not nvjpeg_friendly(_jpeg_bytes(rgb.convert("CMYK")))  # CMYK goes to PIL
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert jpeg_frame(png.getvalue()) is None and jpeg_frame(b"\xff\xd8\xff") is None and jpeg_frame(b"") is None


def test_eval_preprocessing_matches_pil_path_on_synthetic_jpegs(tiny_dataset):
    """Greyscale, CMYK and RGB JPEGs, upscaled 40 -> 73 px then cropped to 64 (bicubic)."""
    image_dir, csv = tiny_dataset
    records = read_records(csv).records
    ours, ref, present = _eval_both(records, image_dir, DATA_CONFIG)
    assert ours.shape == (len(records), 3, 64, 64) and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert bool(present.all())
    diff = (ours - ref).abs()
    assert diff.mean() < 0.02, diff.mean()
    assert diff.mean((1, 2, 3)).max() < 0.05


def test_eval_preprocessing_matches_pil_path_on_course_jpegs():
    data = shared_data_or_skip("real JPEGs for the decode comparison")
    records = read_records(data / "train.csv").records[:48]
    for config in (LITE2, dict(DATA_CONFIG, input_size=[3, 224, 224], interpolation="bilinear")):
        ours, ref, _ = _eval_both(records, data / "data", config)
        diff = (ours - ref).abs()
        assert diff.mean() < 0.02, diff.mean()
        assert diff.mean((1, 2, 3)).max() < 0.05


def test_whole_photo_geometry_matches_pil_path(tiny_dataset):
    """crop_pct >= 1: no centre crop, the whole photo squashed to the input size, on both paths."""
    image_dir, csv = tiny_dataset
    records = read_records(csv).records[:12]
    config = dict(DATA_CONFIG, crop_pct=1.0)
    geo = Geometry.from_data_config(config)
    assert geo.squash and geo.resize == geo.size == 64
    ours, ref, _ = _eval_both(records, image_dir, config)
    assert (ours - ref).abs().mean() < 0.02
    _, pixels, _ = next(iter_uint8(records, image_dir, geo, 64, device="cpu", gpu_decode=False, num_workers=0))
    torch.testing.assert_close(normalize(pixels, geo.mean, geo.std), ref, atol=1e-5, rtol=0)


def test_pil_worker_mode_is_the_pil_path_exactly(tiny_dataset):
    image_dir, csv = tiny_dataset
    records = read_records(csv).records[:10]
    geo = Geometry.from_data_config(DATA_CONFIG)
    _, pixels, _ = next(iter_uint8(records, image_dir, geo, geo.size, device="cpu", gpu_decode=False, num_workers=0))
    ref = torch.stack([build_transform(DATA_CONFIG, train=False)(load_rgb(image_dir / r.image_id)) for r in records])
    torch.testing.assert_close(normalize(pixels, geo.mean, geo.std), ref, atol=1e-5, rtol=0)


def test_unusable_images_follow_the_missing_images_policy(tmp_path):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    img.save(tmp_path / "ok.jpg", quality=90)
    img.save(tmp_path / "png.jpg", "PNG")  # not a JPEG: PIL decodes it
    (tmp_path / "broken.jpg").write_bytes(_jpeg_bytes(img)[:200])  # looks like a JPEG, fails to decode
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    names = ["ok.jpg", "png.jpg", "broken.jpg", "junk.jpg", "missing.jpg"]
    records = [Record(n, f"caption {i}", (), i + 2) for i, n in enumerate(names)]
    geo = Geometry.from_data_config(DATA_CONFIG)
    _, pixels, present = next(
        iter_uint8(
            records, tmp_path, geo, 64, device="cpu", gpu_decode=True, num_workers=0, missing_images="caption_only"
        )
    )
    assert present.tolist() == [1, 1, 0, 0, 0]
    assert pixels[2:].eq(0).all() and pixels[:2].float().mean() > 10
    tf = build_transform(DATA_CONFIG, train=False)
    # the PNG is decoded by PIL in the worker, then resized like every other image (tensor resize: close, not equal)
    assert (normalize(pixels[1:2], geo.mean, geo.std) - tf(load_rgb(tmp_path / "png.jpg"))).abs().mean() < 0.05
    for bad, line in (("broken.jpg", 4), ("missing.jpg", 6)):
        with pytest.raises(ImageError, match=rf"{bad}.*CSV line {line}"):
            list(
                iter_uint8(
                    [records[0], records[names.index(bad)]],
                    tmp_path,
                    geo,
                    64,
                    device="cpu",
                    gpu_decode=True,
                    num_workers=0,
                )
            )


def test_decode_switch(monkeypatch):
    monkeypatch.delenv("FUSELABEL_GPU_DECODE", raising=False)
    assert not gpu_decode_enabled(None, "cpu")  # the PIL path on a CPU by default
    monkeypatch.setenv("FUSELABEL_GPU_DECODE", "force")
    assert gpu_decode_enabled(None, "cpu")
    monkeypatch.setenv("FUSELABEL_GPU_DECODE", "0")
    assert not gpu_decode_enabled(True, "cuda")


# ---------------------------------------------------------------------------------------------------------------
# Training augmentation


def test_random_resized_crop_boxes_in_bounds_and_per_sample():
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(4096, 292, 292, generator=g)
    assert boxes.shape == (4096, 4)
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    eps = 1e-3
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 292 + eps).all() and (y2 <= 292 + eps).all()
    area = w * h / 292**2
    assert area.min() >= 0.5 - eps and area.max() <= 1 + eps
    assert (w / h).min() >= 3 / 4 - eps and (w / h).max() <= 4 / 3 + eps
    assert len(torch.unique(boxes.round(), dim=0)) > 4000  # every sample gets its own crop
    assert 0.65 < area.mean() < 0.73  # torchvision's mean area share is ~0.69
    # a wide image whose ratio is outside (3/4, 4/3) with an impossible scale falls back to a centred crop
    fallback = random_resized_crop_boxes(8, 10, 100, scale=(2.0, 2.0), generator=g)
    torch.testing.assert_close(fallback[0], torch.tensor([43.3333, 0.0, 56.6667, 10.0]), atol=1e-3, rtol=0)


def test_crop_resize_is_exact_on_whole_pixel_boxes():
    x = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).view(2, 3, 20, 30)
    same = crop_resize(x, torch.tensor([[0.0, 0.0, 30.0, 20.0]] * 2), 20)[:, :, :, :]
    assert same.shape == (2, 3, 20, 20)
    square = x[:, :, :, 5:25]
    out = crop_resize(square.contiguous(), torch.tensor([[0.0, 0.0, 20.0, 20.0], [2.0, 4.0, 12.0, 14.0]]), 10)
    assert torch.equal(out[0], crop_resize(square[:1].contiguous(), torch.tensor([[0.0, 0.0, 20.0, 20.0]]), 10)[0])
    torch.testing.assert_close(out[1], square[1, :, 4:14, 2:12])  # box of the output's size: the pixels themselves


def test_augment_batch_shapes_flips_and_differences():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (64, 3, 36, 36), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x, boxes, flips = augment_batch(images, 32, mean, std, generator=g, return_params=True)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert 10 < int(flips.sum()) < 54  # flips are drawn per sample
    assert len(torch.unique(boxes.round(), dim=0)) == 64
    # with the whole image as the only crop, each output is the normalised image or its mirror, as flips says
    x, boxes, flips = augment_batch(
        images, 36, mean, std, generator=g, scale=(1.0, 1.0), ratio=(1.0, 1.0), return_params=True
    )
    plain = normalize(images, mean, std)
    for i in range(64):
        expected = plain[i].flip(-1) if flips[i] else plain[i]
        torch.testing.assert_close(x[i], expected, atol=1e-4, rtol=0)
    assert 0 < int(flips.sum()) < 64
    centre = center_batch(images, 32, mean, std)
    torch.testing.assert_close(centre, plain[:, :, 2:34, 2:34])


# ---------------------------------------------------------------------------------------------------------------
# The image cache and the training loop


@pytest.mark.parametrize("decode", ["0", "force"])
def test_image_cache_build_and_batches(tiny_dataset, monkeypatch, decode):
    monkeypatch.setenv("FUSELABEL_GPU_DECODE", decode)
    image_dir, csv = tiny_dataset
    records = read_records(csv).records
    (image_dir / records[5].image_id).unlink()
    cache = ImageCache.build(
        records,
        image_dir,
        DATA_CONFIG,
        device="cpu",
        num_workers=0,
        missing_images="caption_only",
        progress=False,
        seed=1,
    )
    assert cache.images.shape == (len(records), 3, 73, 73) and cache.images.dtype == torch.uint8
    assert cache.present[5] == 0 and cache.present.sum() == len(records) - 1
    labels = np.zeros((len(records), 4), dtype=np.float32)
    rows = CachedRows(np.arange(len(records)), records, labels, cache)
    assert rows.image_source is cache and set(rows[0]) == {"cache_index", "caption", "labels", "image_present"}
    assert "image_source" in rows.__dict__ and rows.__getstate__()["image_source"] is None
    batch = {"cache_index": torch.tensor([0, 5, 7]), "image_present": torch.tensor([1.0, 0.0, 1.0])}
    ev = cache.materialize(batch, train=False)["pixels"]
    assert ev.shape == (3, 3, 64, 64) and ev[1].eq(0).all()
    tf = build_transform(DATA_CONFIG, train=False)
    ref = tf(load_rgb(image_dir / records[7].image_id))
    assert (ev[2] - ref).abs().mean() < 0.02  # cache -> centre crop ~ the PIL eval path
    tr1 = cache.materialize(batch, train=True)["pixels"]
    tr2 = cache.materialize(batch, train=True)["pixels"]
    assert tr1.shape == (3, 3, 64, 64) and not torch.equal(tr1[0], tr2[0])  # fresh crops every batch
    assert tr1[1].eq(0).all()


def test_fit_with_image_cache_end_to_end(tiny_dataset, tmp_path, monkeypatch):
    from fuselabel import FuseLabel
    from fuselabel.bundle import load_bundle
    from fuselabel.predict import predict_csv
    from fuselabel.train import fit

    calls = {"train": 0, "eval": 0}
    original = ImageCache.materialize

    def counting(self, batch, train):
        calls["train" if train else "eval"] += 1
        out = original(self, batch, train)
        assert out["pixels"].shape[-1] == 64
        return out

    monkeypatch.setattr(ImageCache, "materialize", counting)
    image_dir, csv = tiny_dataset
    config = Config(
        image_model="tf_efficientnet_lite0",
        image_size=64,
        text_config_overrides=dict(num_hidden_layers=1),
        regime="finetune",
        kind="late",
        epochs=1,
        batch_size=16,
        hidden_dim=32,
        num_workers=0,
        accelerator="cpu",
        cache_dir=str(tmp_path / "cache"),
        text_max_length=32,
        image_cache="memory",
    )
    config = config.replace(word_dropout=0.1)  # the training loader's captions are augmented too
    result = fit(config, image_dir, csv, tmp_path / "model", work_dir=tmp_path / "work", progress=False)
    assert result is not None and (tmp_path / "model" / "model.safetensors").exists()
    # Lightning's loop uses the cache; the final tuning pass runs the stored model through the prediction path
    assert calls["train"] >= 2 and calls["eval"] >= 1
    assert result.val_parts["image"].shape == (len(result.val_labels), 4)
    assert result.report["rows"] == len(result.val_labels) > 0
    # where a model ran (image_cache is a runtime setting) is not part of the folder; the model itself loads
    assert load_bundle(tmp_path / "model").config.kind == "late"
    sub = tmp_path / "sub.csv"
    predict_csv(
        FuseLabel.from_pretrained(tmp_path / "model", feature_engine="torch", num_workers=0),
        image_dir,
        csv,
        sub,
        progress=False,
    )
    assert len(sub.read_text().splitlines()) == len(read_records(csv).records) + 1


def test_photos_stored_turned_are_not_sent_to_the_device_decoder(tmp_path):
    """nvJPEG ignores EXIF: a JPEG with an orientation tag is decoded by PIL (upright), the rest go as bytes."""
    from PIL import Image

    from fuselabel.geometry import Geometry
    from fuselabel.gpu_decode import _ReadDataset
    from fuselabel.records import Record

    img = Image.new("RGB", (60, 40), (200, 30, 30))
    img.save(tmp_path / "plain.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown rotated 90 degrees
    img.save(tmp_path / "turned.jpg", "JPEG", exif=exif.tobytes())
    records = [Record("plain.jpg", "", (), 1), Record("turned.jpg", "", (), 2)]
    geometry = Geometry(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3, squash=True)
    ds = _ReadDataset(records, tmp_path, "bytes", geometry, 32)
    plain, turned = ds[0], ds[1]
    assert plain["data"] is not None and plain["pixels"] is None
    assert turned["data"] is None and turned["pixels"].shape[1:] == (60, 40)  # upright: 40 wide, 60 high
