"""API fuzzing with schemathesis: requests generated from our own OpenAPI document, valid and invalid,
against a real server with a tiny model of each task.

This is schemathesis' own CLI with every check (`--checks all`: no 5xx, declared status codes,
content types, headers and bodies, valid data accepted, invalid data refused, 405 with `Allow` for
undeclared methods, ...) over all its phases (examples, coverage, fuzzing, stateful), derandomised
(`--generation-deterministic --seed 0`) and bounded by FUZZ_EXAMPLES (default 8 per operation) to
keep CI fast. `make fuzz` runs the same for minutes with a fresh seed (benchmarks/fuzz.py).
schemathesis.toml, read from the repository root, says what the document cannot (image bytes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.service_helpers import REPO, LiveServer, Settings, make_models_dir, wait_ready

pytestmark = pytest.mark.slow
MODELS = ["sentiment", "writer", "chatty", "mobilenet", "embedder"]  # every task (all load: any 5xx is a failure)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def fuzz_server(pristine_models, tmp_path_factory):
    models_dir = make_models_dir(pristine_models, tmp_path_factory.mktemp("fuzz"), MODELS)
    # A small generation cap keeps generated requests fast; the document says it (a maximum).
    settings_ = Settings(models_dir=models_dir, reload_interval_s=0, max_new_tokens=2, max_batch_wait_ms=1,
                         max_request_bytes=256 * 1024, _env_file=None)
    with LiveServer(settings_) as server, server.client() as client:
        wait_ready(client)
        yield server


@pytest.fixture(scope="module")
def fuzz_run(fuzz_server, tmp_path_factory):
    """One derandomised schemathesis run with every check: (exit code, output)."""
    report = tmp_path_factory.mktemp("fuzz-report")
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{fuzz_server.url}/openapi.json",
           "--checks", "all", "--generation-deterministic", "--seed", "0", "--max-examples", str(EXAMPLES),
           "--workers", "1", "--request-timeout", "60", "--continue-on-failure", "--no-color",
           "--exclude-path", "/admin/reload",  # rescans the models folder: the same models again
           "--report", "junit", "--report-dir", str(report)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


def test_api_conforms_to_its_openapi(fuzz_run, fuzz_server):
    code, output = fuzz_run
    summary = output[output.rfind("SUMMARY"):] if "SUMMARY" in output else output[-3000:]
    assert code == 0, output[-20000:]
    cases = re.search(r"(\d+) generated", summary)
    assert cases and int(cases.group(1)) > 200, summary
    print(f"schemathesis, every check: {cases.group(0)} cases, exit {code}")  # shown with pytest -s / -rP
    # the fuzzer reached every model's inference code, not only its errors
    metrics = httpx.get(f"{fuzz_server.url}/metrics", timeout=10).text
    for model in MODELS:
        assert re.search(rf'^hf_serve_requests_total{{model="{model}",status="200"}} [1-9]', metrics, re.M), model


def test_server_healthy_after_fuzzing(fuzz_server):
    with fuzz_server.client() as client:
        assert client.get("/ready").status_code == 200
        assert client.post("/models/sentiment", json={"inputs": "still fine"}).status_code == 200
        assert fuzz_server.app.state.in_flight == 0
        metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics


def test_every_route_declares_the_error_body(fuzz_server):
    spec = fuzz_server.app.openapi()  # the template document, naming no model
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


def test_each_model_has_its_own_path_with_exactly_its_bodies(fuzz_server):
    spec = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    assert "/models/{name}" not in spec["paths"]  # its body depends on the model: one path per model instead
    assert {f"/models/{m}" for m in MODELS} <= set(spec["paths"])
    text = spec["paths"]["/models/sentiment"]
    assert set(text) == {"get", "post"}  # what OPTIONS' Allow says
    assert text["post"]["requestBody"]["content"] == {
        "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/TextClassificationRequest"}]}}}
    assert "415" not in text["post"]["responses"]
    image = spec["paths"]["/models/mobilenet"]["post"]
    assert set(image["requestBody"]["content"]) == {"application/json", "image/*", "application/octet-stream",
                                                    "multipart/form-data"}
    assert "415" in image["responses"] and "image-classification" in image["tags"]
    assert "text/event-stream" in spec["paths"]["/models/writer"]["post"]["responses"]["200"]["content"]
    # the server's caps are the document's limits
    schemas = spec["components"]["schemas"]
    assert schemas["GenerationParameters"]["properties"]["max_new_tokens"]["anyOf"][0]["maximum"] == 2
    assert schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 2
    # a folder that appears later gets its path in the next document
    shutil.copytree(Path(fuzz_server.app.state.settings.models_dir) / "sentiment", Path(fuzz_server.app.state.settings.models_dir) / "sentiment-2")
    try:
        assert httpx.post(f"{fuzz_server.url}/admin/reload", timeout=60).status_code == 200
        assert "/models/sentiment-2" in httpx.get(f"{fuzz_server.url}/openapi.json").json()["paths"]
    finally:
        shutil.rmtree(Path(fuzz_server.app.state.settings.models_dir) / "sentiment-2")
        httpx.post(f"{fuzz_server.url}/admin/reload", timeout=60)
