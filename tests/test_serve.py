"""``fuselabel serve``: every endpoint, every client error, explanations, concurrency and a graceful stop.

One tiny model is trained per module (as in tests/test_cli.py); the endpoints are driven through
FastAPI's TestClient, concurrency through a real uvicorn server in a thread, and the SIGTERM case
through ``fuselabel serve`` in a subprocess.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from test_cli import TINY_TRAIN

from fuselabel.bundle import folder_size
from fuselabel.cli import main
from fuselabel.config import ServeSettings
from fuselabel.estimator import FuseLabel
from fuselabel.explain import explain
from fuselabel.explanation import to_photo_frame
from fuselabel.serve import create_app
from fuselabel.serve.inputs import require_input
from fuselabel.serve.schemas import MAX_CAPTION_CHARS
from fuselabel.serve.server import PROTOCOL
from fuselabel.serve.telemetry import REQUEST_ID, JsonFormatter, RequestIdFilter

CAPTION = "a photo of a dog and a car next to a kite"


def train_tiny_model(root: Path, cache_dir: str) -> tuple[Path, Path]:
    """(image folder, model folder) of a tiny late-fusion model trained in seconds."""
    image_dir, csv = make_tiny_dataset(root)
    model = root / "model"
    code = main(
        [
            "train",
            "--data",
            str(image_dir),
            "--csv",
            str(csv),
            "--out",
            str(model),
            "--cache-dir",
            cache_dir,
            *TINY_TRAIN,
        ]
    )
    assert code == 0
    return image_dir, model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_process(model, tmp_path, *args, tries: int = 600):
    """``fuselabel serve MODEL`` in its own process on a free port, answering /health: (process, url). Its output
    goes to ``tmp_path/serve.log``; a process still running at the end is killed."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuselabel.cli", "serve", str(model), "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(tries):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def serving(app, header_timeout: float = 10, **config):
    """``app`` on a real uvicorn server on a free loopback port, in a thread, with the HTTP protocol and
    connection limits ``fuselabel serve`` uses (``config``: more uvicorn settings); yields its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", http=PROTOCOL, **config)
    config.header_timeout = header_timeout
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_cache):
    return train_tiny_model(tmp_path_factory.mktemp("serve"), session_cache)


@pytest.fixture(scope="module")
def client(trained):
    return TestClient(create_app(trained[1]))


@pytest.fixture(scope="module")
def strict_client(trained):
    """Small limits, to reach them cheaply: 0.05 MB a request, 2 items a batch, 1 megapixel a photo."""
    return TestClient(create_app(trained[1], ServeSettings(max_upload_mb=0.05, max_batch=2, max_megapixels=1)))


@pytest.fixture(scope="module")
def estimator(trained):
    return FuseLabel.from_pretrained(trained[1])


def _photo(trained, i: int = 5) -> bytes:
    return (trained[0] / f"{i}.jpg").read_bytes()


def _png(size=(64, 40), colour=(40, 200, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _post(client, path="/predict", photo: bytes | None = None, **fields):
    files = {"image": ("photo.jpg", photo, "image/jpeg")} if photo is not None else None
    return client.post(path, files=files, data=fields)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- reading endpoints


def test_health_labels_info(client, trained):
    _, model = trained
    health = client.get("/health").json()
    assert health["status"] == "ok"
    name, digest = health["model"].split("@")
    assert name == model.name and len(digest) == 12

    labels = client.get("/labels").json()["labels"]
    stored = json.loads((model / "thresholds.json").read_text())["thresholds"]
    assert [lab["id"] for lab in labels] == [1, 2, 3, 4]  # integer-literal tokens come back as ints
    np.testing.assert_allclose([lab["threshold"] for lab in labels], stored, rtol=1e-6)

    response = client.get("/info")
    info = response.json()
    assert info["size_bytes"] == folder_size(model)
    validation = json.loads((model / "metrics.json").read_text())["validation"]
    assert info["validation"]["mean_f1"] == pytest.approx(validation["mean_f1"])
    assert info["settings"]["model"]["kind"] == "late" and info["settings"]["model"]["image_size"] == 64
    assert info["limits"] == {
        "max_upload_mb": 10,
        "max_batch": 32,
        "max_caption_chars": MAX_CAPTION_CHARS,
        "max_megapixels": 25,
        "decode_workers": 2,
        "max_concurrency": 4,
        "max_queue": 32,
        "queue_timeout_s": 30,
        "body_timeout_s": 60,
    }
    assert info["fusion"]["kind"] == "late" and "photo head" in info["fusion"]["rule"]
    # Nothing about the server's file system leaks: not the model's path, nor any other.
    assert str(model.parent) not in response.text


def test_page_docs_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="predict-button"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200, asset
    # The docs page loads its scripts and styles from the service itself: it works offline. ReDoc, which would
    # fetch its logo and fonts from the internet, is not served.
    html = client.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
    assert assets and all(a.startswith("/") for a in assets), assets
    assert all(client.get(a).status_code == 200 for a in assets), assets
    assert client.get("/redoc").status_code == 404
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/predict", "/predict/batch", "/explain", "/labels", "/health", "/info", "/metrics"} <= set(paths)
    for path in ("/predict", "/predict/batch", "/explain"):
        answers = paths[path]["post"]["responses"]
        assert {"200", "400", "408", "413", "415", "422", "503"} <= set(answers), path
        assert "401" not in answers, path  # no key set: none asked for
        assert answers["200"]["content"]["application/json"]["schema"] != {}, path
        assert "Retry-After" in answers["503"]["headers"]
    for path in ("/health", "/labels", "/info"):
        assert "$ref" in paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"], path
    form = spec["components"]["schemas"]["Body_explain_label_explain_post"]["properties"]["label"]
    assert form["enum"] == ["1", "2", "3", "4"]
    assert spec["components"]["schemas"]["BatchItem"]["examples"]


def test_metrics_scrape(client, trained):
    from prometheus_client.parser import text_string_to_metric_families

    assert _post(client, photo=_photo(trained), caption=CAPTION).status_code == 200
    assert _post(client, caption=CAPTION).status_code == 200
    assert _post(client, caption="").status_code == 422
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    assert value("fuselabel_requests_total", route="/predict", method="POST", status="200") >= 2
    assert value("fuselabel_requests_total", route="/predict", method="POST", status="422") >= 1
    assert value("fuselabel_request_duration_seconds_count", route="/predict") >= 3
    assert value("fuselabel_rows_predicted_total", inputs="caption") >= 1
    assert value("fuselabel_rows_predicted_total", inputs="photo+caption") >= 1
    assert value("fuselabel_photos_decoded_total") >= 1
    assert value("fuselabel_model_load_seconds") > 0
    assert ("fuselabel_requests_in_progress", ()) in samples and ("fuselabel_requests_waiting", ()) in samples


def test_request_ids(client):
    given = client.get("/health", headers={"X-Request-ID": "order-42.a"})
    assert given.headers["x-request-id"] == "order-42.a"
    made = [client.get("/health").headers["x-request-id"] for _ in range(2)]
    assert made[0] != made[1] and all(re.fullmatch(r"[0-9a-f]{32}", m) for m in made)
    # A header that could forge log lines is replaced, not echoed.
    assert client.get("/health", headers={"X-Request-ID": "a b\tc"}).headers["x-request-id"] != "a b\tc"
    assert "x-request-id" in _post(client, caption="").headers  # client errors carry one too


def test_an_unexpected_error_is_a_500_with_the_request_id(trained, monkeypatch, caplog):
    app = create_app(trained[1])

    def broken(images, captions):
        raise RuntimeError("a fault no request should reach")

    monkeypatch.setattr(app.state.runner, "predict", broken)
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level("ERROR"):
        answer = c.post("/predict", data={"caption": "a dog"}, headers={"X-Request-ID": "fault-1"})
        assert c.get("/health").status_code == 200  # the service goes on
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "fault-1"
    assert "fault-1" in answer.json()["detail"] and "a fault no request" not in answer.text
    assert "a fault no request should reach" in caplog.text


def test_json_log_lines_carry_the_request_id():
    import logging

    token = REQUEST_ID.set("abc123")
    try:
        record = logging.LogRecord("fuselabel.access", logging.INFO, __file__, 1, "%s %s", ("GET", "/health"), None)
        record.status, record.ms = 200, 1.5
        RequestIdFilter().filter(record)
        line = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "abc123" and line["message"] == "GET /health"
    assert line["status"] == 200 and line["level"] == "INFO"


def test_pixel_limit(strict_client, client):
    """Photos over the service's pixel limit are refused from their header, before decoding."""
    big = _png((1200, 1000))  # 1.2 megapixels: over strict_client's 1, under the default 25
    refused = _post(strict_client, photo=big)
    assert refused.status_code == 415 and "megapixel" in refused.json()["detail"]
    assert strict_client.get("/info").json()["limits"]["max_megapixels"] == 1
    assert _post(client, photo=big).status_code == 200


