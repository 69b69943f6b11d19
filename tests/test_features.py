"""The frozen-feature cache and the onnxruntime graphs behind it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fuselabel import Config
from fuselabel.cache import FeatureCache, image_row_keys
from fuselabel.encoders import image_data_config
from fuselabel.engines import TorchEngine
from fuselabel.features import extract_image_features
from fuselabel.network import FuseLabelNet
from fuselabel.records import Record


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        records.append(Record(f"{i}.jpg", f"caption {i}", ("1",), i + 2))
    return tmp_path, records


def test_fetch_computes_only_rows_it_has_not_seen(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return {"features": np.asarray([[float(k)] for k in idx])}

    first = cache.fetch("k", ["a", "b", "c"], compute, "test")
    assert calls == [[0, 1, 2]] and first["features"].ravel().tolist() == [0, 1, 2]
    # A subset in another order is served from the store, a new row is computed alone and appended.
    again = cache.fetch("k", ["c", "a"], compute, "test")
    assert calls == [[0, 1, 2]] and again["features"].ravel().tolist() == [2, 0]
    mixed = cache.fetch("k", ["d", "b"], compute, "test")
    assert calls[-1] == [0] and mixed["features"].ravel().tolist() == [0, 1]


def test_image_rows_keyed_by_content_survive_copy_and_touch(images, tmp_path_factory):
    folder, records = images
    keys = image_row_keys(records, folder)
    assert len(set(keys)) == 3
    # A copy elsewhere, with new times, is the same data: every row hits the cache.
    copy = tmp_path_factory.mktemp("copy")
    for rec in records:
        shutil.copy(folder / rec.image_id, copy / rec.image_id)
        os.utime(copy / rec.image_id, (1, 1))
    assert image_row_keys(records, copy) == keys
    # An edited photo misses; a missing one gets a key of its own instead of an error here.
    Image.new("RGB", (40, 48), "red").save(copy / records[1].image_id)
    (copy / records[2].image_id).unlink()
    changed = image_row_keys(records, copy)
    assert changed[0] == keys[0] and changed[1] != keys[1] and changed[2] == f"missing|{records[2].image_id}"


def test_onnx_graph_cache_tells_poolings_apart(images, tmp_path):
    """The same weights pooled two ways are two graphs: a cached avg graph must not serve avgmax."""
    image_dir, records = images
    nets = {
        pool: FuseLabelNet(
            Config(kind="image", image_model="tf_efficientnet_lite0", image_pool=pool), 3, pretrained=False
        )
        for pool in ("avg", "avgmax")
    }
    backbone = nets["avg"].image_encoder.backbone
    nets["avgmax"].image_encoder.backbone.load_state_dict(backbone.state_dict())
    data_config = image_data_config(backbone, 64)
    dims = {}
    for pool, net in nets.items():
        engine = TorchEngine(net, None, data_config, encoders="onnx", device="cpu", cache_dir=tmp_path / "cache")
        feats, present = extract_image_features(engine, records, image_dir, num_workers=1)
        dims[pool] = feats.shape[1]
        assert present.tolist() == [1.0, 1.0, 1.0]
    assert dims == {"avg": 1280, "avgmax": 2560}
    assert len(list((tmp_path / "cache" / "onnx").glob("image-*.onnx"))) == 2


def test_text_features_same_through_onnx_and_torch(tmp_path):
    from fuselabel.encoders import create_tokenizer

    tokenizer = create_tokenizer("minilm-l6")
    net = FuseLabelNet(Config(kind="text", text_config_overrides=dict(num_hidden_layers=1)), 3, pretrained=False)
    captions = ["a dog", "A red bus driving down a city street.", "two cats on a sofa"]
    eager = TorchEngine(net, tokenizer, None, encoders="torch", device="cpu").text_features(captions)
    onnx = TorchEngine(net, tokenizer, None, encoders="onnx", device="cpu", cache_dir=tmp_path).text_features(captions)
    assert eager.shape == onnx.shape == (3, net.text_encoder.num_features)
    assert np.abs(eager - onnx).max() < 1e-4
    assert len(list((tmp_path / "onnx").glob("text-*.onnx"))) == 1
