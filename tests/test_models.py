"""Networks, training steps, late-fusion probabilities, the model folder and the encoder loaders.

Every model here is real (packaged EfficientNet-Lite0 and MiniLM weights, or random-init seed
architectures) but tiny: 64 px images, a one-layer text encoder, 32-unit heads, a handful of rows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import RepeatBatch
from torch.utils.data import DataLoader

from fuselabel import Config, FuseLabel
from fuselabel.bundle import Bundle, BundleError, describe, load_bundle, save_bundle
from fuselabel.data import FeatureDataset, PairDataset, TextCollate, build_transform
from fuselabel.encoders import (
    EncoderError,
    _remap_by_order,
    create_image_encoder,
    create_text_encoder,
    create_tokenizer,
    image_data_config,
    packaged_weights_path,
)
from fuselabel.engines import engine_for_bundle
from fuselabel.features import frozen_features
from fuselabel.labels import label_vocabulary, labels_to_matrix
from fuselabel.module import FuseLabelModule
from fuselabel.network import FuseLabelNet, combine_probabilities
from fuselabel.predict import predict_csv
from fuselabel.records import read_records
from fuselabel.runtime import Prediction, Predictor

# Optimizer steps on one fixed batch: the frozen regime only trains a head (cheap); the fine-tuning
# regime back-propagates through the encoders, so it gets fewer steps.
TRAIN_STEPS = {"frozen": 30, "finetune": 20}
BATCH_ROWS = 8


def tiny_config(cache_dir, **changes) -> Config:
    """The smallest real configuration: packaged Lite0 at 64 px, one MiniLM layer, a 32-unit head."""
    values = dict(
        image_model="tf_efficientnet_lite0",
        image_size=64,
        text_config_overrides=dict(num_hidden_layers=1),
        hidden_dim=32,
        dropout=0.0,
        lr=3e-3,
        batch_size=BATCH_ROWS,
        num_workers=0,
        accelerator="cpu",
        cache_dir=str(cache_dir),
        text_max_length=32,
    )
    values.update(changes)
    return Config(**values)


@pytest.fixture(scope="module")
def tokenizer():
    return create_tokenizer("minilm-l6")


@pytest.fixture(scope="module")
def tiny(tiny_dataset_session):
    """(image_dir, records, vocab, label matrix) of the session's tiny data set."""
    image_dir, csv = tiny_dataset_session
    records = read_records(csv)
    vocab = label_vocabulary(records.label_sets)
    return image_dir, records.records, vocab, labels_to_matrix(records.label_sets, vocab).astype(np.float32)