# ---------------------------------------------------------------- predictions


def test_predict_photo_and_caption_matches_the_model(client, trained, estimator):
    photo = _photo(trained)
    body = _post(client, photo=photo, caption=CAPTION).json()
    assert body["status"] == "ok" and body["inputs"] == ["image", "caption"]
    assert body["model"] == client.get("/health").json()["model"]
    expected = estimator.predict_details([photo], [CAPTION])
    probs = [lab["probability"] for lab in body["labels"]]
    np.testing.assert_allclose(probs, expected.probs[0], atol=1e-5)
    assert [lab["predicted"] for lab in body["labels"]] == expected.predicted[0].tolist()
    assert body["predicted"] == [{"id": lab["id"], "name": lab["name"]} for lab in body["labels"] if lab["predicted"]]
    assert body["predicted"], "ensure_nonempty: at least one label"
    for lab in body["labels"]:
        assert set(lab["parts"]) == {"image", "text"}


def test_a_prediction_says_the_fusion_rule_in_force(client):
    answer = client.post("/predict", data={"caption": CAPTION}).json()
    assert answer["fusion"] == client.get("/info").json()["fusion"]
    assert answer["fusion"]["kind"] == "late"


def test_a_model_whose_photo_weight_is_0_is_named_caption_only(trained):
    app = create_app(trained[1])
    engine = app.state.model.predictor().engine
    assert engine.late_combine == "weighted"
    client = TestClient(app)
    assert client.get("/info").json()["fusion"]["reads"] == "both"
    engine.late_weight = 0.0  # as calibration sets it when the photo head only hurts
    photo = _photo(trained)
    answer = _post(client, photo=photo, caption=CAPTION).json()
    assert answer["fusion"]["reads"] == "caption only" and answer["fusion"]["image_weight"] == 0.0
    assert client.get("/info").json()["fusion"]["reads"] == "caption only"
    # and it is true: the photo changes nothing
    assert answer["contributions"]["image_changed"] is False
    alone = _post(client, caption=CAPTION).json()
    assert answer["predicted"] == alone["predicted"]
    assert [lab["probability"] for lab in answer["labels"]] == pytest.approx(
        [lab["probability"] for lab in alone["labels"]], abs=1e-6
    )


