"""Faults while serving: model files changing under running requests, corrupt weights, a model that
raises, and SIGTERM with a request in flight.

test_reload.py already covers an atomic replacement (rename) under traffic, a broken replacement
that keeps the old model, removal of an idle model and a half-written folder found by /admin/reload.
These add the non-atomic cases people actually do (`cp` over a served folder, `rm -rf` under load).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from test_reload import Hammer, swap_in, wait_for

from tests.scores import assert_scores_close, scores_close
from tests.service.service_helpers import (
    LiveServer,
    ServerProcess,
    Settings,
    build_tiny_bert,
    make_models_dir,
    wait_ready,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

class ScoreHammer(Hammer):
    """Like test_reload's Hammer, but remembers the scores too (same labels, different weights)."""

    def run(self):
        while not self.stop.is_set():
            response = self.client.post(f"/models/{self.name}", json={"inputs": "steady traffic"})
            self.results.append((response.status_code, response.json()[0] if response.status_code == 200 else []))


def slow_overwrite(src: Path, dst: Path, chunk: int = 256 * 1024, pause: float = 0.05) -> None:
    """What `cp src dst` does to a served file: truncate the same inode, then write it piece by piece."""
    data = src.read_bytes()
    with dst.open("r+b") as fh:
        fh.truncate(0)
        for start in range(0, len(data), chunk):
            fh.write(data[start:start + chunk])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(pause)


def test_weights_overwritten_in_place_while_serving(pristine_models, tmp_path):
    """A served model.safetensors truncated and rewritten in place (cp over it). With memory-mapped
    weights this killed the whole process with SIGBUS; now the old model serves until the new file is
    complete, then the new one does. Every request is a 200."""
    models_dir = make_models_dir(pristine_models, tmp_path / "models", ["topics"])
    new = build_tiny_bert(tmp_path / "retrained", labels=["sports", "politics", "science"], seed=9)
    server = ServerProcess(models_dir, "--reload-interval-s", "0.1")
    with server, server.client() as client, server.client() as hammer_client:
        before = client.post("/models/topics", json={"inputs": "steady traffic"}).json()[0]
        hammer = ScoreHammer(hammer_client, "topics")
        hammer.start()
        try:
            wait_for(lambda: len(hammer.results) > 5)
            slow_overwrite(new / "model.safetensors", models_dir / "topics" / "model.safetensors")
            after = wait_for(lambda: not scores_close(r := client.post("/models/topics", json={"inputs": "steady traffic"}).json()[0], before) and r)
            wait_for(lambda: len(hammer.results) > 5 and scores_close(hammer.results[-1][1], after))
        finally:
            hammer.stop.set()
            hammer.join(30)
        assert server.proc.poll() is None  # still alive (was: SIGBUS, the whole server gone)
        assert client.get("/health").status_code == 200
    assert {status for status, _ in hammer.results} == {200}
    # old model, then new model: nothing in between
    assert all(scores_close(row, before) or scores_close(row, after) for _, row in hammer.results)
    assert any(scores_close(row, before) for _, row in hammer.results)


def test_folder_deleted_and_copied_back_non_atomically_under_load(pristine_models, tmp_path):
    """rm -rf of a served folder under load, then a plain file-by-file copy back: requests see 200,
    then 404 (gone) or 503 (half-copied), then 200 again; never a 500."""
    models_dir = make_models_dir(pristine_models, tmp_path / "models", ["topics", "sentiment"])
    settings = Settings(models_dir=models_dir, reload_interval_s=0.1, _env_file=None)
    with LiveServer(settings) as server, server.client() as client, \
            server.client() as c1, server.client() as c2:
        wait_ready(client)
        hammers = [Hammer(c1, "topics"), Hammer(c2, "sentiment")]
        for hammer in hammers:
            hammer.start()
        try:
            wait_for(lambda: all(len(h.results) > 3 for h in hammers))
            shutil.rmtree(models_dir / "topics")
            wait_for(lambda: hammers[0].results[-1][0] == 404)
            # copy back file by file, slowly, config.json last: the scanner sees every partial state
            target = models_dir / "topics"
            target.mkdir()
            files = sorted((pristine_models / "topics").iterdir(), key=lambda p: p.name == "config.json")
            for path in files:
                shutil.copy(path, target / path.name)
                time.sleep(0.15)
            wait_for(lambda: hammers[0].results[-1][0] == 200)
        finally:
            for hammer in hammers:
                hammer.stop.set()
                hammer.join(30)
        statuses = Counter(status for status, _ in hammers[0].results)
        assert set(statuses) <= {200, 404, 503} and statuses[404] > 0, statuses
        assert {status for status, _ in hammers[1].results} == {200}  # the other model never noticed
        assert client.get("/health").status_code == 200


