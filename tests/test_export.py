"""ONNX export of a model folder: the graphs agree with PyTorch, alone and end to end.

A tiny late-fusion model folder (Lite0 at 64 px, a one-layer MiniLM, fp32 weights, image weight
0.3 so the stored fusion weight is exercised) is built once per module; its head's output layer
is scaled up so probabilities spread over (0, 1) and thresholds actually decide something.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import shared_data_or_skip

from fuselabel.bundle import Bundle, load_bundle, save_bundle
from fuselabel.config import Config
from fuselabel.encoders import create_tokenizer, image_data_config
from fuselabel.engines import TorchEngine, engine_for_bundle
from fuselabel.export import HeadGraph, export_head, export_image_encoder, export_onnx
from fuselabel.network import FuseLabelNet
from fuselabel.onnx_folder import load_onnx_predictor
from fuselabel.records import Record, read_records
from fuselabel.runtime import Prediction, Predictor
from fuselabel.sessions import session

FP32_TOL = 1e-4  # max |onnx - torch| of fp32 probabilities
INT8_AGREEMENT = 0.95  # share of label decisions (row x label cells) int8 must keep
NUM_LABELS = 6
LATE_WEIGHT = 0.3
WORDS = [
    "man",
    "woman",
    "dog",
    "cat",
    "bus",
    "train",
    "kite",
    "pizza",
    "street",
    "table",
    "red",
    "blue",
    "small",
    "large",
    "near",
    "on",
    "with",
    "the",
    "a",
]


def _data_config(net, size):
    # The backbone's own preprocessing (the image encoder may wrap it for pooling).
    return image_data_config(getattr(net.image_encoder, "backbone", net.image_encoder), size)


def build_model(out: Path, pretrained: bool = True, logit_scale: float = 8.0, **overrides) -> Path:
    settings = dict(
        kind="late",
        late_weight=LATE_WEIGHT,
        image_model="tf_efficientnet_lite0",
        image_size=64,
        text_config_overrides=dict(num_hidden_layers=1),
        save_dtype="fp32",
    )
    settings.update(overrides)
    cfg = Config(**settings)
    torch.manual_seed(0)
    tokenizer = create_tokenizer(cfg.text_model) if cfg.uses_text else None
    net = FuseLabelNet(
        cfg, NUM_LABELS, pretrained=pretrained, vocab_size=len(tokenizer) if tokenizer is not None else None
    )
    with torch.no_grad():  # spread the probabilities so that thresholds split the rows
        for m in net.head.modules():
            if isinstance(m, torch.nn.Linear) and m.out_features == NUM_LABELS:
                m.weight.mul_(logit_scale)
    data_config = _data_config(net, cfg.image_size) if net.image_encoder is not None else None
    thresholds = [0.35, 0.4, 0.45, 0.5, 0.55, 0.6][:NUM_LABELS]
    bundle = Bundle(
        net=net,
        config=cfg,
        labels=[str(i + 1) for i in range(NUM_LABELS)],
        label_names={},
        thresholds={
            "method": "per_class",
            "thresholds": thresholds,
            "val_mean_f1": 0.0,
            "ensure_nonempty": True,
            "late_weight": LATE_WEIGHT,
        },
        preprocessing=data_config,
        tokenizer=tokenizer,
    )
    save_bundle(out, bundle)
    return out


def synthetic_rows(image_dir: Path, n: int = 12, seed: int = 0, missing: int = 1) -> list[Record]:
    """``n`` rows of random images of assorted sizes and modes with captions of assorted lengths; the last
    ``missing`` rows name images that do not exist (caption-only rows)."""
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"syn{i}.jpg"
        if i < n - missing:
            h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
            base = rng.integers(0, 255, 3)
            pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, "RGB")
            img = img.convert("L") if i == 0 else img
            img.save(image_dir / name, "JPEG", quality=90)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(1, 30))))
        rows.append(Record(image_id=name, caption=caption, labels=None, line=i + 2))
    return rows


def torch_predict(bundle, rows, image_dir, engine: str = "torch", cache_dir=None) -> Prediction:
    """The model folder's own prediction (PyTorch heads; encoders eager, or in onnxruntime with ``engine="onnx"``)."""
    predictor = Predictor(
        engine_for_bundle(bundle, engine=engine, device="cpu", cache_dir=cache_dir),
        bundle.labels,
        bundle.threshold_vector,
        bundle.thresholds["ensure_nonempty"],
        workers=1,
    )
    return predictor.predict([r.image_id for r in rows], [r.caption for r in rows], image_dir=image_dir)