def test_each_input_says_whether_it_changed_the_label_set(client, trained, estimator):
    photo = _photo(trained)
    both = _post(client, photo=photo, caption=CAPTION).json()
    caption_only = _post(client, caption=CAPTION).json()
    photo_only = _post(client, photo=photo).json()
    said = both["contributions"]
    assert said["separable"] is True
    assert said["image_weight"] == client.get("/info").json()["fusion"]["image_weight"]
    # Without the photo the caption head alone decides, and the other way round: what the one-input answers say.
    assert said["image_changed"] == (caption_only["predicted"] != both["predicted"])
    assert said["caption_changed"] == (photo_only["predicted"] != both["predicted"])
    # An absent input changed nothing; a lone input made the whole answer (without it there is none).
    assert (caption_only["contributions"]["image_changed"], caption_only["contributions"]["caption_changed"]) == (
        False,
        True,
    )
    assert (photo_only["contributions"]["image_changed"], photo_only["contributions"]["caption_changed"]) == (
        True,
        False,
    )
    assert photo_only["contributions"]["caption"] is None
    details = estimator.predict_details([photo, photo, None], [CAPTION, None, CAPTION])
    assert details.image_changed.tolist() == [said["image_changed"], True, False]
    assert details.caption_changed.tolist() == [said["caption_changed"], False, True]
    assert details.captions_read[0].read_text == CAPTION and details.captions_read[1] is None


def test_the_answer_says_how_much_of_the_caption_was_read(client, estimator):
    length = estimator.bundle_.config.text_max_length
    short = _post(client, caption=CAPTION).json()["contributions"]["caption"]
    words = len(CAPTION.split())
    assert short == {
        "tokens": words + 2,  # each word one token, and [CLS] and [SEP]
        "tokens_read": words + 2,
        "max_tokens": length,
        "words": words,
        "words_read": words,
        "read_text": CAPTION,
        "cut": False,
    }
    long = _post(client, caption=" ".join(["dog"] * 200)).json()["contributions"]["caption"]
    assert (long["tokens"], long["tokens_read"], long["cut"]) == (202, length, True)
    assert (long["words"], long["words_read"]) == (200, length - 2)
    assert long["read_text"] == " ".join(["dog"] * (length - 2))
    rows = client.post("/predict/batch", json=[{"caption": CAPTION}, {"caption": "dog " * 200}]).json()["results"]
    assert [r["contributions"]["caption"]["cut"] for r in rows] == [False, True]
    # The same count before predicting, as the page shows it while a caption is typed.
    assert client.post("/caption", data={"caption": " ".join(["dog"] * 200)}).json()["caption"] == long
    assert client.post("/caption", data={"caption": "  "}).json()["caption"] is None


def test_a_warmed_service_explains_without_loading_the_model_again(trained, monkeypatch):
    gradients = ServeSettings(explain_method="gradients")
    app = create_app(trained[1], gradients)
    runner = app.state.runner
    assert runner.warming is None, "start-up itself does not warm"
    assert runner.explainer_state() == "on first use"
    with TestClient(app) as warm:
        assert warm.get("/health").json()["explainer"] in ("loading", "ready")
        assert warm.post("/predict", data={"caption": CAPTION}).status_code == 200
        runner.warming.result(timeout=300)
        assert runner.model.bundle_.net is not None
        assert warm.get("/health").json()["explainer"] == "ready"

        def no_second_load(path):
            raise AssertionError(f"{path} loaded again")

        monkeypatch.setattr("fuselabel.bundle.load_bundle", no_second_load)
        answer = warm.post("/explain", data={"caption": CAPTION, "label": str(runner.model.labels_[0])})
        assert answer.status_code == 200, answer.text
        assert answer.json()["method"] == "gradients"
    cold = create_app(trained[1], gradients.model_copy(update={"warm_explainer": False}))
    TestClient(cold).post("/predict", data={"caption": CAPTION})
    assert cold.state.runner.warming is None and cold.state.runner.model.bundle_.net is None
    assert TestClient(cold).get("/health").json()["explainer"] == "on first use"


def test_explaining_by_occlusion_needs_no_pytorch_weights(trained):
    """The default explains with the model that predicts: nothing to warm, ready from the start, weights unloaded."""
    app = create_app(trained[1])
    runner = app.state.runner
    with TestClient(app) as client:
        assert client.get("/health").json()["explainer"] == "ready"
        answer = client.post("/explain", data={"caption": CAPTION, "label": str(runner.model.labels_[0])})
        assert answer.status_code == 200, answer.text
        assert answer.json()["method"] == "occlusion"
    assert runner.warming is None and runner.model.bundle_.net is None


def test_caption_only_is_judged_by_its_caption(client):
    body = _post(client, caption=CAPTION).json()
    assert body["status"] == "caption_only" and body["inputs"] == ["caption"]
    for lab in body["labels"]:
        assert lab["probability"] == pytest.approx(lab["parts"]["text"], abs=1e-6)


def test_photo_only_is_judged_by_its_photo(client, trained):
    body = _post(client, photo=_photo(trained)).json()
    assert body["status"] == "image_only" and body["inputs"] == ["image"]
    for lab in body["labels"]:
        assert lab["probability"] == pytest.approx(lab["parts"]["image"], abs=1e-6)


def test_empty_file_field_means_no_photo(client):
    # What a browser form sends when no file was chosen.
    body = _post(client, photo=b"", caption=CAPTION).json()
    assert body["status"] == "caption_only"