class _LossLog(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fixed_batch(net, config, regime, tokenizer, tiny) -> dict:
    image_dir, records, _, labels = tiny
    rows = records[:BATCH_ROWS]
    data_config = image_data_config(net.image_encoder, config.image_size) if net.image_encoder is not None else None
    if regime == "frozen":
        # Features from the frozen encoders through the on-disk cache, as training uses them.
        feats, present = frozen_features(
            net, tokenizer, data_config, rows, image_dir, config, device="cpu", progress=False
        )
        ds = FeatureDataset(feats, labels[:BATCH_ROWS], present)
        return next(iter(DataLoader(ds, batch_size=BATCH_ROWS)))
    transform = build_transform(data_config, train=False) if data_config else None
    ds = PairDataset(rows, image_dir, transform, labels[:BATCH_ROWS], load_images=data_config is not None)
    collate = TextCollate(tokenizer if net.text_encoder is not None else None, config.text_max_length)
    return collate([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize(
    "regime,kind,combine",
    [
        ("frozen", "image", "weighted"),
        ("frozen", "text", "weighted"),
        ("frozen", "early", "weighted"),
        ("frozen", "late", "weighted"),
        ("frozen", "late", "union"),
        ("finetune", "image", "weighted"),
        ("finetune", "text", "weighted"),
        ("finetune", "early", "weighted"),
        ("finetune", "late", "union"),
    ],
)
def test_training_steps_reduce_loss(regime, kind, combine, tokenizer, tiny, session_cache):
    L.seed_everything(0, verbose=False)
    config = tiny_config(session_cache, kind=kind, late_combine=combine, regime=regime)
    net = FuseLabelNet(config, num_labels=len(tiny[2]))
    batch = _fixed_batch(net, config, regime, tokenizer, tiny)
    if regime == "frozen":
        assert not any(k in batch for k in ("pixels", "input_ids")), "frozen batches carry features only"
    else:
        assert ("pixels" in batch) == config.uses_image and ("input_ids" in batch) == config.uses_text

    module = FuseLabelModule(net, config)
    module.set_frozen(regime == "frozen")
    encoders = [e for e in (net.image_encoder, net.text_encoder) if e is not None]
    before = {id(e): [p.detach().clone() for p in e.parameters()][:3] for e in encoders}

    steps = TRAIN_STEPS[regime]
    log = _LossLog()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[log],
    )
    trainer.fit(module, DataLoader(RepeatBatch(batch, steps), batch_size=None))

    assert len(log.losses) == steps
    assert np.isfinite(log.losses).all()
    assert log.losses[-1] < 0.7 * log.losses[0], log.losses
    for enc in encoders:
        moved = any(not torch.equal(a, b.detach()) for a, b in zip(before[id(enc)], list(enc.parameters())[:3]))
        assert moved == (regime == "finetune"), f"{type(enc).__name__} trained={moved} in the {regime} regime"


# ---------------------------------------------------------------------------------------------------------------
# The course seed's pairing (EfficientNet-B3 + ALBERT) builds from configs alone, offline


def test_seed_pairing_trains_and_predicts_offline(tiny_dataset, tmp_path):
    from fuselabel.train import fit

    image_dir, csv = tiny_dataset
    config = Config(
        image_model="efficientnet_b3",
        text_model="albert-base-v2",
        image_pretrained=False,
        text_pretrained=False,
        text_config_overrides=dict(
            num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128, embedding_size=32
        ),
        image_size=64,
        regime="finetune",
        kind="late",
        late_combine="union",
        epochs=1,
        max_steps=2,
        batch_size=16,
        num_workers=0,
        accelerator="cpu",
        cache_dir=str(tmp_path / "cache"),
        text_max_length=32,
    )
    out = tmp_path / "seed-model"
    result = fit(config, image_dir, csv, out, work_dir=tmp_path / "work", progress=False)
    assert result is not None and (out / "model.safetensors").exists()
    assert (out / "text" / "config.json").exists()
    saved = load_bundle(out)
    assert type(saved.net.text_encoder.backbone).__name__ == "AlbertModel"
    assert saved.net.text_encoder.num_features == 64

    sub = tmp_path / "submission.csv"
    info = predict_csv(
        FuseLabel.from_pretrained(out, feature_engine="torch", num_workers=0), image_dir, csv, sub, progress=False
    )
    ids = [r.image_id for r in read_records(csv).records]
    lines = sub.read_text().splitlines()
    assert lines[0] == "ImageID,Labels"
    assert [line.split(",")[0] for line in lines[1:]] == ids
    assert info["rows"] == len(ids)
    vocab = set(saved.labels)
    for line in lines[1:]:
        labels = line.split(",", 1)[1].split()
        assert labels and set(labels) <= vocab  # ensure_nonempty: every row gets at least one label


# ---------------------------------------------------------------------------------------------------------------
# Probabilities: the two late-fusion rules and caption-only rows


@pytest.fixture(scope="module")
def late_net(session_cache):
    """A late-fusion network with random-init encoders (only its probability rules are under test)."""
    config = tiny_config(
        session_cache,
        kind="late",
        image_pretrained=False,
        text_pretrained=False,
        text_config_overrides=dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    )
    return FuseLabelNet(config, num_labels=5).eval()


def _logits(seed=0, rows=6, labels=5):
    g = torch.Generator().manual_seed(seed)
    return {"image": 3 * torch.randn(rows, labels, generator=g), "text": 3 * torch.randn(rows, labels, generator=g)}


def test_union_is_elementwise_max(late_net):
    late_net.config = late_net.config.replace(late_combine="union")
    logits = _logits()
    expected = torch.maximum(torch.sigmoid(logits["image"]), torch.sigmoid(logits["text"]))
    torch.testing.assert_close(late_net.probabilities(logits), expected)


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_weighted_is_convex_combination(late_net, weight):
    late_net.config = late_net.config.replace(late_combine="weighted")
    late_net.late_weight.fill_(weight)
    logits = _logits(1)
    p_img, p_txt = torch.sigmoid(logits["image"]), torch.sigmoid(logits["text"])
    torch.testing.assert_close(late_net.probabilities(logits), weight * p_img + (1 - weight) * p_txt)


@pytest.mark.parametrize("combine", ["weighted", "union"])
def test_caption_only_rows_get_text_probabilities(late_net, combine):
    late_net.config = late_net.config.replace(late_combine=combine)
    late_net.late_weight.fill_(0.7)
    logits = _logits(2)
    present = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    fused = late_net.probabilities(logits, present)
    no_image = combine_probabilities({k: torch.sigmoid(v) for k, v in logits.items()}, combine, 0.7)
    p_txt = torch.sigmoid(logits["text"])
    torch.testing.assert_close(fused[present == 0], p_txt[present == 0])
    torch.testing.assert_close(fused[present == 1], no_image[present == 1])


def test_single_head_probabilities_are_its_sigmoid():
    x = torch.randn(4, 3)
    torch.testing.assert_close(combine_probabilities({"text": torch.sigmoid(x)}, "union", 0.2), torch.sigmoid(x))


def test_early_fusion_ignores_pixels_of_caption_only_rows(session_cache):
    config = tiny_config(
        session_cache,
        kind="early",
        image_pretrained=False,
        text_pretrained=False,
        text_config_overrides=dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    )
    net = FuseLabelNet(config, num_labels=3).eval()
    dim_i, dim_t = net.image_encoder.num_features, net.text_encoder.num_features
    text = torch.randn(2, dim_t)
    present = torch.tensor([0.0, 0.0])
    with torch.no_grad():
        a = net({"image_feat": torch.randn(2, dim_i), "text_feat": text, "image_present": present})["early"]
        b = net({"image_feat": torch.randn(2, dim_i), "text_feat": text, "image_present": present})["early"]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# The model folder


@pytest.fixture(scope="module")
def trained_late(tiny, tokenizer, session_cache):
    """A late (weighted) network with packaged weights and a head nudged away from its init, plus its data config."""
    torch.manual_seed(0)
    config = tiny_config(session_cache, kind="late", late_weight=0.3, save_dtype="fp32")
    net = FuseLabelNet(config, num_labels=len(tiny[2])).eval()
    with torch.no_grad():
        for p in net.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net, image_data_config(net.image_encoder, config.image_size)


def _bundle(net, data_config, tokenizer, vocab, config=None) -> Bundle:
    thresholds = {"method": "global", "thresholds": [0.4] * len(vocab), "val_mean_f1": 0.5, "ensure_nonempty": True}
    return Bundle(
        net=net,
        config=config or net.config,
        labels=list(vocab),
        label_names={v: f"name{v}" for v in vocab},
        thresholds=thresholds,
        preprocessing=data_config,
        tokenizer=tokenizer,
        extra={"metrics.json": {"validation": {"mean_f1": 0.5, "micro_f1": 0.5, "macro_f1": 0.4, "rows": 5}}},
    )


def _predict(bundle, rows, image_dir) -> Prediction:
    """Eager PyTorch prediction by a model folder's contents (loaded or still in memory)."""
    predictor = Predictor(
        engine_for_bundle(bundle, engine="torch", device="cpu"),
        bundle.labels,
        bundle.threshold_vector,
        bundle.thresholds["ensure_nonempty"],
        workers=1,
    )
    return predictor.predict([r.image_id for r in rows], [r.caption for r in rows], image_dir=image_dir)


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-5), ("fp16", 1e-2)])
def test_bundle_round_trip(dtype, atol, trained_late, tiny, tokenizer, tmp_path):
    net, data_config = trained_late
    image_dir, records, vocab, _ = tiny
    config = net.config.replace(save_dtype=dtype)
    bundle = _bundle(net, data_config, tokenizer, vocab, config)
    out = tmp_path / f"model-{dtype}"
    size = save_bundle(out, bundle)
    for name in (
        "config.json",
        "labels.json",
        "thresholds.json",
        "preprocessing.json",
        "model.safetensors",
        "metrics.json",
        "text/config.json",
    ):
        assert (out / name).exists(), name
    assert size == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())

    loaded = load_bundle(out)
    assert loaded.labels == list(vocab)
    # The folder keeps what the model is and how it was trained; where it runs is the loader's business.
    assert loaded.config.replace(**config.to_dict("runtime")) == config
    assert float(loaded.net.late_weight) == pytest.approx(0.3, abs=1e-6 if dtype == "fp32" else 1e-3)
    np.testing.assert_array_equal(loaded.threshold_vector, bundle.threshold_vector)
    rows = records[:10]
    mine = _predict(bundle, rows, image_dir).probs
    theirs = _predict(loaded, rows, image_dir).probs
    assert mine.shape == (10, len(vocab)) and not np.isnan(mine).any()
    np.testing.assert_allclose(theirs, mine, atol=atol, rtol=0)
    if dtype == "fp16":
        # Half the bytes of fp32 for the weights (what the size budget is about).
        fp32 = sum(t.numel() * t.element_size() for t in net.state_dict().values())
        assert (out / "model.safetensors").stat().st_size < 0.6 * fp32


