"""API fuzzing with schemathesis: requests generated from our own OpenAPI document, valid and invalid,
against a real server with a tiny model of each task.

Properties, for every generated request: no 5xx, the status code is one the document declares, the
body and content type match what it declares for that code, and the server stays healthy.
The number of examples is bounded (FUZZ_EXAMPLES, default 40 per operation and mode) to keep CI fast.
"""

from __future__ import annotations

import os
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.service.service_helpers import LiveServer, Settings, make_models_dir, wait_ready

pytestmark = pytest.mark.slow
MODELS = ["sentiment", "writer", "mobilenet"]  # one per task (all loaded: any 5xx is a failure)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, unsupported_method]


@pytest.fixture(scope="module")
def fuzz_server(pristine_models, tmp_path_factory):
    models_dir = make_models_dir(pristine_models, tmp_path_factory.mktemp("fuzz"), MODELS)
    # A small generation cap keeps generated requests fast; anything above it must be a declared 422.
    settings_ = Settings(models_dir=models_dir, reload_interval_s=0, max_new_tokens=16, max_batch_wait_ms=1,
                         max_request_bytes=256 * 1024, _env_file=None)
    with LiveServer(settings_) as server, server.client() as client:
        wait_ready(client)
        yield server


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    spec = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    # The document says `name: string`; point the fuzzer at real models (and one unknown name) so that
    # it exercises each task's code instead of 404ing on random names.
    for operations in spec["paths"].values():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                if param["name"] == "name" and param["in"] == "path":
                    param["schema"] = {"type": "string", "enum": [*MODELS, "no-such-model"]}
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=fuzz_server.url)
    return schema


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations() if result.ok().path != "/admin/reload"]


# schemathesis' pytest plugin does not load under pytest 9, so each operation runs as a plain hypothesis
# test built from schemathesis' strategy for it (the same cases and checks).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_api_conforms_to_its_openapi(fuzz_schema, fuzz_server, mode):
    failures, seen = [], Counter()
    for operation in operations(fuzz_schema):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case):
            response = case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)
            seen[(case.path_parameters or {}).get("name", case.path), response.status_code] += 1
            assert httpx.get(f"{fuzz_server.url}/health", timeout=10).status_code == 200

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            continue
        except Exception as exc:  # collect every operation's first failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    if mode == GenerationMode.POSITIVE:  # the fuzzer reached every model's inference code, not only its errors
        for model in MODELS:
            assert seen[model, 200] > 0, seen


def test_server_healthy_after_fuzzing(fuzz_server):
    with fuzz_server.client() as client:
        assert client.get("/ready").status_code == 200
        assert client.post("/models/sentiment", json={"inputs": "still fine"}).status_code == 200
        assert fuzz_server.app.state.in_flight == 0
        metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics


def test_every_route_declares_the_error_body(fuzz_server):
    spec = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    infer = spec["paths"]["/models/{name}"]["post"]["responses"]
    for code in ("401", "404", "408", "413", "415", "422", "429", "500", "503"):
        assert infer[code]["content"]["application/json"]["schema"] == error_ref, code
    assert set(infer["200"]["content"]) == {"application/json", "text/event-stream"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path not in ("/health", "/v2/health/live", "/v2/health/ready"):  # the public ones
                assert "401" in operation["responses"], (method, path)
            assert "HTTPValidationError" not in str(operation), (method, path)
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    request = spec["paths"]["/models/{name}"]["post"]["requestBody"]["content"]
    assert {"application/json", "image/*", "multipart/form-data"} <= set(request)
    for ref in request["application/json"]["schema"]["oneOf"]:  # resolvable references, not dangling $defs
        assert ref["$ref"].split("/")[-1] in spec["components"]["schemas"]
