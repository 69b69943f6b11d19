"""The service's OpenAPI schema tells the truth: Schemathesis generates requests from it (valid and invalid) and
checks every answer against it with every check it has, in-process against the ASGI app of a tiny model."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from test_serve import train_tiny_model

from fuselabel.config import ServeSettings
from fuselabel.serve import create_app

load_all_checks()
EVERY_CHECK = CHECKS.get_all()


@pytest.fixture(scope="module")
def app(tmp_path_factory, session_cache):
    _, model = train_tiny_model(tmp_path_factory.mktemp("schema"), session_cache)
    # Small limits, so that generated requests reach them: 2 items a batch, 0.2 MB a request, 1 megapixel.
    return create_app(model, ServeSettings(max_batch=2, max_upload_mb=0.2, max_megapixels=1), cache_dir=session_cache)


# Whether bytes decode as a photo is beyond what a schema can say: schema-valid photo bytes may get a 415. A
# batch over its documented size is refused with 413 (the rows are too many for one request), a refusal too.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "415"]},
            "negative_data_rejection": {"expected-statuses": ["400", "401", "413", "415", "422"]},
        }
    }
)


# Schema-violating requests go to the JSON route. The GET routes take no input, and a multipart form carries
# every field as text: a caption "mutated" into a list is sent as the text of that list, a valid caption, which
# Schemathesis cannot tell once a photo part shares the body. Malformed forms are test_serve.py's client-error tests.
NEGATIVE = {"POST /predict/batch"}


def _operations(app) -> dict:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def test_every_check_is_on():
    names = {check.__name__ for check in EVERY_CHECK}
    assert {"not_a_server_error", "status_code_conformance", "response_schema_conformance"} <= names
    assert {"negative_data_rejection", "content_type_conformance", "response_headers_conformance"} <= names


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_is_the_documented_one(app, mode):
    operations = _operations(app)
    assert {"POST /predict", "POST /predict/batch", "POST /explain", "GET /info", "GET /health"} <= set(operations)
    for operation in operations.values():
        if mode is GenerationMode.NEGATIVE and operation.label not in NEGATIVE:
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def answers_as_documented(case):
            case.call_and_validate(checks=EVERY_CHECK)

        answers_as_documented()


def test_the_schema_states_the_limits(app):
    spec = TestClient(app).get("/openapi.json").json()
    batch = spec["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["maxItems"] == 2 and batch["minItems"] == 1
    item = spec["components"]["schemas"]["BatchItem"]["properties"]
    assert item["caption"]["anyOf"][0]["maxLength"] == 10_000
    form = spec["components"]["schemas"]["Body_predict_predict_post"]["properties"]
    assert "1 megapixels" in form["image"]["description"] and "0.2 MB" in form["image"]["description"]
    assert "image/jpeg" in form["image"]["description"]
    assert form["caption"]["maxLength"] == 10_000
