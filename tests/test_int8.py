"""The int8 preset: the frozen image encoder in static int8 (QDQ), calibrated on training photos, and the frozen
text encoder in dynamic int8 are the ones the heads are trained on and the ones prediction runs, in the model
folder, its converted copy and its export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fuselabel.config import PRESETS, build_config


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory, session_cache):
    from conftest import TINY_SETTINGS, make_tiny_dataset

    from fuselabel import FuseLabel

    root = tmp_path_factory.mktemp("int8-model")
    image_dir, csv = make_tiny_dataset(root)
    FuseLabel(**TINY_SETTINGS, image_quant="int8", text_quant="int8", cache_dir=session_cache).fit(
        csv, images=image_dir, out=root / "model", progress=False
    )
    return root, image_dir, csv


def test_preset_and_refusals():
    assert PRESETS["cpu-int8"]["image_quant"] == "int8" and PRESETS["cpu-int8"]["text_quant"] == "int8"
    assert build_config("cpu-int8").regime == "frozen"
    with pytest.raises(ValueError, match="image_quant='int8' quantises a frozen image encoder"):
        build_config("cpu", image_quant="int8", regime="finetune")
    for regime in ("finetune", "hybrid"):
        with pytest.raises(ValueError, match="text_quant='int8' quantises a frozen text encoder"):
            build_config("cpu", text_quant="int8", regime=regime)


def test_training_features_are_the_prediction_features(int8_model, session_cache):
    from fuselabel.bundle import load_bundle
    from fuselabel.encoding import encode_images
    from fuselabel.engines import TorchEngine, engine_for_bundle
    from fuselabel.features import frozen_features
    from fuselabel.records import read_records

    root, image_dir, csv = int8_model
    bundle = load_bundle(root / "model")
    calibration = bundle.preprocessing["int8_calibration"]
    assert calibration["photos"] > 0 and calibration["ranges"]
    records = read_records(csv).records
    # What training stored (the feature cache) is what prediction computes, to the byte.
    config = bundle.config.replace(cache_dir=session_cache)
    trained, _ = frozen_features(
        bundle.net,
        bundle.tokenizer,
        dict(bundle.preprocessing),
        records,
        image_dir,
        config,
        device="cpu",
        progress=False,
        text=False,
    )
    engine = engine_for_bundle(bundle, device="cpu", cache_dir=session_cache)
    predicted, _, _ = encode_images(engine, [r.image_id for r in records], image_dir, workers=2)
    assert trained["image"].tobytes() == predicted.tobytes()
    # ... and it is not the float32 encoder's.
    fp32 = dict(bundle.preprocessing)
    del fp32["int8_calibration"]
    float_engine = TorchEngine(bundle.net, bundle.tokenizer, fp32, device="cpu", cache_dir=session_cache)
    float_feats, _, _ = encode_images(float_engine, [r.image_id for r in records], image_dir)
    assert not np.array_equal(float_feats, predicted)


def test_converted_and_exported_folders_keep_it(int8_model, tmp_path, session_cache):
    from fuselabel.bundle import convert_bundle
    from fuselabel.export import export_onnx
    from fuselabel.predict import predict_csv

    root, image_dir, csv = int8_model
    convert_bundle(root / "model", tmp_path / "small", "int8")
    kept = json.loads((tmp_path / "small" / "preprocessing.json").read_text())
    assert (
        kept["int8_calibration"] == json.loads((root / "model" / "preprocessing.json").read_text())["int8_calibration"]
    )
    manifest = export_onnx(root / "model", tmp_path / "onnx")
    assert manifest["files"]["image_encoder"]["quantized"].startswith("static QDQ")
    assert manifest["files"]["image_encoder"]["bytes"] < manifest["files"]["image_encoder"]["float_bytes"]
    assert manifest["checks"]["rows_identical"] == 1.0
    predict_csv(tmp_path / "onnx", image_dir, csv, tmp_path / "onnx.csv", progress=False)
    from fuselabel import FuseLabel

    model = FuseLabel.from_pretrained(root / "model", cache_dir=session_cache)
    predict_csv(model, image_dir, csv, tmp_path / "torch.csv", progress=False)
    assert (tmp_path / "onnx.csv").read_bytes() == (tmp_path / "torch.csv").read_bytes()


def test_text_features_are_the_prediction_features_one_caption_a_run(int8_model, tmp_path, session_cache):
    from fuselabel.bundle import load_bundle
    from fuselabel.encoding import encode_texts
    from fuselabel.engines import TorchEngine, engine_for_bundle
    from fuselabel.export import export_onnx
    from fuselabel.features import frozen_features
    from fuselabel.onnx_folder import OnnxFolderEngine
    from fuselabel.records import read_records

    root, image_dir, csv = int8_model
    bundle = load_bundle(root / "model")
    records = read_records(csv).records
    captions = [r.caption for r in records]
    config = bundle.config.replace(cache_dir=session_cache)
    trained, _ = frozen_features(
        bundle.net,
        bundle.tokenizer,
        dict(bundle.preprocessing),
        records,
        image_dir,
        config,
        device="cpu",
        progress=False,
        image=False,
    )
    engine = engine_for_bundle(bundle, device="cpu", cache_dir=session_cache)
    assert engine.text_batch == 1
    # The prediction path's batches (windows of rows) are not training's (all captions sorted by length) ...
    predicted = engine.text_features(captions)
    assert trained["text"].tobytes() == predicted.tobytes()
    # ... and no caption's numbers depend on the captions run beside it: alone, it gets the same bytes.
    for i in (0, 3, len(captions) - 1):
        assert engine.text_features([captions[i]]).tobytes() == predicted[i : i + 1].tobytes()
    assert encode_texts(engine, captions[::-1], workers=2).tobytes() == predicted[::-1].tobytes()
    # The exported folder runs the same int8 graph the same way.
    manifest = export_onnx(root / "model", tmp_path / "onnx", check_rows=0)
    assert manifest["files"]["text_encoder"]["quantized"].startswith("dynamic")
    assert manifest["files"]["text_encoder"]["bytes"] < manifest["files"]["text_encoder"]["float_bytes"] / 2
    exported = OnnxFolderEngine(tmp_path / "onnx")
    assert exported.text_batch == 1
    assert exported.text_features(captions).tobytes() == predicted.tobytes()
    # ... and it is not the float32 encoder's.
    float_net = bundle.net
    float_net.config = bundle.config.replace(text_quant="none")
    float_engine = TorchEngine(
        float_net,
        bundle.tokenizer,
        dict(bundle.preprocessing),
        device="cpu",
        text_max_length=bundle.config.text_max_length,
        cache_dir=session_cache,
    )
    assert float_engine.text_batch is None
    assert not np.array_equal(float_engine.text_features(captions), predicted)


def test_calibration_is_kept_for_the_same_photos(int8_model, session_cache, monkeypatch):
    from fuselabel import onnxrt
    from fuselabel.bundle import load_bundle
    from fuselabel.engines import calibrate_image_int8
    from fuselabel.records import read_records

    root, image_dir, csv = int8_model
    bundle = load_bundle(root / "model")
    data_config = {k: v for k, v in bundle.preprocessing.items() if k != "int8_calibration"}
    ids = [r.image_id for r in read_records(csv).records]
    first = calibrate_image_int8(bundle.net.image_encoder, data_config, ids, image_dir, session_cache)
    # What training saved is what the same photos give again ...
    assert first == bundle.preprocessing["int8_calibration"]
    measured = []
    real = onnxrt._calibrate
    monkeypatch.setattr(onnxrt, "_calibrate", lambda *a: measured.append(1) or real(*a))
    # ... taken from the kept ranges, without measuring them again ...
    assert calibrate_image_int8(bundle.net.image_encoder, data_config, ids, image_dir, session_cache) == first
    assert not measured
    # ... unless the kept file is damaged; other photos are other ranges.
    kept = list((Path(session_cache) / "onnx").glob("*-ranges-*.json"))
    assert kept
    for path in kept:
        path.write_text('{"cut sh')
    assert calibrate_image_int8(bundle.net.image_encoder, data_config, ids, image_dir, session_cache) == first
    assert measured == [1]
    other = calibrate_image_int8(bundle.net.image_encoder, data_config, ids[::-1][:3], image_dir, session_cache)
    assert other["ranges"] != first["ranges"] and measured == [1, 1]