def test_bundle_caption_only_prediction_uses_text_head(trained_late, tiny, tokenizer, tmp_path):
    import shutil

    net, data_config = trained_late
    image_dir, records, vocab, _ = tiny
    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    (images / records[1].image_id).unlink()
    bundle = _bundle(net, data_config, tokenizer, vocab)
    rows = records[:4]
    p = _predict(bundle, rows, images)
    assert p.status == ["ok", "caption_only", "ok", "ok"]
    probs = p.probs
    # The caption-only row must equal the text head alone on that caption.
    feats = tokenizer(
        [rows[1].caption], padding=True, truncation=True, max_length=net.config.text_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        p_txt = torch.sigmoid(
            net.head(
                {
                    "image": torch.zeros(1, net.image_encoder.num_features),
                    "text": net.text_encoder(feats["input_ids"], feats["attention_mask"]),
                }
            )["text"]
        )
    np.testing.assert_allclose(probs[1], p_txt[0].numpy(), atol=1e-5)
    assert not np.allclose(probs[0], probs[1])


def test_bundle_over_budget_leaves_existing_folder(trained_late, tiny, tokenizer, tmp_path):
    net, data_config = trained_late
    vocab = tiny[2]
    out = tmp_path / "model"
    save_bundle(out, _bundle(net, data_config, tokenizer, vocab, net.config.replace(save_dtype="fp16")))
    before = _tree_digest(out)

    small = net.config.replace(save_dtype="fp32", max_size_mb=0.5)
    with pytest.raises(BundleError, match=r"over the budget of 0\.5 MB"):
        save_bundle(out, _bundle(net, data_config, tokenizer, vocab, small))
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no half-written folder left beside it"

    fresh = tmp_path / "never-written"
    with pytest.raises(BundleError):
        save_bundle(fresh, _bundle(net, data_config, tokenizer, vocab, small))
    assert not fresh.exists()


def test_describe_lists_parts(trained_late, tiny, tokenizer, tmp_path):
    net, data_config = trained_late
    out = tmp_path / "model"
    save_bundle(out, _bundle(net, data_config, tokenizer, tiny[2]))
    text = describe(out)
    for part in (
        "model.safetensors",
        "config.json",
        "labels.json",
        "thresholds.json",
        "text/",
        "parameters:",
        "image_encoder",
        "text_encoder",
        "head",
        "kind late (weighted)",
        "tf_efficientnet_lite0",
        "validation mean F1 0.5000",
    ):
        assert part in text, f"{part!r} missing from:\n{text}"
    with pytest.raises(BundleError, match="not a fuselabel model folder"):
        describe(tmp_path)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_weights_of_the_wrong_shape_name_the_tensor(trained_late, tiny, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    net, data_config = trained_late
    out = tmp_path / "model"
    save_bundle(out, _bundle(net, data_config, tokenizer, tiny[2]))
    state = load_file(str(out / "model.safetensors"))
    name = next(k for k, t in state.items() if k.startswith("head.") and t.ndim == 2)
    state[name] = state[name][:, :-1].contiguous()  # one input column short
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(BundleError) as err:
        load_bundle(out)
    message = str(err.value)
    assert name in message and str(tuple(state[name].shape)) in message and "model.safetensors" in message


def test_hybrid_regime_trains_the_text_encoder_only(tiny_dataset, tmp_path):
    from fuselabel.train import fit

    image_dir, csv = tiny_dataset
    config = tiny_config(
        tmp_path / "cache", kind="late", regime="hybrid", epochs=2, batch_size=16, save_dtype="fp32", word_dropout=0.1
    )
    result = fit(config, image_dir, csv, tmp_path / "model", progress=False)
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["regime"] == "hybrid"
    assert result.report["rows"] == len(result.val_labels) > 0
    trained = load_bundle(tmp_path / "model").net
    start = FuseLabelNet(config, num_labels=len(result.thresholds["thresholds"]))
    text_moved = max(
        (a - b).abs().max().item()
        for a, b in zip(trained.text_encoder.state_dict().values(), start.text_encoder.state_dict().values())
    )
    image_moved = max(
        (a - b).abs().max().item()
        for a, b in zip(trained.image_encoder.state_dict().values(), start.image_encoder.state_dict().values())
    )
    assert text_moved > 1e-4, "the text encoder fine-tunes in the hybrid regime"
    assert image_moved == 0.0, "the image encoder stays as packaged (its features are cached)"


# ---------------------------------------------------------------------------------------------------------------
# Encoders


def _packaged_state(name: str) -> dict:
    return torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True)


def test_packaged_lite0_loads_trained_weights():
    torch.manual_seed(0)
    pretrained = create_image_encoder("tf_efficientnet_lite0", pretrained=True)
    random = create_image_encoder("tf_efficientnet_lite0", pretrained=False)
    assert pretrained.num_features == random.num_features == 1280
    a, b = pretrained.state_dict(), random.state_dict()
    assert a.keys() == b.keys()
    stem = next(k for k in a if k.endswith("weight") and a[k].ndim == 4)
    assert not torch.equal(a[stem], b[stem])
    # Trained BatchNorm statistics, not the init's zeros and ones.
    var = next(k for k in a if k.endswith("running_var"))
    assert not torch.allclose(a[var], torch.ones_like(a[var]))
    # The packaged file's first tensor is the stem convolution, loaded as is.
    first = next(iter(_packaged_state("tf_efficientnet_lite0").values()))
    torch.testing.assert_close(a[stem], first)


def test_remap_by_order_rejects_mismatches():
    model = create_image_encoder("tf_efficientnet_lite0", pretrained=False)
    source = _packaged_state("tf_efficientnet_lite0")
    assert set(_remap_by_order(source, model)) == {k for k in model.state_dict() if "num_batches_tracked" not in k}

    bad_shape = dict(source)
    key = next(k for k, v in bad_shape.items() if v.ndim == 4)
    bad_shape[key] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(EncoderError, match="does not fit"):
        _remap_by_order(bad_shape, model)

    too_few = dict(list(source.items())[:-5])
    with pytest.raises(EncoderError, match="tensors"):
        _remap_by_order(too_few, model)

    with pytest.raises(EncoderError):  # Lite2 weights on a Lite0 body: more blocks, wider layers
        _remap_by_order(_packaged_state("tf_efficientnet_lite2"), model)


def test_local_image_weights_file(tmp_path):
    source = create_image_encoder("tf_efficientnet_lite0", pretrained=True)
    path = tmp_path / "lite0.pt"
    torch.save(source.state_dict(), path)
    loaded = create_image_encoder("tf_efficientnet_lite0", pretrained=True, weights=str(path))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)

    torch.save({"state_dict": {"nothing": torch.zeros(1)}}, tmp_path / "empty.pt")
    with pytest.raises(EncoderError, match="missing"):
        create_image_encoder("tf_efficientnet_lite0", pretrained=True, weights=str(tmp_path / "empty.pt"))


