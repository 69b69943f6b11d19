"""Both cores busy, byte for byte: uint8 preprocessing equal to the float arithmetic it replaces, the usable
core count, and prediction files that do not change by one byte with the number of workers or the chunk size."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fuselabel import encoding
from fuselabel.export import export_cached
from fuselabel.images import eval_pixels, eval_uint8, normalise, pixel_table
from fuselabel.onnx_folder import OnnxFolderEngine
from fuselabel.predict import predict_csv


def _float_pixels(img: Image.Image, cfg: dict) -> np.ndarray:
    """The evaluation preprocessing as it was computed before pixels stayed uint8: float32 HWC, then CHW."""
    size = cfg["input_size"][-1]
    resample = Image.BILINEAR if cfg["interpolation"] == "bilinear" else Image.BICUBIC
    if cfg["crop_pct"] >= 1.0:
        img = img.resize((size, size), resample)
    else:
        short = int(round(size / cfg["crop_pct"]))
        w, h = img.size
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    mean, std = np.asarray(cfg["mean"], dtype=np.float32), np.asarray(cfg["std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(input_size=(3, 48, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, interpolation="bicubic"),
        dict(
            input_size=(3, 40, 40),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            crop_pct=0.875,
            interpolation="bilinear",
        ),
    ],
)
def test_uint8_pixels_give_exactly_the_float_preprocessing(cfg):
    rng = np.random.default_rng(0)
    photos = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(61, 99), (100, 60), (48, 48)]
    ]
    table = pixel_table(cfg)
    batch = np.stack([eval_uint8(p, cfg) for p in photos])
    assert batch.dtype == np.uint8 and batch.shape == (3, 3, *cfg["input_size"][1:])
    want = np.stack([_float_pixels(p, cfg) for p in photos])
    assert normalise(batch, table).tobytes() == want.tobytes()
    assert np.stack([eval_pixels(p, cfg) for p in photos]).tobytes() == want.tobytes()
    # Flipping before or after the normalisation is the same, so the flip can stay in uint8.
    assert (
        normalise(np.ascontiguousarray(batch[..., ::-1]), table).tobytes()
        == np.ascontiguousarray(want[..., ::-1]).tobytes()
    )
    # Every level of every channel, not only those the photos happen to hold.
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    float_levels = (np.arange(256, dtype=np.float32)[:, None] / 255.0 - mean) / std
    assert (
        normalise(np.ascontiguousarray(levels), table)[:, 0, :].tobytes()
        == np.ascontiguousarray(float_levels.T).tobytes()
    )


def test_usable_cores_follow_affinity_and_quota(monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this system")
    allowed = os.sched_getaffinity(0)
    monkeypatch.setattr(encoding, "_cgroup_quota", lambda: None)
    assert encoding.usable_cores() == len(allowed)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {min(allowed)})
    assert encoding.usable_cores() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(encoding, "_cgroup_quota", lambda: 2.0)
    assert encoding.usable_cores() == 2
    monkeypatch.setattr(encoding, "_cgroup_quota", lambda: 0.3)
    assert encoding.usable_cores() == 1
    assert encoding._workers(None) == 1 and encoding._workers(3) == 3


def test_cgroup_quota_files(tmp_path, monkeypatch):
    real = encoding.Path

    def fake(text, files):
        for name, value in files.items():
            (tmp_path / name.strip("/").replace("/", "_")).write_text(value)
        return lambda p: real(tmp_path / str(p).strip("/").replace("/", "_"))

    monkeypatch.setattr(encoding, "Path", fake("v2", {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}))
    assert encoding._cgroup_quota() == 1.5
    monkeypatch.setattr(encoding, "Path", fake("v2", {"/sys/fs/cgroup/cpu.max": "max 100000\n"}))
    assert encoding._cgroup_quota() is None


def _many_rows(image_dir, csv, folder, copies: int = 12):
    """The tiny data set's rows repeated past several 64-row windows, with a missing photo and an empty caption."""
    from fuselabel.records import read_records

    records = read_records(csv).records
    folder.mkdir()
    rows = []
    for k in range(copies):
        for r in records:
            name = f"{k}-{r.image_id}"
            os.link(image_dir / r.image_id, folder / name)
            rows.append(f'{name},"{r.caption.replace(chr(34), chr(39))}"')
    rows[70] = "missing.jpg," + rows[70].split(",", 1)[1]
    rows[130] = rows[130].split(",", 1)[0] + ',""'
    (folder / "test.csv").write_text("\n".join(["ImageID,Caption"] + rows) + "\n")
    return folder, folder / "test.csv"


