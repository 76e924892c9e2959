"""API key, 429 over the concurrency limit, lazy loading, CORS."""

from __future__ import annotations

import time

import pytest

from tests.service.service_helpers import LiveServer, Settings, make_models_dir, wait_ready


@pytest.fixture(scope="module")
def small_dir(pristine_models, tmp_path_factory):
    return make_models_dir(pristine_models, tmp_path_factory.mktemp("ops"), ["sentiment", "writer"])


def test_api_key(small_dir):
    settings = Settings(models_dir=small_dir, reload_interval_s=0, api_key="s3cret", _env_file=None)
    good = {"Authorization": "Bearer s3cret"}
    with LiveServer(settings) as server, server.client() as client:
        assert client.get("/health").status_code == 200  # always open
        assert client.get("/").status_code == 200  # the static page; it sends the key itself
        wait_ready(client, headers=good)
        for method, path in [("GET", "/models"), ("GET", "/models/sentiment"), ("GET", "/ready"), ("GET", "/metrics"),
                             ("POST", "/models/sentiment"), ("POST", "/admin/reload")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
                response = client.request(method, path, headers=headers, json={"inputs": "x"})
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error_type"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        ok = client.post("/models/sentiment", json={"inputs": "x"}, headers=good)
        assert ok.status_code == 200
        assert client.get("/models", headers=good).status_code == 200

        import huggingface_hub.constants
        from huggingface_hub import InferenceClient

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            out = InferenceClient(model=f"{server.url}/models/sentiment", token="s3cret").text_classification("x")
        assert len(out) == 2


def test_429_over_max_concurrent_requests(small_dir):
    """32 requests at once against a server that allows one in flight: the overflow is refused
    with 429 + Retry-After (never queued without bound, never an error), and every slot comes back."""
    import asyncio

    import httpx

    settings = Settings(models_dir=small_dir, reload_interval_s=0, max_concurrent_requests=1, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        long_inputs = ["a long review that keeps the model busy for a while " * 8] * 8

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                return await asyncio.gather(*[http.post("/models/sentiment", json={"inputs": long_inputs})
                                              for _ in range(32)])

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
        for rejected in (r for r in responses if r.status_code == 429):
            assert rejected.headers["retry-after"] == "1" and rejected.json()["error_type"] == "overloaded"
        assert client.get("/health").status_code == 200
        assert client.post("/models/sentiment", json={"inputs": "c"}).status_code == 200  # the slot came back
        assert server.app.state.in_flight == 0
        assert f"hf_serve_rejected_total {float(codes.count(429))}" in client.get("/metrics").text


def test_streams_release_their_slot(small_dir):
    settings = Settings(models_dir=small_dir, reload_interval_s=0, max_concurrent_requests=2, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        for _ in range(5):  # more streams than slots, one after another
            with client.stream("POST", "/models/writer", json={"inputs": "Hi", "stream": True,
                                                               "parameters": {"max_new_tokens": 3}}) as response:
                assert response.status_code == 200
                assert sum(1 for line in response.iter_lines() if line.startswith("data:")) == 3
        # a client that leaves after the first event
        with client.stream("POST", "/models/writer", json={"inputs": "Hi", "stream": True,
                                                           "parameters": {"max_new_tokens": 100}}) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 30
        while server.app.state.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.app.state.in_flight == 0
        assert client.post("/models/writer", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_lazy_loading(small_dir):
    settings = Settings(models_dir=small_dir, reload_interval_s=0, preload=False, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        statuses = {m["name"]: m["status"] for m in client.get("/models").json()["models"]}
        assert statuses == {"sentiment": "available", "writer": "available"}
        assert client.get("/models/sentiment").json()["labels"] == ["negative", "positive"]
        assert client.post("/models/sentiment", json={"inputs": "x"}).status_code == 200
        statuses = {m["name"]: m["status"] for m in client.get("/models").json()["models"]}
        assert statuses == {"sentiment": "ready", "writer": "available"}


def test_cors_off_by_default_and_on_when_set(small_dir):
    from fastapi.testclient import TestClient

    from service.app import create_app

    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    off = create_app(Settings(models_dir=small_dir, reload_interval_s=0, preload=False, _env_file=None))
    with TestClient(off) as client:
        assert "access-control-allow-origin" not in client.options("/models/sentiment", headers=preflight).headers
    on = create_app(Settings(models_dir=small_dir, reload_interval_s=0, preload=False,
                             cors_origins=["http://ui.example"], _env_file=None))
    with TestClient(on) as client:
        response = client.options("/models/sentiment", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://ui.example"


def test_hf_serve_console_entry_point(small_dir, tmp_path):
    """`python -m service` (= hf-serve) with flags, as a real subprocess."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--models-dir", str(small_dir), "--port", str(port), "--reload-interval-s", "0",
         "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        response = httpx.post(f"http://127.0.0.1:{port}/models/sentiment", json={"inputs": "hello"}, timeout=30)
        assert response.status_code == 200 and len(response.json()[0]) == 2
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert b"POST /models/sentiment" in out  # the request was logged ...
    assert b"hello" not in out  # ... but never its payload