def onnx_predict(onnx_dir, rows, image_dir) -> Prediction:
    """An exported folder's prediction, in onnxruntime alone."""
    predictor, _ = load_onnx_predictor(onnx_dir, workers=1)
    return predictor.predict([r.image_id for r in rows], [r.caption for r in rows], image_dir=image_dir)


@pytest.fixture(scope="module")
def late_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = build_model(root / "model")
    rows = synthetic_rows(root / "images")
    t0 = time.time()
    manifest = export_onnx(model)
    manifest_int8 = export_onnx(model, root / "onnx-int8", int8=True)
    print(f"exports took {time.time() - t0:.1f}s")
    return {
        "model": model,
        "images": root / "images",
        "rows": rows,
        "manifest": manifest,
        "manifest_int8": manifest_int8,
        "int8_dir": root / "onnx-int8",
    }


def test_export_writes_graphs_and_manifest(late_model):
    onnx_dir = late_model["model"] / "onnx"
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert {p.name for p in onnx_dir.iterdir()} == {
        "image_encoder.onnx",
        "text_encoder.onnx",
        "head.onnx",
        "tokenizer",
        "manifest.json",
    }
    assert (onnx_dir / manifest["tokenizer"]).is_file()
    assert manifest["version"] == 2 and manifest["late_weight"] == pytest.approx(LATE_WEIGHT)
    # Late fusion's head graph gives each head's probabilities; fusing them is the runtime's job.
    assert manifest["head"]["inputs"] == ["image_feat", "text_feat"]
    assert manifest["head"]["outputs"] == ["image", "text"]
    assert manifest["int8"] is False and manifest["labels"] == [str(i + 1) for i in range(NUM_LABELS)]
    checks = manifest["checks"]
    assert checks["probabilities"] < FP32_TOL and checks["image"] < FP32_TOL and checks["text"] < FP32_TOL
    assert checks["rows_identical"] == 1.0
    # The folder still loads as a model (the onnx/ folder is extra, not in the way).
    load_bundle(late_model["model"])


def test_onnx_folder_matches_pytorch(late_model):
    model, rows, images = late_model["model"], late_model["rows"], late_model["images"]
    bundle = load_bundle(model)
    ref = torch_predict(bundle, rows, images)
    got = onnx_predict(model / "onnx", rows, images)
    assert got.probs.shape == ref.probs.shape == (len(rows), NUM_LABELS)
    assert np.abs(got.probs - ref.probs).max() < FP32_TOL
    for head in ("image", "text"):
        assert np.abs(got.parts[head] - ref.parts[head]).max() < FP32_TOL, head
    assert (got.predicted == ref.predicted).all()
    # the thresholds split the rows: some labels on, some off
    assert 0.1 < ref.predicted.mean() < 0.9
    # rows with both inputs use the stored image weight
    weighted = LATE_WEIGHT * ref.parts["image"][0] + (1 - LATE_WEIGHT) * ref.parts["text"][0]
    np.testing.assert_allclose(ref.probs[0], weighted, atol=1e-6)
    # the caption-only row is judged by the text head alone, in both paths
    assert ref.status[-1] == got.status[-1] == "caption_only" and ref.status[:-1] == ["ok"] * (len(rows) - 1)
    np.testing.assert_allclose(ref.probs[-1], ref.parts["text"][-1], atol=1e-6)
    np.testing.assert_allclose(got.probs[-1], got.parts["text"][-1], atol=1e-6)
    assert not np.allclose(ref.probs[-1], ref.probs[0])


