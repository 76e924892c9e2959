"""Hot reload while requests run: add, replace (good and broken) and remove folders."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from tests.service.service_helpers import LiveServer, Settings, build_tiny_bert, make_models_dir, wait_ready


def swap_in(src, models_dir, name: str) -> None:
    """What training does: write a hidden folder beside the target, then rename it into place."""
    tmp = models_dir / f".{name}.tmp"
    shutil.copytree(src, tmp)
    target = models_dir / name
    if target.exists():
        old = models_dir / f".{name}.old"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


class Hammer(threading.Thread):
    """Keeps sending requests to one model and records every status code and label set."""

    def __init__(self, client, name: str):
        super().__init__(daemon=True)
        self.client, self.name = client, name
        self.stop = threading.Event()
        self.results: list[tuple[int, frozenset]] = []

    def run(self):
        while not self.stop.is_set():
            response = self.client.post(f"/models/{self.name}", json={"inputs": "steady traffic"})
            labels = frozenset(d["label"] for d in response.json()[0]) if response.status_code == 200 else frozenset()
            self.results.append((response.status_code, labels))


@pytest.mark.slow
def test_hot_reload_under_traffic(pristine_models, tmp_path):
    models_dir = make_models_dir(pristine_models, tmp_path / "models", ["sentiment", "topics", "mobilenet"])
    settings = Settings(models_dir=models_dir, reload_interval_s=0.2, _env_file=None)
    with LiveServer(settings) as server, server.client() as client, server.client() as hammer_client:
        wait_ready(client)

        def models():
            return {m["name"]: m for m in client.get("/models").json()["models"]}

        hammer = Hammer(hammer_client, "topics")
        hammer.start()
        try:
            # add: a new folder appears and is served without restart
            swap_in(pristine_models / "writer", models_dir, "writer")
            wait_for(lambda: models().get("writer", {}).get("status") == "ready")
            assert client.post("/models/writer", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200

            # replace: topics becomes a 2-label model while the hammer keeps calling it
            replacement = build_tiny_bert(tmp_path / "new-topics", labels=["ham", "spam"], seed=5)
            swap_in(replacement, models_dir, "topics")
            wait_for(lambda: models()["topics"]["labels"] == ["ham", "spam"])
            wait_for(lambda: len(hammer.results) > 0 and hammer.results[-1][1] == {"ham", "spam"})

            # a broken replacement keeps the old model serving, and says so
            broken = shutil.copytree(pristine_models / "corrupt", tmp_path / "broken-sentiment")
            swap_in(broken, models_dir, "sentiment")
            wait_for(lambda: (models()["sentiment"].get("error") or "").startswith("replacement not loaded"))
            assert models()["sentiment"]["status"] == "ready"
            still = client.post("/models/sentiment", json={"inputs": "x"})
            assert still.status_code == 200 and {d["label"] for d in still.json()[0]} == {"negative", "positive"}

            # remove: the folder goes, the model goes
            shutil.rmtree(models_dir / "mobilenet")
            wait_for(lambda: "mobilenet" not in models())
            gone = client.post("/models/mobilenet", json={"inputs": "aGk="})
            assert gone.status_code == 404 and gone.json()["error"].endswith("Known models: sentiment, topics, writer")
        finally:
            hammer.stop.set()
            hammer.join(30)
        statuses = {status for status, _ in hammer.results}
        assert statuses == {200}, statuses  # no request failed during any of it
        label_sets = [labels for _, labels in hammer.results]
        assert label_sets[0] == {"sports", "politics", "science"} and label_sets[-1] == {"ham", "spam"}
        assert set(label_sets) == {label_sets[0], label_sets[-1]}  # each answer from one whole model
        assert client.get("/health").status_code == 200


def test_admin_reload_without_polling(pristine_models, tmp_path):
    models_dir = make_models_dir(pristine_models, tmp_path / "models", ["topics"])
    settings = Settings(models_dir=models_dir, reload_interval_s=0, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        assert client.post("/models/sentiment", json={"inputs": "x"}).status_code == 404
        swap_in(pristine_models / "sentiment", models_dir, "sentiment")
        shutil.copytree(pristine_models / "no-config", models_dir / "half-written")
        summary = client.post("/admin/reload").json()
        assert summary["added"] == ["sentiment"] and summary["failed"] == ["half-written"]
        assert summary["unchanged"] == ["topics"]
        assert client.post("/models/sentiment", json={"inputs": "x"}).status_code == 200
        # the half-written folder is completed later: the next scan loads it
        shutil.copy(pristine_models / "topics" / "config.json", models_dir / "half-written" / "config.json")
        assert client.post("/admin/reload").json()["added"] == ["half-written"]
        assert client.post("/models/half-written", json={"inputs": "x"}).status_code == 200
        assert client.post("/admin/reload").json()["unchanged"] == ["half-written", "sentiment", "topics"]