def test_unknown_image_model():
    with pytest.raises(EncoderError, match="unknown image model 'efficientnet_b99'"):
        create_image_encoder("efficientnet_b99", pretrained=False)


def test_unpackaged_pretrained_image_weights_fail_fast_offline():
    # conftest puts Hugging Face in offline mode before it is imported (setting the variable now would be too
    # late); without it the hub lookup is retried for about 50 s before the same error.
    with pytest.raises(EncoderError) as err:
        create_image_encoder("efficientnet_b3", pretrained=True)
    message = str(err.value)
    assert "efficientnet_b3" in message
    for hint in ("image_weights", "tf_efficientnet_lite0", "image_pretrained=false"):
        assert hint in message
    # The architecture itself needs no download.
    assert create_image_encoder("efficientnet_b3", pretrained=False).num_features == 1536


def test_text_encoders_offline():
    packaged = create_text_encoder("minilm-l6", pretrained=True, overrides=dict(num_hidden_layers=1))
    random = create_text_encoder("minilm-l6", pretrained=False, overrides=dict(num_hidden_layers=1))
    assert packaged.num_features == 384
    emb = "embeddings.word_embeddings.weight"
    assert not torch.equal(packaged.backbone.state_dict()[emb], random.backbone.state_dict()[emb])
    assert len(packaged.backbone.encoder.layer) == 1

    with pytest.raises(EncoderError, match="text_pretrained=false"):
        create_text_encoder("albert-base-v2", pretrained=True)
    with pytest.raises(EncoderError):
        create_text_encoder("no-such-org/no-such-model", pretrained=False)
    tiny_albert = create_text_encoder(
        "albert-base-v2",
        pretrained=False,
        overrides=dict(
            num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128, embedding_size=32
        ),
        vocab_size=30522,
    )
    assert tiny_albert.num_features == 64 and tiny_albert.backbone.config.vocab_size == 30522

    # Mean pooling respects the attention mask: padding does not change a sentence's vector.
    tok = create_tokenizer("minilm-l6")
    short = tok(["a red car"], return_tensors="pt")
    padded = tok(
        ["a red car", "a much longer caption about a red car parked near a tree"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        a = packaged(short["input_ids"], short["attention_mask"])[0]
        b = packaged(padded["input_ids"], padded["attention_mask"])[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