def test_batch_matches_single_requests(client, trained):
    photo = _photo(trained, 7)
    items = [
        {"caption": CAPTION, "image_base64": base64.b64encode(photo).decode()},
        {"caption": "a red kite"},
        {"image_base64": "data:image/png;base64," + base64.b64encode(_png()).decode()},
    ]
    response = client.post("/predict/batch", json=items)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["ok", "caption_only", "image_only"]
    singles = [
        _post(client, photo=photo, caption=CAPTION),
        _post(client, caption="a red kite"),
        _post(client, photo=_png()),
    ]
    for got, single in zip(results, singles):
        np.testing.assert_allclose(
            [lab["probability"] for lab in got["labels"]],
            [lab["probability"] for lab in single.json()["labels"]],
            atol=1e-5,
        )
        assert got["predicted"] == single.json()["predicted"]


# ---------------------------------------------------------------- explanations


def test_explain_photo_and_caption(client, trained):
    photo = Image.open(io.BytesIO(_photo(trained))).resize((60, 36))  # not square: the heatmap keeps its shape
    buf = io.BytesIO()
    photo.save(buf, "JPEG")
    body = _post(client, "/explain", buf.getvalue(), caption=CAPTION, label="2").json()
    predicted = _post(client, photo=buf.getvalue(), caption=CAPTION).json()
    assert body["label"] == predicted["labels"][1] and body["status"] == "ok"

    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"])))
    assert heat.mode == "RGBA" and heat.size == (60, 36) == (body["heatmap"]["width"], body["heatmap"]["height"])
    assert np.asarray(heat)[..., 3].max() > 0, "some part of the photo carries evidence"
    # Each side explains the logit its head computes for this label.
    assert body["heatmap"]["target"] == "image head logit"
    assert body["heatmap"]["logit"] == pytest.approx(_logit(body["label"]["parts"]["image"]), abs=1e-3)
    assert body["words"]["target"] == "text head logit"
    assert body["words"]["logit"] == pytest.approx(_logit(body["label"]["parts"]["text"]), abs=1e-3)

    words = body["words"]["items"]
    assert [w["text"] for w in words] == CAPTION.split()
    assert all(CAPTION[w["start"] : w["end"]] == w["text"] for w in words)
    assert all(isinstance(w["score"], float) for w in words)
    assert len({round(w["score"], 6) for w in words}) > 1


def test_explain_one_input_only(client, trained):
    caption_only = _post(client, "/explain", caption=CAPTION, label="1").json()
    assert caption_only["heatmap"] is None and caption_only["words"] is not None
    assert caption_only["status"] == "caption_only"
    photo_only = _post(client, "/explain", _photo(trained), label="1").json()
    assert photo_only["words"] is None and photo_only["heatmap"]["width"] == 40


def test_word_scores_add_up_to_the_logit_above_an_empty_caption(estimator):
    """Integrated gradients' completeness: the words' scores sum to logit(caption) - logit([PAD] caption)."""
    bundle = estimator.bundle_
    caption = "a skateboarding dog, unbelievably, beside a car"  # words of several tokens, and commas
    result = explain(bundle, 1, None, caption)
    net, tokenizer = bundle.net, bundle.tokenizer
    ids = tokenizer(caption, return_tensors="pt")["input_ids"]
    empty = ids.clone()
    empty[0, 1:-1] = tokenizer.pad_token_id

    def text_logit(input_ids):
        with torch.no_grad():
            feats = {
                "text_feat": net.text_encoder(input_ids, torch.ones_like(input_ids)),
                "caption_present": torch.ones(1),
                "image_present": torch.zeros(1),
                "image_feat": torch.zeros(1, net.image_encoder.num_features),
            }
            return float(net.head(net.encode(feats))["text"][0, 1])

    full, base = text_logit(ids), text_logit(empty)
    assert result.words_logit == pytest.approx(full, abs=1e-5)
    assert result.words_baseline_logit == pytest.approx(base, abs=1e-5)
    assert len(result.words) == 7 and all(w["score"] is not None for w in result.words)
    total = sum(w["score"] for w in result.words)
    assert total == pytest.approx(full - base, abs=0.1 * abs(full - base) + 0.01)


@pytest.mark.parametrize(
    "kind, settings", [("early", {}), ("image", {}), ("text", {}), ("late", {"decoder": "query", "image_tokens": True})]
)
def test_explanations_follow_the_logit_each_kind_computes(kind, settings):
    """Heatmap and words explain the very logit the network computes from the photo and caption."""
    from fuselabel.bundle import Bundle
    from fuselabel.config import Config
    from fuselabel.data import build_transform
    from fuselabel.encoders import create_tokenizer, image_data_config
    from fuselabel.network import FuseLabelNet

    torch.manual_seed(0)
    config = Config(
        kind=kind,
        image_model="tf_efficientnet_lite0",
        image_size=64,
        hidden_dim=16,
        text_config_overrides={"num_hidden_layers": 1},
        **settings,
    )
    net = FuseLabelNet(config, 3, pretrained=False).eval()
    tokenizer = create_tokenizer("minilm-l6")
    preprocessing = image_data_config(net.image_encoder.backbone, 64, 1.0) if net.image_encoder else None
    bundle = Bundle(
        net=net,
        config=config,
        labels=["a", "b", "c"],
        label_names={},
        thresholds={},
        preprocessing=preprocessing,
        tokenizer=tokenizer,
    )
    photo = Image.new("RGB", (48, 30), (200, 40, 40))
    result = explain(bundle, 2, photo, CAPTION)

    batch = {"image_present": torch.ones(1), "caption_present": torch.ones(1)}
    if net.image_encoder is not None:
        batch["pixels"] = build_transform(preprocessing, train=False)(photo)[None]
    if net.text_encoder is not None:
        batch.update(tokenizer(CAPTION, return_tensors="pt"))
    with torch.no_grad():
        logits = {part: float(v[0, 2]) for part, v in net(batch).items()}
    heat_part = {"early": "early", "text": None}.get(kind, "image")
    word_part = {"early": "early", "image": None}.get(kind, "text")
    assert (result.heatmap is None) == (heat_part is None) and (result.words is None) == (word_part is None)
    if heat_part:
        assert result.heatmap.shape == (30, 48)
        assert result.heatmap_logit == pytest.approx(logits[heat_part], abs=1e-4)
    if word_part:
        assert result.words_logit == pytest.approx(logits[word_part], abs=1e-4)