@pytest.mark.parametrize("exported", [False, True])
def test_workers_and_chunk_size_never_change_a_byte(tiny_model, tmp_path, session_cache, exported):
    from fuselabel import FuseLabel

    root, image_dir, csv = tiny_model
    image_dir, rows = _many_rows(image_dir, csv, tmp_path / "rows")
    outputs = {}
    for workers, chunk in [(1, 512), (2, 512), (2, 64), (3, 128)]:
        if exported:
            model = FuseLabel.from_pretrained(export_cached(root / "model", session_cache), num_workers=workers)
        else:
            model = FuseLabel.from_pretrained(root / "model", num_workers=workers, cache_dir=session_cache)
        assert model.predictor().workers == workers
        sub, proba = tmp_path / f"s-{workers}-{chunk}.csv", tmp_path / f"p-{workers}-{chunk}.csv"
        predict_csv(model, image_dir, rows, sub, proba_out=proba, chunk_size=chunk, progress=False)
        outputs[workers, chunk] = sub.read_bytes(), proba.read_bytes()
    first = outputs[1, 512]
    assert first[1].count(b"caption_only") == 1 and first[1].count(b"image_only") == 1
    for key, files in outputs.items():
        assert files == first, f"{key} workers/chunk size changed the output"


def test_training_features_do_not_depend_on_workers(tiny_model, session_cache):
    from fuselabel.encoding import encode_images, encode_texts
    from fuselabel.records import read_records

    root, image_dir, csv = tiny_model
    engine = OnnxFolderEngine(export_cached(root / "model", session_cache))
    records = read_records(csv).records * 3
    texts = [encode_texts(engine, [r.caption for r in records], workers=w) for w in (1, 2)]
    assert texts[0].shape == (len(records), engine.feature_dims["text"])
    assert texts[0].tobytes() == texts[1].tobytes()
    images = [encode_images(engine, [r.image_id for r in records], image_dir, workers=w) for w in (1, 2)]
    assert images[0][0].tobytes() == images[1][0].tobytes() and images[0][1].all()


def test_a_photos_features_do_not_depend_on_the_photos_run_beside_it(tiny_model, session_cache):
    """Prediction runs photos through onnxruntime one at a time (``encoding.ORT_IMAGE_BATCH``), and prediction
    pieces and training windows hold several such runs: any run size must give every photo the same numbers."""
    from fuselabel.encoding import ORT_IMAGE_BATCH, encode_images
    from fuselabel.records import read_records
    from fuselabel.runtime import Predictor

    root, image_dir, csv = tiny_model
    engine = OnnxFolderEngine(export_cached(root / "model", session_cache))
    assert engine.image_batch == ORT_IMAGE_BATCH
    assert Predictor(engine, engine.labels, [0.5] * len(engine.labels)).batch_size == ORT_IMAGE_BATCH
    photos = [r.image_id for r in read_records(csv).records][:37]  # a last run shorter than the others
    runs = {b: encode_images(engine, photos, image_dir, batch_size=b, workers=2)[0] for b in (1, 4, 16)}
    assert runs[1].shape == (37, engine.feature_dims["image"])
    assert runs[1].tobytes() == runs[4].tobytes() == runs[16].tobytes()