def test_predict_engine_onnx_uses_onnx_text_encoder(late_model, tmp_path):
    model, rows, images = late_model["model"], late_model["rows"], late_model["images"]
    bundle = load_bundle(model)
    ref = torch_predict(bundle, rows, images, engine="torch")
    got = torch_predict(bundle, rows, images, engine="onnx", cache_dir=tmp_path)
    assert np.abs(got.probs - ref.probs).max() < FP32_TOL
    assert (got.predicted == ref.predicted).all()
    again = torch_predict(bundle, rows, images, engine="onnx", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.probs, got.probs)
    assert len(list((tmp_path / "onnx").glob("text-*.onnx"))) == 1, "the text encoder is exported once into the cache"
    assert len(list((tmp_path / "onnx").glob("image-*.onnx"))) == 1


def test_graphs_take_any_batch_and_length(late_model):
    onnx_dir = late_model["model"] / "onnx"
    bundle = load_bundle(late_model["model"])
    net = bundle.net
    text = session(onnx_dir / "text_encoder.onnx")
    for batch, length in ((1, 2), (3, 64), (5, 17)):
        ids = torch.randint(1000, 2000, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2 + 1 :] = 0
        with torch.no_grad():
            ref = net.text_encoder(ids, mask).numpy()
        got = text.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - ref).max() < FP32_TOL, (batch, length)
    image = session(onnx_dir / "image_encoder.onnx")
    for batch in (1, 7):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = net.image_encoder(x).numpy()
        assert np.abs(image.run(None, {"pixels": x.numpy()})[0] - ref).max() < 1e-3


def test_int8_export_is_smaller_and_agrees(late_model):
    m8, m32 = late_model["manifest_int8"], late_model["manifest"]
    files8 = m8["files"]
    assert m8["int8"] is True and files8["image_encoder"]["quantized"] is None
    assert files8["text_encoder"]["quantized"] and files8["head"]["quantized"]
    assert files8["text_encoder"]["bytes"] < 0.4 * m32["files"]["text_encoder"]["bytes"]
    model, images = late_model["model"], late_model["images"] / "int8"
    rows = synthetic_rows(images, n=48, seed=1, missing=0)  # enough cells (288) for a stable share
    bundle = load_bundle(model)
    ref = torch_predict(bundle, rows, images)
    got = onnx_predict(late_model["int8_dir"], rows, images)
    agreement = (got.predicted == ref.predicted).mean()
    print(f"int8: max |p - p_torch| {np.abs(got.probs - ref.probs).max():.4f}, label agreement {agreement:.3f}")
    assert agreement >= INT8_AGREEMENT


