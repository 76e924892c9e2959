"""No request holds the server past its deadline: a forward pass that blocks answers 504, the other
models keep being served (a fresh torch thread takes over), and the blocked model is listed as
failed and reloaded from its folder. Health routes of the KServe Open Inference Protocol."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.service.service_helpers import LiveServer, Settings, wait_ready
from tests.tiny_models import build_tiny_bert, build_tiny_gpt2

pytestmark = pytest.mark.slow


@pytest.fixture
def stall_dir(tmp_path):
    build_tiny_bert(tmp_path / "stuck", labels=["a", "b"])
    build_tiny_bert(tmp_path / "fine", labels=["x", "y"], seed=1)
    build_tiny_gpt2(tmp_path / "writer")
    return tmp_path


def block_forward(live, name: str) -> threading.Event:
    """Make a served model's forward pass block until the event is set (as a deadlocked kernel would)."""
    release = threading.Event()
    model = live.app.state.registry.entries[name].runner.model
    real = model.forward

    def blocked(*args, **kwargs):
        release.wait(120)
        return real(*args, **kwargs)

    model.forward = blocked
    return release


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_a_hung_forward_pass_gets_504_and_stalls_nothing_else(stall_dir):
    settings = Settings(models_dir=stall_dir, reload_interval_s=0, request_timeout_s=1.5, _env_file=None)
    with LiveServer(settings) as live, live.client() as client:
        wait_ready(client)
        release = block_forward(live, "stuck")
        try:
            started = time.monotonic()
            hung = client.post("/models/stuck", json={"inputs": "hello"})
            assert hung.status_code == 504 and hung.json()["error_type"] == "timeout", hung.text
            assert time.monotonic() - started < 10
            # the other models answer although the old torch thread is still blocked
            assert client.post("/models/fine", json={"inputs": "hello"}).status_code == 200
            out = client.post("/models/writer", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
            assert out.status_code == 200
            # the hung model was listed as failed with the reason, then reloaded from its folder
            reloaded = wait_for(lambda: (m := client.get("/models/stuck").json())["status"] == "ready" and m)
            assert reloaded["status"] == "ready"
            assert client.post("/models/stuck", json={"inputs": "hello"}).status_code == 200
            metrics = client.get("/metrics").text
            assert 'hf_serve_model_loads_total{outcome="hung"} 1.0' in metrics
        finally:
            release.set()


def test_a_stream_that_stops_producing_tokens_ends_with_a_timeout(stall_dir):
    settings = Settings(models_dir=stall_dir, reload_interval_s=0, request_timeout_s=1.5, _env_file=None)
    with LiveServer(settings) as live, live.client() as client:
        wait_ready(client)
        model = live.app.state.registry.entries["writer"].runner.model
        real, calls, release = model.forward, [], threading.Event()

        def slow_after_two(*args, **kwargs):
            calls.append(1)
            if len(calls) > 2:
                release.wait(60)
            return real(*args, **kwargs)

        model.forward = slow_after_two
        try:
            events = []
            with client.stream("POST", "/models/writer", json={"inputs": "Hi", "stream": True,
                                                                "parameters": {"max_new_tokens": 20}}) as response:
                assert response.status_code == 200
                events = [line for line in response.iter_lines() if line.startswith("data:")]
            assert '"error_type": "timeout"' in events[-1] and len(events) <= 4
        finally:
            release.set()


def test_kserve_health_routes(stall_dir):
    settings = Settings(models_dir=stall_dir, reload_interval_s=0, api_key="k", _env_file=None)
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        assert client.get("/v2/health/live").json() == {"live": True}  # no key needed: probes
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        key = {"Authorization": "Bearer k"}
        assert client.get("/v2/models/fine/ready", headers=key).json() == {"name": "fine", "ready": True}
        assert client.get("/v2/models/nope/ready", headers=key).status_code == 404
        assert client.get("/v2/models/fine/ready").status_code == 401