def test_words_past_the_token_limit_have_no_score(estimator):
    caption = " ".join(["dog"] * 200)
    words = explain(estimator.bundle_, 0, None, caption).words
    assert len(words) == 200
    scored = [w["score"] is not None for w in words]
    assert scored[0] and not scored[-1]
    assert sum(scored) == estimator.bundle_.config.text_max_length - 2  # [CLS] and [SEP] take two


def test_heatmap_of_a_centre_crop_covers_only_the_crop():
    cam = np.ones((2, 2), np.float32)
    heat = to_photo_frame(cam, (100, 50), {"crop_pct": 0.5, "input_size": [3, 32, 32]})
    assert heat.shape == (50, 100)
    hot = np.argwhere(heat > 0)
    # The model saw a square of side 25 (half the short side) at the centre.
    assert hot[:, 0].min() == 12 and hot[:, 0].max() == 36
    assert hot[:, 1].min() == 38 and hot[:, 1].max() == 62
    whole = to_photo_frame(cam, (100, 50), {"crop_pct": 1.0, "input_size": [3, 32, 32]})
    assert (whole == 1).all()


# ---------------------------------------------------------------- client errors: 4xx with a message, never 500


def _bomb_png(width=50_000, height=50_000) -> bytes:
    """A tiny PNG whose header claims a huge image: decoding it naively would take gigabytes."""
    data = bytearray(_png((8, 8)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = crc.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize(
    "case, status",
    [
        ("no input", 422),
        ("blank caption only", 422),
        ("caption too long", 422),
        ("not an image", 415),
        ("truncated jpeg", 415),
        ("decompression bomb", 415),
        ("photo as a text field", 422),
    ],
)
def test_predict_client_errors(client, trained, case, status):
    photo = _photo(trained)
    response = {
        "no input": lambda: _post(client),
        "blank caption only": lambda: _post(client, caption="   \n "),
        "caption too long": lambda: _post(client, caption="dog " * (MAX_CAPTION_CHARS // 4 + 1)),
        "not an image": lambda: _post(client, photo=b"%PDF-1.4 certainly not a photo", caption=CAPTION),
        "truncated jpeg": lambda: _post(client, photo=photo[: len(photo) // 3]),
        "decompression bomb": lambda: _post(client, photo=_bomb_png()),
        # A request can name no file on the server: a string where the photo goes is refused.
        "photo as a text field": lambda: client.post("/predict", data={"image": str(trained[0] / "5.jpg")}),
    }[case]()
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]


def test_upload_limit_counts_the_body_not_its_header(strict_client, trained):
    too_big = b"\xff" * 60_000
    response = _post(strict_client, photo=too_big)
    assert response.status_code == 413 and "0.05 MB" in response.json()["detail"]

    def chunks():  # no Content-Length: the body arrives chunked and is counted as it comes
        for _ in range(10):
            yield b"x" * 10_000

    response = strict_client.post(
        "/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413
    assert _post(strict_client, photo=_photo(trained)).status_code == 200  # within the limit: served


@pytest.mark.parametrize(
    "payload, status",
    [
        ([], 422),
        ({"caption": "a dog"}, 422),
        ([{"caption": "a dog", "image": "/etc/passwd"}], 422),
        ([{"caption": ""}], 422),
        ([{"image_base64": "not base64!"}], 422),
        ([{"caption": 5}], 422),
        ([{"image_base64": base64.b64encode(b"GIF89a nonsense").decode()}], 415),
        ([{"caption": "a dog"}] * 3, 413),
    ],
)
def test_batch_client_errors(strict_client, payload, status):
    response = strict_client.post("/predict/batch", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_batch_error_names_the_item(client):
    response = client.post("/predict/batch", json=[{"caption": "a dog"}, {"caption": " "}])
    assert response.status_code == 422 and response.json()["detail"].startswith("item 1")


@pytest.mark.parametrize(
    "fields, status", [({"label": "99", "caption": CAPTION}, 422), ({"caption": CAPTION}, 422), ({"label": "1"}, 422)]
)
def test_explain_client_errors(client, fields, status):
    response = client.post("/explain", data=fields)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_explain_rejects_a_non_image(client):
    assert _post(client, "/explain", b"<html>", label="1").status_code == 415


@pytest.mark.parametrize(
    "kind, photo, caption, ok",
    [
        ("late", True, False, True),
        ("late", False, True, True),
        ("late", False, False, False),
        ("image", False, True, False),
        ("image", True, True, True),
        ("text", True, False, False),
        ("text", False, True, True),
        ("early", True, False, True),
    ],
)
def test_a_request_needs_an_input_the_model_reads(kind, photo, caption, ok):
    args = (kind, object() if photo else None, "a dog" if caption else None)
    if ok:
        require_input(*args)
    else:
        with pytest.raises(HTTPException) as err:
            require_input(*args)
        assert err.value.status_code == 422


def test_bad_limits_are_refused():
    with pytest.raises(ValidationError, match="max_batch"):
        ServeSettings(max_batch=0)
    with pytest.raises(
        ValidationError, match="(?s)max_concurrency.*greater than 0.*max_queue.*greater than or equal to 0"
    ):
        ServeSettings(max_concurrency=0, max_queue=-1)
    with pytest.raises(ValidationError, match="max_uplod_mb"):
        ServeSettings(max_uplod_mb=5)  # a misspelt setting is refused, not ignored


def test_serve_command_names_each_impossible_limit(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--max-batch", "0", "--max-queue", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch (max_batch=0): Input should be greater than 0" in err and "--max-queue (max_queue=-1)" in err
    assert "Traceback" not in err


def test_serve_command_refuses_a_folder_that_is_no_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a fuselabel model folder" in capsys.readouterr().err


# ---------------------------------------------------------------- who may call: keys and CORS; HEAD; malformed bodies

KEY = "k3y-for-tests"
ORIGIN = "https://labels.example.org"


@pytest.fixture(scope="module")
def keyed_client(trained):
    return TestClient(create_app(trained[1], ServeSettings(api_key=KEY, cors_origin=[ORIGIN])))


def test_a_key_guards_the_prediction_routes_and_info(keyed_client, trained):
    for path in ("/predict", "/explain"):
        refused = _post(keyed_client, path, caption=CAPTION, label="1")
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "X-API-Key" in refused.json()["detail"]
    assert keyed_client.post("/predict/batch", json=[{"caption": CAPTION}]).status_code == 401
    assert keyed_client.get("/info").status_code == 401
    wrong = keyed_client.post("/predict", data={"caption": CAPTION}, headers={"X-API-Key": KEY + "x"})
    assert wrong.status_code == 401 and "not this service's" in wrong.json()["detail"]

    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        answer = keyed_client.post("/predict", data={"caption": CAPTION}, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["labels"]
    batch = keyed_client.post("/predict/batch", json=[{"caption": CAPTION}], headers={"X-API-Key": KEY})
    assert batch.status_code == 200
    assert keyed_client.get("/info", headers={"X-API-Key": KEY}).status_code == 200

    # Open: liveness (which says a key is wanted, for the page), the labels, the page and the docs.
    health = keyed_client.get("/health")
    assert health.status_code == 200 and health.json()["key_required"] is True
    for path in ("/labels", "/", "/static/app.js", "/docs", "/openapi.json"):
        assert keyed_client.get(path).status_code == 200, path
    answers = keyed_client.get("/openapi.json").json()["paths"]["/predict"]["post"]["responses"]
    assert "WWW-Authenticate" in answers["401"]["headers"]


def test_cors_preflight_and_answers_name_the_allowed_origin(keyed_client):
    preflight = keyed_client.options(
        "/predict",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    # A refusal is readable by the page too (it carries the CORS header), and another origin gets none.
    refused = keyed_client.post("/predict", data={"caption": CAPTION}, headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    other = keyed_client.options(
        "/predict", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_the_key_comes_from_the_setting_a_file_or_the_environment(tmp_path, monkeypatch):
    from fuselabel.serve.app import api_key

    monkeypatch.delenv("FUSELABEL_API_KEY", raising=False)
    assert api_key(ServeSettings()) is None
    monkeypatch.setenv("FUSELABEL_API_KEY", "from-env")
    assert api_key(ServeSettings()) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\nsecond line\n")
    assert api_key(ServeSettings(api_key_file=str(key_file))) == "from-file"
    assert api_key(ServeSettings(api_key="given")) == "given"
    with pytest.raises(ValueError, match="not both"):
        api_key(ServeSettings(api_key="given", api_key_file=str(key_file)))
    key_file.write_text("\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(key_file))}: its first line is empty"):
        api_key(ServeSettings(api_key_file=str(key_file)))
    with pytest.raises(ValueError, match="cannot read it"):
        api_key(ServeSettings(api_key_file=str(tmp_path / "missing")))


def test_head_answers_wherever_get_does(client):
    for path in ("/health", "/labels", "/info", "/metrics", "/", "/docs", "/openapi.json", "/static/app.js"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == 200, path
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert client.head("/nowhere").status_code == 404


@pytest.mark.parametrize(
    "path, body, content_type",
    [
        ("/predict/batch", b'[{"caption": "a dog"', "application/json"),
        ("/predict", b"caption=dog", "multipart/form-data"),  # no boundary
        ("/explain", b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b"),
    ],
)
def test_a_malformed_body_is_a_documented_400(client, path, body, content_type):
    response = client.post(path, content=body, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert isinstance(response.json()["detail"], str)
    documented = client.get("/openapi.json").json()["paths"][path]["post"]["responses"]["400"]
    assert documented["content"]["application/json"]["schema"]["$ref"].endswith("/Error")


def test_a_batch_is_spread_over_the_worker_threads(trained, monkeypatch):
    """One request's rows run as pieces on several threads at once, as ``fuselabel predict`` runs its windows."""
    from fuselabel.serve.model import Runner

    model = FuseLabel.from_pretrained(trained[1], exported=True)
    runner = Runner(model, workers=4)
    seen, lock, both_waiting = [], threading.Lock(), threading.Barrier(2, timeout=30)
    real = runner.predictor.predict

    def recording(images, captions, **kw):
        with lock:
            seen.append((threading.current_thread().name, len(images)))
        both_waiting.wait()  # two pieces at work at the same time, or this times out
        return real(images, captions, **kw)

    monkeypatch.setattr(runner.predictor, "predict", recording)
    photos = [Image.open(trained[0] / f"{i}.jpg").convert("RGB") for i in range(8)]
    pred = runner.predict(photos, [CAPTION] * 8)
    assert len(pred) == 8 and all(s == "ok" for s in pred.status)
    assert sorted(n for _, n in seen) == [2, 2, 2, 2]
    assert len({name for name, _ in seen}) >= 2
    assert all(name.startswith("fuselabel-predict") for name, _ in seen)
    whole = real(photos, [CAPTION] * 8)  # the same rows as one window on one thread
    np.testing.assert_allclose(pred.probs, whole.probs, atol=1e-5)
    assert (pred.predicted == whole.predicted).all()


# ---------------------------------------------------------------- concurrency and a graceful stop


def test_concurrent_requests_agree_with_sequential_ones(trained):
    photos = [_photo(trained, i) for i in range(4, 10)]
    with serving(create_app(trained[1])) as url, httpx.Client(base_url=url, timeout=120) as http:

        def ask(i):
            files = {"image": ("p.jpg", photos[i % len(photos)], "image/jpeg")}
            path = "/explain" if i % 3 == 0 else "/predict"
            data = {"caption": f"{CAPTION} {i}", **({"label": "3"} if path == "/explain" else {})}
            return path, http.post(path, files=files, data=data)

        sequential = [ask(i) for i in range(12)]
        concurrent: dict[int, tuple] = {}
        threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, ask(i))) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, (path, first) in enumerate(sequential):
        second = concurrent[i][1]
        assert first.status_code == second.status_code == 200, (i, second.text)
        a, b = first.json(), second.json()
        if path == "/predict":
            np.testing.assert_allclose(
                [x["probability"] for x in a["labels"]], [x["probability"] for x in b["labels"]], atol=1e-6
            )
        else:
            assert a["heatmap"]["png_base64"] == b["heatmap"]["png_base64"]
            assert [w["score"] for w in a["words"]["items"]] == pytest.approx(
                [w["score"] for w in b["words"]["items"]], abs=1e-6
            )


def test_sigterm_lets_the_request_in_flight_finish(trained, tmp_path):
    """SIGTERM while a request's body is still arriving: it is answered 200, then the process exits 0."""
    with served_process(trained[1], tmp_path) as (proc, url):
        request = httpx.Client().build_request(
            "POST",
            f"{url}/predict",
            data={"caption": CAPTION},
            files={"image": ("p.jpg", _photo(trained), "image/jpeg")},
        )
        body, content_type = request.read(), request.headers["content-type"]
        half_sent, resume = threading.Event(), threading.Event()

        def slow_body():
            yield body[:100]
            half_sent.set()
            resume.wait(30)
            yield body[100:]

        answer = {}

        def send():
            answer["response"] = httpx.post(
                f"{url}/predict", content=slow_body(), headers={"content-type": content_type}, timeout=60
            )

        sender = threading.Thread(target=send)
        sender.start()
        assert half_sent.wait(30)
        time.sleep(0.5)  # the server has the request's head and is waiting for the rest
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # ... and is now shutting down, with this request in flight
        assert proc.poll() is None, "the server quit with a request in flight"
        resume.set()
        sender.join(60)
        response = answer["response"]
        assert response.status_code == 200 and response.json()["status"] == "ok"
        assert proc.wait(60) == 0
    assert "Shutting down" in (tmp_path / "serve.log").read_text()


# ---------------------------------------------------------------- admission control, timeouts, processes


def _slow_request(url: str, body: bytes, content_type: str, path: str = "/predict"):
    """A POST whose body stops after 100 bytes until the returned event is set; (thread, event, answer)."""
    resume, answer = threading.Event(), {}

    def slow_body():
        yield body[:100]
        resume.wait(60)
        yield body[100:]

    def send():
        answer["response"] = httpx.post(
            f"{url}{path}", content=slow_body(), headers={"content-type": content_type}, timeout=60
        )

    thread = threading.Thread(target=send)
    thread.start()
    return thread, resume, answer


def _form(trained) -> tuple[bytes, str]:
    request = httpx.Client().build_request(
        "POST", "http://x/predict", data={"caption": CAPTION}, files={"image": ("p.jpg", _photo(trained), "image/jpeg")}
    )
    return request.read(), request.headers["content-type"]


def test_busy_service_answers_503_with_retry_after(trained):
    """One request at work and one waiting at most: a third is refused at once, a waiting one after its
    queue timeout, and /health and /metrics still answer."""
    app = create_app(trained[1], ServeSettings(max_concurrency=1, max_queue=1, queue_timeout=1.5))
    body, content_type = _form(trained)
    with serving(app) as url:
        first, resume, answer = _slow_request(url, body, content_type)
        time.sleep(0.5)  # the first holds the one slot, its body half sent
        waiting = {}
        second = threading.Thread(
            target=lambda: waiting.__setitem__(
                "response", httpx.post(f"{url}/predict", data={"caption": CAPTION}, timeout=30)
            )
        )
        second.start()
        time.sleep(0.3)
        third = httpx.post(f"{url}/predict", data={"caption": CAPTION}, timeout=30)
        assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1
        assert "busy" in third.json()["detail"]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert "fuselabel_requests_waiting 1.0" in httpx.get(f"{url}/metrics", timeout=5).text
        second.join(30)
        assert waiting["response"].status_code == 503  # waited its 1.5 s, then refused
        resume.set()
        first.join(60)
        assert answer["response"].status_code == 200
        assert httpx.post(f"{url}/predict", data={"caption": CAPTION}, timeout=30).status_code == 200


def test_stalled_connections_are_closed_and_do_not_block_health(trained):
    """Sockets that send nothing, or half a request head, are closed after the header timeout; a body
    that stops arriving gets 408 after the body timeout."""
    with serving(create_app(trained[1], ServeSettings(body_timeout=1)), header_timeout=1) as url:
        port = int(url.rsplit(":", 1)[1])
        stalled = []
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", port))
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head without its end
            stalled.append(s)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        for s in stalled:
            s.settimeout(10)
            assert s.recv(100) == b"", "the server did not close a stalled connection"
            s.close()

        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 1000\r\n\r\n--b\r\n"
            )
            s.settimeout(10)
            answer = b""
            while chunk := s.recv(4096):  # until the server closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body-timeout" in answer


def test_workers_share_the_port_and_metrics(trained, tmp_path):
    """``--workers 2``: two processes serve one port, /metrics adds up both, and SIGTERM stops both cleanly."""
    with served_process(trained[1], tmp_path, "--workers", "2", "--json-logs", tries=900) as (proc, url):
        time.sleep(3)  # the second process may still be loading its model
        for _ in range(6):
            assert httpx.post(f"{url}/predict", data={"caption": CAPTION}, timeout=60).status_code == 200
        text = httpx.get(f"{url}/metrics", timeout=10).text
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("fuselabel_requests_total{") and 'route="/predict"' in x and 'status="200"' in x
        )
        assert float(line.split()[-1]) == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    lines = [json.loads(x) for x in (tmp_path / "serve.log").read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "fuselabel.access" and x.get("path") == "/predict"]
    assert len(access) == 6 and all(x["status"] == 200 and len(x["request_id"]) == 32 for x in access)


def test_an_upload_over_the_limit_gets_its_413_even_from_a_client_that_sends_it_all(trained, tmp_path):
    """Python's http.client sends the whole body before it reads the answer: the service reads and drops the
    rest of the body, then answers 413, rather than closing on a client that is still sending."""
    import http.client

    with served_process(trained[1], tmp_path) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(2):  # twice: the first refusal leaves the service serving
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                conn.request(
                    "POST",
                    "/predict",
                    body=b"\xff" * 12_000_000,
                    headers={"Content-Type": "multipart/form-data; boundary=b"},
                )
                response = conn.getresponse()
                assert response.status == 413
                assert "upload limit of 10 MB" in json.loads(response.read())["detail"]
            finally:
                conn.close()
        assert httpx.get(f"{url}/health").status_code == 200


# ---------------------------------------------------------------- the container

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_copies_what_exists_and_runs_without_privileges():
    """What can be checked without a Docker daemon: each COPY source is in the build context, and the
    service runs as a user of its own."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = [x[1:].rstrip("/") for x in ignore if x.startswith("!")]
    for line in lines:
        if line.startswith("COPY "):
            for source in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                assert (ROOT / source).exists(), line
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{line}: ignored"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") and '"serve", "/model"' in line for line in lines)


@pytest.fixture
def docker() -> None:
    """Skips, saying why, where no Docker daemon answers (before any model is trained for the test)."""
    import shutil

    if shutil.which("docker") is None:
        pytest.skip("docker is not installed: the image is not built here")
    ran = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if ran.returncode != 0:
        pytest.skip(f"no Docker daemon answers `docker info`: {(ran.stderr or ran.stdout).strip()[:200]}")


def test_container_serves_a_mounted_model(docker, trained):
    tag = "fuselabel-test:latest"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=3600)
    port = free_port()
    name = f"fuselabel-test-{port}"
    subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            "-p",
            f"127.0.0.1:{port}:8000",
            "-v",
            f"{trained[1]}:/model:ro",
            tag,
        ],
        check=True,
        timeout=120,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        assert httpx.post(f"http://127.0.0.1:{port}/predict", data={"caption": CAPTION}, timeout=60).status_code == 200
        user = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True, text=True, check=True)
        assert user.stdout.strip() != "0"
    finally:
        subprocess.run(["docker", "stop", "-t", "30", name], capture_output=True)


class _HeadsOnly:
    """An engine whose heads give fixed probabilities: enough for the fusion and decision steps."""

    def __init__(self, kind, parts, combine="weighted", weight=0.5):
        self.kind, self.parts, self.late_combine, self.late_weight = kind, parts, combine, weight
        self.task, self.feature_dims = "multilabel", {"image": 2, "text": 2}
        self.image_batch = 1

    def heads(self, feats):
        n = len(next(iter(feats.values())))
        return {k: np.repeat(np.asarray([v], np.float32), n, axis=0) for k, v in self.parts.items()}


@pytest.mark.parametrize(
    ("kind", "parts", "weight", "image", "caption"),
    [
        ("late", {"image": [0.9, 0.1], "text": [0.1, 0.9]}, 0.5, True, True),  # each adds its own label
        ("late", {"image": [0.9, 0.1], "text": [0.1, 0.9]}, 0.0, False, True),  # a photo weighing 0 never counts
        ("late", {"image": [0.9, 0.9], "text": [0.9, 0.9]}, 0.5, False, False),  # either alone says the same
        ("early", {"early": [0.9, 0.1]}, None, None, None),  # one head over both: not separable
    ],
)
def test_what_each_input_changed_follows_the_fusion_rule(kind, parts, weight, image, caption):
    from fuselabel.runtime import Predictor

    predictor = Predictor(_HeadsOnly(kind, parts, weight=weight), ["a", "b"], [0.4, 0.4], ensure_nonempty=False)
    pred = predictor.predict_features({}, [True], [True])
    if image is None:
        assert pred.image_changed is None and pred.caption_changed is None
    else:
        assert (bool(pred.image_changed[0]), bool(pred.caption_changed[0])) == (image, caption)