def test_cli_export(late_model, tmp_path, capsys):
    from fuselabel.cli import main

    assert (
        main(
            ["export", str(late_model["model"]), "--format", "onnx", "--out", str(tmp_path / "o"), "--check-rows", "4"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "text_encoder.onnx" in out and "MB" in out and "max |onnx - torch|" in out
    assert (tmp_path / "o" / "head.onnx").exists()
    assert main(["export", str(tmp_path / "nowhere"), "--format", "onnx"]) == 2


HEAD_VARIANTS = [
    dict(kind="late", late_combine="union"),
    dict(kind="early"),
    dict(kind="image"),
    dict(kind="text"),
    dict(kind="early", decoder="query"),
    dict(kind="early", decoder="lstm"),
]


@pytest.mark.parametrize("variant", HEAD_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_head_graph_matches_pytorch(variant, tmp_path):
    tiny_text = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    cfg = Config(
        image_model="tf_efficientnet_lite0",
        image_pretrained=False,
        text_pretrained=False,
        text_config_overrides=tiny_text,
        hidden_dim=32,
        late_weight=0.7,
        **variant,
    )
    torch.manual_seed(0)
    net = FuseLabelNet(cfg, NUM_LABELS, pretrained=False).eval()
    path = export_head(net, tmp_path / "head.onnx")
    graph = HeadGraph(net).eval()
    n = 9
    feeds = {}
    if cfg.uses_image:
        feeds["image_feat"] = torch.randn(n, net.image_encoder.num_features)
    if cfg.uses_text:
        feeds["text_feat"] = torch.randn(n, net.text_encoder.num_features)
    if "image_present" in graph.names:
        feeds["image_present"] = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    if "caption_present" in graph.names:
        feeds["caption_present"] = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.float32)
    assert graph.outputs == (["image", "text"] if cfg.kind == "late" else [cfg.kind])
    with torch.no_grad():
        ref = dict(zip(graph.outputs, (t.numpy() for t in graph(*[feeds[k] for k in graph.names]))))
    # the graph is exactly the PyTorch engine's head step
    engine = TorchEngine(net, None, None, encoders="torch", device="cpu")
    eager = engine.heads({k: v.numpy() for k, v in feeds.items()})
    assert sorted(eager) == sorted(ref)
    for k in ref:
        assert ref[k].shape == (n, NUM_LABELS) and np.allclose(ref[k], eager[k]), k
    sess = session(path)
    outs = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
    assert [o.name for o in sess.get_outputs()] == graph.outputs
    for k, got in zip(graph.outputs, outs):
        assert np.abs(got - ref[k]).max() < FP32_TOL, k


IMAGE_VARIANTS = [{}, dict(image_pool="avgmax"), dict(image_layers=2)]


@pytest.mark.parametrize("variant", IMAGE_VARIANTS, ids=lambda v: "-".join(map(str, v.values())) or "default")
def test_image_encoder_graph_matches_pytorch(variant, tmp_path):
    cfg = Config(kind="image", image_model="tf_efficientnet_lite0", image_pretrained=False, **variant)
    net = FuseLabelNet(cfg, NUM_LABELS, pretrained=False).eval()
    path = export_image_encoder(net.image_encoder, tmp_path / "image.onnx", (3, 48, 48))
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        ref = net.image_encoder(x).numpy()
    assert np.abs(session(path).run(None, {"pixels": x.numpy()})[0] - ref).max() < 1e-3


def test_real_rows_same_label_sets(late_model):
    real = shared_data_or_skip("ONNX against PyTorch on real rows")
    rows = read_records(real / "train.csv").records[:64]
    images = real / "data"
    model = late_model["model"]
    bundle = load_bundle(model)
    ref = torch_predict(bundle, rows, images)
    got = onnx_predict(model / "onnx", rows, images)
    assert ref.status == got.status == ["ok"] * len(rows)
    assert np.abs(got.probs - ref.probs).max() < FP32_TOL
    assert (got.predicted == ref.predicted).all(1).all()
    got8 = onnx_predict(late_model["int8_dir"], rows, images)
    agreement = (got8.predicted == ref.predicted).mean()
    print(f"real rows: fp32 max diff {np.abs(got.probs - ref.probs).max():.2e}; int8 label agreement {agreement:.3f}")
    assert agreement >= INT8_AGREEMENT
    assert ref.predicted.any(1).all()  # ensure_nonempty: every row gets at least its most likely label


@pytest.mark.parametrize("name", ["minilm-l6", "albert-base-v2", "bert-base-uncased"])
def test_text_encoder_graph_matches_pytorch(name, tmp_path):
    """The TorchScript exporter (dynamo=False, opset 17) handles the BERT family and ALBERT under transformers 5."""
    from fuselabel.encoders import create_text_encoder
    from fuselabel.export import export_text_encoder

    tiny = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    encoder = create_text_encoder(name, pretrained=False, overrides=tiny).eval()
    tokenizer = create_tokenizer("minilm-l6")
    path = export_text_encoder(encoder, tokenizer, tmp_path / "text.onnx")
    sess = session(path)
    for batch, length in ((1, 3), (4, 40)):
        ids = torch.randint(1000, 2000, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, 2:] = 0
        with torch.no_grad():
            ref = encoder(ids, mask).numpy()
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - ref).max() < FP32_TOL, (name, batch, length)
