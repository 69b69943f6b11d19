"""The frozen-feature cache and the onnxruntime graphs behind it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fuselabel.encoders import PooledImageEncoder, create_image_encoder, image_data_config
from fuselabel.cache import FeatureCache, image_row_keys
from fuselabel.features import extract_image_features, extract_text_features
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
    backbone = create_image_encoder("tf_efficientnet_lite0", pretrained=False)
    config = image_data_config(backbone, 64)
    dims = {}
    for pool in ("avg", "avgmax"):
        encoder = PooledImageEncoder(backbone, pool=pool).eval()
        feats, present = extract_image_features(encoder, config, records, image_dir, engine="onnx", num_workers=0,
                                                cache_dir=tmp_path / "cache", progress=False)
        dims[pool] = feats.shape[1]
        assert present.tolist() == [1.0, 1.0, 1.0]
    assert dims == {"avg": 1280, "avgmax": 2560}


def test_text_features_same_through_onnx_and_torch(tmp_path):
    from fuselabel.encoders import create_text_encoder, create_tokenizer

    tokenizer = create_tokenizer("minilm-l6")
    encoder = create_text_encoder("minilm-l6", pretrained=False, overrides=dict(num_hidden_layers=1))
    captions = ["a dog", "A red bus driving down a city street.", "two cats on a sofa"]
    eager = extract_text_features(encoder, tokenizer, captions, engine="torch", progress=False)
    onnx = extract_text_features(encoder, tokenizer, captions, engine="onnx", cache_dir=tmp_path, progress=False)
    assert eager.shape == onnx.shape == (3, encoder.num_features)
    assert np.abs(eager - onnx).max() < 1e-4
