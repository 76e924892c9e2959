"""Security properties: API key on every route but the public ones, no remote code, no pickle unless
allowed, no URL fetching, CORS off by default, no request payloads in the logs.

Decision on the public routes: with an API key set, `/health`, the playground page `/` and the API
docs (`/docs`, `/redoc`, `/openapi.json`) stay open. They are static: the same bytes for every
deployment, no model names, no data (checked below). The page asks for the key and sends it.
"""

from __future__ import annotations

import hmac
import json
import logging
import shutil
import socket
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from service.app import PUBLIC_PATHS, create_app
from tests.service.service_helpers import LiveServer, Settings, make_models_dir, wait_ready

KEY = "k3y-" + "x" * 28
GOOD = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(pristine_models, tmp_path_factory):
    models_dir = make_models_dir(pristine_models, tmp_path_factory.mktemp("keyed"), ["sentiment", "mobilenet"])
    settings = Settings(models_dir=models_dir, reload_interval_s=0, api_key=KEY, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client, headers=GOOD)
        yield server, client


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app has, documented or not (our routers are
    included without a prefix; FastAPI keeps an included router as one entry of `app.routes`)."""
    out = []

    def walk(routes):
        for route in routes:
            if hasattr(route, "original_router"):
                walk(route.original_router.routes)
            for method in sorted(getattr(route, "methods", None) or []):
                if method != "HEAD":
                    out.append((method, route.path.replace("{name}", "sentiment")))

    walk(app.routes)
    return out


def test_every_route_but_the_public_ones_needs_the_key(keyed):
    server, client = keyed
    routes = every_route(server.app)
    assert len(routes) >= 10
    protected = [(m, p) for m, p in routes if p not in PUBLIC_PATHS]
    assert {"/models", "/models/sentiment", "/ready", "/metrics", "/admin/reload"} <= {p for _, p in protected}
    wrong_keys = [{}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"},
                  {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}, {"X-Api-Key": KEY},
                  {"Authorization": f"Bearer {KEY.upper()}"}]
    for method, path in protected:
        for headers in wrong_keys:
            response = client.request(method, path, headers=headers, json={"inputs": "x"})
            assert response.status_code == 401, (method, path, headers, response.status_code)
            body = response.json()
            # the /v1 routes answer in OpenAI's error shape
            assert (body["error"]["code"] if path.startswith("/v1/") else body["error_type"]) == "unauthorized"
        assert client.request(method, path, headers=GOOD, json={"inputs": "x"}).status_code != 401
    # a key in the query string is not a key either
    assert client.get(f"/models?api_key={KEY}").status_code == 401


def test_public_routes_hold_no_data(keyed):
    server, client = keyed
    for path in sorted(PUBLIC_PATHS - {"/docs/oauth2-redirect"}):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "sentiment" not in response.text and "mobilenet" not in response.text, path
        assert KEY not in response.text, path
    assert client.get("/health").json() == {"status": "ok"}
    # with the key, the document has one path per model; without it, the template path only
    assert "/models/sentiment" in client.get("/openapi.json", headers=GOOD).json()["paths"]
    assert "/models/{name}" in client.get("/openapi.json", headers={"Authorization": "Bearer nope"}).json()["paths"]


def test_key_is_compared_in_constant_time(keyed, monkeypatch):
    server, client = keyed
    calls, original = [], hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return original(a, b)

    monkeypatch.setattr("service.routes.deps.hmac.compare_digest", spy)
    assert client.get("/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/models", headers=GOOD).status_code == 200
    assert calls == [(bytes, bytes), (bytes, bytes)]


def test_non_ascii_authorization_header_is_a_401_not_a_crash(keyed):
    server, _ = keyed
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe\xc3\xa9\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.split()[1] == b"401"


# -- what is loaded -------------------------------------------------------------------------------

EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
class EvilConfig(BertConfig):
    pass
class EvilModel(BertForSequenceClassification):
    pass
class EvilTokenizer(BertTokenizerFast):
    pass
"""


class Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def test_no_remote_code_and_no_pickle_by_default(pristine_models, tmp_path):
    marker = tmp_path / "pwned"
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    # 1. a folder whose config and tokenizer point at custom code shipped beside them
    remote = shutil.copytree(pristine_models / "topics", models_dir / "remote-code")
    (remote / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((remote / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (remote / "tokenizer_config.json").write_text(json.dumps(tok_config))
    # 2. pickle weights with a payload, 3. legitimate pickle weights
    evil_bin = shutil.copytree(pristine_models / "topics", models_dir / "evil-bin")
    (evil_bin / "model.safetensors").unlink()
    torch.save({"weight": Exploit(str(marker))}, evil_bin / "pytorch_model.bin")
    plain_bin = shutil.copytree(pristine_models / "topics", models_dir / "plain-bin")
    torch.save(load_file(plain_bin / "model.safetensors"), plain_bin / "pytorch_model.bin")
    (plain_bin / "model.safetensors").unlink()

    for allow_pickle in (False, True):
        settings = Settings(models_dir=models_dir, reload_interval_s=0, allow_pickle=allow_pickle, _env_file=None)
        with LiveServer(settings) as server, server.client() as client:
            wait_ready(client)
            models = {m["name"]: m for m in client.get("/models").json()["models"]}
            # the custom code never runs: the folder is served with the library's own classes
            assert models["remote-code"]["status"] == "ready"
            assert models["remote-code"]["architecture"] == "BertForSequenceClassification"
            assert client.post("/models/remote-code", json={"inputs": "x"}).status_code == 200
            assert models["evil-bin"]["status"] == "failed"
            if allow_pickle:  # loaded with torch's weights_only unpickler: data yes, code no
                assert models["plain-bin"]["status"] == "ready", models["plain-bin"]
                assert client.post("/models/plain-bin", json={"inputs": "x"}).status_code == 200
            else:
                for name in ("evil-bin", "plain-bin"):
                    assert models[name]["status"] == "failed"
                    assert "HF_SERVE_ALLOW_PICKLE" in models[name]["error"]
                    response = client.post(f"/models/{name}", json={"inputs": "x"})
                    assert response.status_code == 503
        assert not marker.exists(), marker.read_text()


def test_allow_pickle_defaults_to_off(monkeypatch):
    assert Settings(_env_file=None).allow_pickle is False
    monkeypatch.setenv("HF_SERVE_ALLOW_PICKLE", "true")
    assert Settings(_env_file=None).allow_pickle is True


def test_urls_in_requests_are_never_fetched(live, http):
    """An http URL as `inputs` for image classification is refused; nothing connects to it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    connections = []

    def accept():
        for _ in range(6):
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            connections.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        for url in (f"http://127.0.0.1:{port}/cat.png", f"https://127.0.0.1:{port}/cat.png"):
            response = http.post("/models/mobilenet", json={"inputs": url})
            assert response.status_code == 422 and "not fetched" in response.json()["error"]
            raw = http.post("/models/mobilenet", content=url.encode(), headers={"content-type": "text/uri-list"})
            assert raw.status_code == 415
            as_bytes = http.post("/models/mobilenet", content=url.encode(), headers={"content-type": "image/png"})
            assert as_bytes.status_code == 415  # bytes are decoded as an image, never as an address
        text = http.post("/models/sentiment", json={"inputs": f"http://127.0.0.1:{port}/x"})
        assert text.status_code == 200  # a text that happens to be a URL is classified as text
        thread.join(5)
    finally:
        listener.close()
    assert connections == []


def test_cors_off_by_default_and_only_for_listed_origins(models_dir):
    settings = {"models_dir": models_dir, "reload_interval_s": 0, "preload": False, "_env_file": None}
    with TestClient(create_app(Settings(**settings))) as client:
        response = client.get("/health", headers={"Origin": "http://evil.example"})
        assert not any(h.startswith("access-control-") for h in response.headers)
    with TestClient(create_app(Settings(cors_origins=["http://ui.example"], **settings))) as client:
        allowed = client.get("/health", headers={"Origin": "http://ui.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://ui.example"
        other = client.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = client.options("/models/x", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-credentials" not in allowed.headers  # no cookies: the key is a header


def test_request_logs_never_contain_payloads(live, http, caplog, cat_png):
    secret = "SECRET-PAYLOAD-7f3a"
    with caplog.at_level(logging.DEBUG):
        assert http.post("/models/sentiment", json={"inputs": secret}).status_code == 200
        assert http.post("/models/sentiment", json={"inputs": [secret] * 40}).status_code == 422
        assert http.post("/models/sentiment", json={"inputs": secret, "parameters": {secret: 1}}).status_code == 422
        assert http.post("/models/sentiment", content=f'{{"inputs": "{secret}"'.encode(),
                         headers={"content-type": "application/json"}).status_code == 422
        assert http.post("/models/writer", json={"inputs": secret, "parameters": {"max_new_tokens": 2}}).status_code == 200
        assert http.post("/models/fragile", json={"inputs": secret + " the weather"}).status_code == 500
        assert http.post("/models/mobilenet", content=cat_png + secret.encode()).status_code == 200
        assert http.post("/models/mobilenet", json={"inputs": secret}).status_code == 422
    assert "POST /models/sentiment" in caplog.text  # requests are logged ...
    assert secret not in caplog.text  # ... their payloads never are


def test_invalid_body_error_messages_do_not_echo_the_input(http):
    secret = "SECRET-PAYLOAD-9b1c"
    for body in ({"inputs": 5, "parameters": {"top_k": secret}}, {"inputs": secret, "parameters": {"function_to_apply": secret}}):
        response = http.post("/models/sentiment", json=body)
        assert response.status_code == 422 and secret not in response.text
