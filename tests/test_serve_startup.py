"""Start-up of ``fuselabel serve`` on a CPU: the service predicts from the model folder's exported ONNX copy in the
cache (made by the first start), so it starts without torch, torchvision, timm, transformers, scikit-learn or
Lightning, and gives what ``fuselabel predict`` gives; /explain loads the PyTorch model on first use and explains
exactly as a service started on the PyTorch model does."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fuselabel.cli import main
from fuselabel.config import ServeSettings
from fuselabel.onnx_folder import exported_location
from fuselabel.serve import create_app
from fuselabel.serve.model import model_id
from fuselabel.tables import read_table

HEAVY = ("torch", "torchvision", "timm", "transformers", "sklearn", "lightning", "torch._dynamo")
CAPTION = "a photo of a dog and a car next to a kite"

# A service started in a fresh process: every reading and predicting route, then an explanation, each followed
# by the heavy modules loaded so far.
SERVE = (
    "import base64, json, sys\n"
    "from fastapi.testclient import TestClient\n"
    "from fuselabel.config import ServeSettings\n"
    "from fuselabel.serve import create_app\n"
    "model, cache, photo, method = sys.argv[1:5]\n"
    f"heavy = lambda: sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
    # Warming the explaining model after the first answer would load torch: what start-up itself needs is measured.
    "app = create_app(model, ServeSettings(explain_method=method, warm_explainer=False), cache_dir=cache)\n"
    "client = TestClient(app)\n"
    "image = open(photo, 'rb').read()\n"
    "form = dict(files={'image': ('p.jpg', image, 'image/jpeg')}, data={'caption': %r})\n"
    "statuses = [client.get(p).status_code for p in ('/health', '/labels', '/info', '/metrics', '/docs',\n"
    "                                                '/openapi.json')]\n"
    "statuses.append(client.post('/predict', **form).status_code)\n"
    "statuses.append(client.post('/predict/batch', json=[{'caption': 'a red kite',\n"
    "    'image_base64': base64.b64encode(image).decode()}]).status_code)\n"
    "out = {'engine': app.state.runner.predictor.engine.name, 'statuses': statuses, 'heavy_serving': heavy()}\n"
    "answer = client.post('/explain', files=form['files'], data={**form['data'], 'label': '2'})\n"
    "out.update(explain_status=answer.status_code, explanation=answer.json(), heavy_explained=heavy())\n"
    "print('RESULT', json.dumps(out))\n"
) % CAPTION


def _serve_fresh(model, cache, photo, method) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SERVE, str(model), str(cache), str(photo), method],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def started(tiny_model, tmp_path_factory):
    """(model folder, cache, service started on the exported copy, service started on the PyTorch model)."""
    root, _, _ = tiny_model
    model, cache = root / "model", tmp_path_factory.mktemp("serve-cache")
    assert not (exported_location(model, cache) / "manifest.json").exists()
    exported = create_app(model, cache_dir=str(cache))  # the first start exports the copy
    assert (exported_location(model, cache) / "manifest.json").is_file()
    eager = create_app(model, cache_dir=str(cache), feature_engine="torch")
    return model, cache, exported, eager


@pytest.mark.parametrize("method", ["occlusion", "gradients"])
def test_service_starts_without_heavy_modules_and_explains_on_demand(started, tiny_model, method):
    model, cache, _, _ = started
    photo = tiny_model[1] / "5.jpg"
    out = _serve_fresh(model, cache, photo, method)
    assert out["engine"] == "onnxruntime (exported folder)"
    assert out["statuses"] == [200] * 8
    assert out["heavy_serving"] == [], out["heavy_serving"]
    assert out["explain_status"] == 200, out["explanation"]
    body = out["explanation"]
    assert body["method"] == method
    assert body["heatmap"]["png_base64"] and body["heatmap"]["target"] == "image head logit"
    assert [w["text"] for w in body["words"]["items"]] == CAPTION.split()
    # Occlusion explains with the model that predicts; gradients load the PyTorch model, on first use.
    assert ("torch" in out["heavy_explained"]) == (method == "gradients"), out["heavy_explained"]


def test_the_exported_copy_serves_what_the_pytorch_model_serves(started, tiny_model):
    """Same id, labels, thresholds, settings, fusion rule and figures; the same explanations; the same predictions."""
    _, _, exported, eager = started
    assert exported.state.runner.predictor.engine.name == "onnxruntime (exported folder)"
    assert "torch heads" in eager.state.runner.predictor.engine.name
    a, b = TestClient(exported), TestClient(eager)
    for path in ("/health", "/labels", "/info"):
        said = [client.get(path).json() for client in (a, b)]
        assert said[0] == said[1], path
    assert model_id(exported.state.model) == model_id(eager.state.model)
    assert exported.state.model.preprocessing_ == eager.state.model.preprocessing_

    photo = (tiny_model[1] / "7.jpg").read_bytes()
    files = {"image": ("p.jpg", photo, "image/jpeg")}
    for label in ("1", "3"):
        # Each explains by occlusion on its own engine, whose features agree to about 1e-6.
        x, y = (c.post("/explain", files=files, data={"caption": CAPTION, "label": label}).json() for c in (a, b))
        assert x["heatmap"]["logit"] == pytest.approx(y["heatmap"]["logit"], abs=1e-3)
        assert (x["heatmap"]["width"], x["heatmap"]["height"]) == (y["heatmap"]["width"], y["heatmap"]["height"])
        assert x["words"]["items"] == [{**w, "score": pytest.approx(w["score"], abs=1e-3)} for w in y["words"]["items"]]
        assert x["label"]["probability"] == pytest.approx(y["label"]["probability"], abs=1e-5)
        assert x["label"]["predicted"] == y["label"]["predicted"]

    x, y = (c.post("/predict", files=files, data={"caption": CAPTION}).json() for c in (a, b))
    assert [lab["probability"] for lab in x["labels"]] == pytest.approx(
        [lab["probability"] for lab in y["labels"]], abs=1e-5
    )
    assert x["predicted"] == y["predicted"]


def test_service_predicts_what_fuselabel_predict_writes(started, tiny_model, tmp_path):
    model, cache, exported, _ = started
    _, image_dir, csv = tiny_model
    out, proba = tmp_path / "out.csv", tmp_path / "proba.csv"
    assert (
        main(
            [
                "predict",
                str(model),
                "--data",
                str(image_dir),
                "--csv",
                str(csv),
                "--out",
                str(out),
                "--proba",
                str(proba),
                "--cache-dir",
                str(cache),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    records = read_table(csv).records
    client = TestClient(exported)
    results = []
    for lo in range(0, len(records), 32):
        items = [
            {"caption": r.caption, "image_base64": base64.b64encode((image_dir / r.image_id).read_bytes()).decode()}
            for r in records[lo : lo + 32]
        ]
        response = client.post("/predict/batch", json=items)
        assert response.status_code == 200, response.text
        results += response.json()["results"]

    written = [line.split(",") for line in proba.read_text().splitlines()[1:]]
    sets = [line.split(",", 1)[1] for line in out.read_text().splitlines()[1:]]
    assert len(results) == len(written) == len(sets) == len(records)
    for row, cells, labels in zip(results, written, sets):
        np.testing.assert_allclose(
            [lab["probability"] for lab in row["labels"]], [float(c) for c in cells[1:-1]], atol=1e-6
        )
        assert row["status"] == cells[-1]
        assert " ".join(str(lab["id"]) for lab in row["predicted"]) == labels


def test_explain_refuses_weights_changed_since_the_start(tiny_model, session_cache, tmp_path):
    """Explaining by gradients, the PyTorch model loads on the first /explain: from a folder whose weights changed
    since the start, it would explain another model than the one predicting, so the service says to restart it
    instead. Occlusion explains with the model that predicts, loaded at the start, and goes on."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model[0] / "model", model)
    settings = ServeSettings(explain_method="gradients", warm_explainer=False)
    client = TestClient(create_app(model, settings, cache_dir=session_cache))
    occluding = TestClient(create_app(model, cache_dir=session_cache))
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, model / "model.safetensors")
    response = client.post("/explain", data={"caption": CAPTION, "label": "1"})
    assert response.status_code == 503 and "restart" in response.json()["detail"]
    assert client.post("/predict", data={"caption": CAPTION}).status_code == 200
    assert occluding.post("/explain", data={"caption": CAPTION, "label": "1"}).status_code == 200
