"""The text length: chosen at fit from the training captions, kept in the model folder, and cut texts counted.

Models here are text-only (a one-layer MiniLM, frozen) so each fit takes seconds on a CPU.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_LABELS

from fuselabel import FuseLabel
from fuselabel.bundle import describe, load_bundle
from fuselabel.encoders import choose_text_length, create_tokenizer, text_length_limit, token_counts
from fuselabel.engines import engine_for_bundle

TEXT_MODEL = dict(
    kind="text",
    regime="frozen",
    epochs=1,
    max_steps=2,
    batch_size=16,
    val_fraction=0.25,
    num_workers=0,
    accelerator="cpu",
    hidden_dim=16,
    text_config_overrides={"num_hidden_layers": 1},
    feature_engine="torch",
    # the fp32 text encoder these tests compare with eager PyTorch (the CPU default is int8: test_int8.py)
    text_quant="none",
    save_dtype="fp16",
)
WORDS = ["red", "green", "blue", "small", "large", "street", "field", "window", "table", "river", "cloud", "stone"]


@pytest.fixture(scope="module")
def tokenizer():
    return create_tokenizer("minilm-l6")


def _captions(n: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(n)]


def _fit(tmp_path, name, captions, cache, **settings):
    keys = list(TINY_LABELS)
    labels = [[keys[i % len(keys)]] for i in range(len(captions))]
    out = tmp_path / name
    FuseLabel(**{**TEXT_MODEL, **settings}, cache_dir=cache).fit(
        images=[None] * len(captions), captions=captions, labels=labels, out=out, progress=False
    )
    return out


# ---------------------------------------------------------------------------------------------------- the choice


def test_longer_texts_get_a_longer_length(tokenizer):
    short = token_counts(tokenizer, _captions(200, 5))
    long = token_counts(tokenizer, _captions(200, 90))
    assert short.max() <= 7 and long.min() >= 92  # a word a token, plus [CLS] and [SEP]
    a, b = choose_text_length(short, 512), choose_text_length(long, 512)
    assert a == 16  # the floor
    assert b == 96 and b > a  # 92 tokens rounded up to a multiple of 16


def test_percentile_ignores_a_few_outliers_and_the_cap_holds():
    counts = np.r_[np.full(995, 30), np.full(5, 400)]  # 0.5 % of the texts are far longer
    assert choose_text_length(counts, 512) == 32
    assert choose_text_length(np.full(50, 3000), 512) == 512
    assert choose_text_length(np.full(50, 100), 64) == 64
    assert choose_text_length([], 512) == 16


def test_encoder_limit_guards_sentinels(tokenizer):
    assert text_length_limit(tokenizer) == 512
    huge = SimpleNamespace(model_max_length=int(1e30))
    assert text_length_limit(huge, SimpleNamespace(max_position_embeddings=128)) == 128
    assert text_length_limit(huge, SimpleNamespace(max_position_embeddings=None)) == 512  # nothing known: BERT's
    assert text_length_limit(SimpleNamespace(model_max_length=256), SimpleNamespace(max_position_embeddings=512)) == 256


# ----------------------------------------------------------------------------------------- training and prediction


def test_fit_chooses_from_data_saves_it_and_counts_cut_texts(tmp_path, session_cache, tokenizer, caplog):
    short = _fit(tmp_path, "short", _captions(24, 5), session_cache)
    # 22 captions of ~40 tokens and 2 of ~200: the chosen length follows the many, and the 2 long ones are cut
    # (the 99th percentile of 18 training rows interpolates between the two largest: well below 200 only when
    # at most one long caption is on the training side, so the count is read from the run's own record).
    captions = _captions(22, 38, seed=1) + _captions(2, 200, seed=2)
    with caplog.at_level("INFO", logger="fuselabel.train"):
        long = _fit(tmp_path, "long", captions, session_cache)
    a = json.loads((short / "config.json").read_text())["text_max_length"]
    b = json.loads((long / "config.json").read_text())["text_max_length"]
    assert a == 16 and b > a and b % 16 == 0 and b <= 512

    record = json.loads((long / "metrics.json").read_text())["text_length"]
    assert record["tokens"] == b and record["chosen"].startswith("99th percentile")
    train_ids = json.loads((long / "split.json").read_text())["train_ids"]
    assert record["texts"] == len(train_ids)
    counts = token_counts(tokenizer, [captions[int(i.split("row")[-1].split(".")[0])] for i in train_ids])
    assert record["texts_cut"] == int((counts > b).sum())
    assert f"text length {b} tokens (99th percentile" in caplog.text
    assert f"{record['texts_cut']} of {record['texts']} texts cut" in caplog.text

    # The folder's length is what prediction uses, through every engine, and it is counted there.
    bundle = load_bundle(long)
    assert bundle.config.text_max_length == b
    assert engine_for_bundle(bundle, engine="torch", device="cpu").max_length == b
    assert f"text length {b} tokens" in describe(long)
    model = FuseLabel.from_pretrained(long, feature_engine="torch", num_workers=0)
    test = _captions(5, 5, seed=3) + _captions(3, 300, seed=4)
    p = model.predict_details(captions=test)
    assert p.texts_cut == 3
    assert model.predictor().texts_cut == 3
    model.predict_details(captions=test[-2:])
    assert model.predictor().texts_cut == 5  # the predictor's count runs on over calls


def test_explicit_length_wins_and_too_long_is_refused(tmp_path, session_cache):
    out = _fit(tmp_path, "explicit", _captions(24, 5), session_cache, text_max_length=40)
    assert load_bundle(out).config.text_max_length == 40
    with pytest.raises(ValueError, match="text_max_length=600.*at most 512"):
        _fit(tmp_path, "too-long", _captions(24, 5), session_cache, text_max_length=600)


def test_folder_with_saved_64_predicts_as_before(tmp_path, session_cache):
    """A folder written before the length was chosen from the data holds 64: it keeps it."""
    out = _fit(tmp_path, "old", _captions(24, 5), session_cache)
    config = json.loads((out / "config.json").read_text())
    config["text_max_length"] = 64
    (out / "config.json").write_text(json.dumps(config))
    (out / "sha256.json").unlink(missing_ok=True)  # such folders were written before checksums, too
    bundle = load_bundle(out)
    assert bundle.config.text_max_length == 64
    engine = engine_for_bundle(bundle, engine="torch", device="cpu")
    assert engine.max_length == 64
    long = _captions(2, 100, seed=5)
    cut = engine.text_features(long)
    tok = bundle.tokenizer(long, truncation=True, max_length=64, padding=True, return_tensors="pt")
    import torch

    with torch.inference_mode():
        expected = bundle.net.text_encoder(tok["input_ids"], tok["attention_mask"]).numpy()
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    assert engine.texts_cut == 2


def test_exported_folder_keeps_the_length_and_counts_cut_texts(tmp_path, session_cache):
    from fuselabel.export import export_onnx
    from fuselabel.onnx_folder import load_onnx_predictor

    out = _fit(tmp_path, "export", _captions(22, 38, seed=1) + _captions(2, 200, seed=2), session_cache)
    length = load_bundle(out).config.text_max_length
    manifest = export_onnx(out, tmp_path / "onnx", check_rows=8)
    assert manifest["text_max_length"] == length and manifest["checks"]["rows_identical"] == 1.0
    predictor, engine = load_onnx_predictor(tmp_path / "onnx", workers=1)
    p = predictor.predict(None, _captions(4, 5, seed=3) + _captions(2, length + 20, seed=4))
    assert p.texts_cut == 2 and predictor.texts_cut == 2 and engine.texts_cut == 2