def test_corrupt_tensor_bytes_keep_the_old_model(pristine_models, tmp_path):
    """A well-formed safetensors file whose tensor bytes are garbage (NaN logits) is refused by the
    load-time smoke test: the old model keeps serving instead of answering every request with a 500."""
    models_dir = make_models_dir(pristine_models, tmp_path / "models", ["sentiment"])
    settings = Settings(models_dir=models_dir, reload_interval_s=0, _env_file=None)
    broken = shutil.copytree(pristine_models / "sentiment", tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)  # 0xffffffff is a float32 NaN
    weights.write_bytes(bytes(data))
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        before = client.post("/models/sentiment", json={"inputs": "x"}).json()
        swap_in(broken, models_dir, "sentiment")
        summary = client.post("/admin/reload").json()
        assert summary["failed"] == ["sentiment"]
        info = client.get("/models/sentiment").json()
        assert info["status"] == "ready" and "NaN" in info["error"]
        assert_scores_close(client.post("/models/sentiment", json={"inputs": "x"}).json(), before)
        # as a new folder it is listed as failed with the reason, and its requests are 503s
        shutil.copytree(broken, models_dir / "nan-model")
        client.post("/admin/reload")
        response = client.post("/models/nan-model", json={"inputs": "x"})
        assert response.status_code == 503 and "NaN" in response.json()["error"]


def test_model_that_raises_logs_the_error_id(pristine_models, tmp_path, caplog):
    models_dir = make_models_dir(pristine_models, tmp_path / "models", ["fragile", "sentiment"])
    settings = Settings(models_dir=models_dir, reload_interval_s=0, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            failures = [client.post("/models/fragile", json={"inputs": "the weather is lovely"}) for _ in range(3)]
            ok = [client.post("/models/sentiment", json={"inputs": "fine"}) for _ in range(3)]
        ids = []
        for response in failures:
            assert response.status_code == 500 and response.json()["error_type"] == "inference"
            ids.append(response.json()["error"].split("error id ")[1].rstrip(")"))
        assert len(set(ids)) == 3  # one id per failure
        for error_id in ids:
            records = [r for r in caplog.records if error_id in r.getMessage()]
            assert records and records[0].levelno == logging.ERROR and records[0].exc_info is not None
            assert "IndexError" in caplog.text  # the traceback is in the log, not in the response
        assert all(r.status_code == 200 for r in ok)


def test_sigterm_drains_in_flight_requests(pristine_models, tmp_path):
    """SIGTERM while requests are inside the server: a request whose body is still arriving and a
    streaming generation both complete, new connections are refused, and the process exits by itself."""
    models_dir = make_models_dir(pristine_models, tmp_path / "models", ["sentiment", "writer"])
    server = ServerProcess(models_dir, "--reload-interval-s", "0")
    host, port = "127.0.0.1", server.port
    body = json.dumps({"inputs": "drain me"}).encode()
    with server:
        # 1. a request half-sent: in flight for certain, however fast the model is
        upload = socket.create_connection((host, port), timeout=60)
        upload.sendall(f"POST /models/sentiment HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        # 2. a stream that has started
        stream_client = httpx.Client(base_url=server.url, timeout=60)
        stream = stream_client.stream("POST", "/models/writer", json={"inputs": "Hello", "stream": True,
                                                                       "parameters": {"max_new_tokens": 100}})
        response = stream.__enter__()
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        time.sleep(0.3)  # the upload's headers are parsed and its body is being read

        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.post(f"{server.url}/models/sentiment", json={"inputs": "too late"}, timeout=5)
        events = [first, *(line for line in lines if line.startswith("data:"))]
        stream.__exit__(None, None, None)
        stream_client.close()
        upload.sendall(body[5:])
        data = b""
        while chunk := upload.recv(65536):
            data += chunk
        upload.close()
        code = server.proc.wait(timeout=60)
    out = server.output
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", data[:500]
    assert len(json.loads(payload)[0]) == 2
    last = json.loads(events[-1][5:])
    assert len(events) == last["details"]["generated_tokens"] > 0  # the stream ran to its end
    assert "Finished server process" in out, out[-2000:]
    # uvicorn re-raises the SIGTERM once it has drained; hf-serve turns that into a clean exit 0.
    assert code == 0, (code, out[-2000:])


def test_short_soak(tmp_path):
    """benchmarks/soak.py for 10 s: 32 clients over a limit of 16 for 5 s, then 8 (no 429 may happen),
    all four tasks and bad requests (tiny models). No unexpected outcome (no 5xx, no timeout), the overflow
    answered with 429s, in-flight never above the limit, RSS within 10 % from seconds 2-4 to the last
    2 s (a leak of the tiny models' requests shows at that scale; `make bench-soak` holds 5 % for
    10 minutes)."""
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--duration", "10", "--clients", "32",
                             "--max-concurrent", "16", "--tiny", "--max-rss-growth", "10", "--json", str(out),
                             # one warm-up burst: on a slow CPU five would use up the 10 s before any bad request
                             "--warmup-bursts", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["unexpected"] == {} and summary["problems"] == []
    assert summary["ok_200"] > 0 and summary["rejected_429"] > 0 and summary["expected_4xx"] > 0
    assert summary["max_in_flight"] <= 16
    # several kinds, good and bad (10 s on a busy 2-core CPU draws only a few dozen requests: which
    # kinds is luck; the 10-minute soak draws them all)
    drawn = set(summary["by_kind"]) - {"warmup"}
    assert len(drawn) >= 3 and drawn & {"classify", "classify_batch", "image_raw", "generate"}, summary["by_kind"]
    assert summary["phases"]["under"]["rejected_429"] == 0
    assert summary["server_log_errors"] == 0
