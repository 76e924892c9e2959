"""service/tasks/feature_extraction.py: sentence embeddings from the real all-MiniLM-L6-v2, equal to
sentence-transformers' mean pooling computed by hand, through HTTP and `InferenceClient`."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest
import torch
from huggingface_hub import InferenceClient

from service.folders import inspect_folder
from service.tasks.feature_extraction import pool, read_pooling
from tests.service.service_helpers import LiveServer, Settings, minilm_dir, wait_ready

SENTENCES = ["A gorgeous, witty, seductive movie.", "The plot is thin and the acting is wooden.",
             "I have no opinion about this film at all", "x"]


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-models")
    shutil.copytree(minilm_dir(), root / "minilm")  # its card says pipeline_tag: sentence-similarity
    shutil.copytree(minilm_dir(), root / "minilm-nocard")
    (root / "minilm-nocard" / "README.md").unlink()  # still a sentence-transformers folder (modules.json)
    return root


@pytest.fixture(scope="module")
def server(embed_dir):
    with LiveServer(Settings(models_dir=embed_dir, reload_interval_s=0, max_batch_wait_ms=20, _env_file=None)) as live, \
            live.client() as client:
        wait_ready(client)
        yield live, client


@pytest.fixture(scope="module")
def by_hand():
    """sentence-transformers' recipe for this model, written out: mean of the token states under
    the attention mask, then L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir()).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1)


def cosine(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def test_recognised_from_card_or_modules_json(embed_dir):
    assert inspect_folder(embed_dir / "minilm").task == "feature-extraction"
    assert inspect_folder(embed_dir / "minilm-nocard").task == "feature-extraction"
    assert read_pooling(embed_dir / "minilm") == "mean_tokens"


def test_vectors_match_sentence_transformers_pooling(server, by_hand):
    _, client = server
    response = client.post("/models/minilm", json={"inputs": SENTENCES})
    assert response.status_code == 200 and "x-inference-time" in response.headers
    vectors = response.json()
    assert len(vectors) == len(SENTENCES) and all(len(v) == 384 for v in vectors)
    for got, expected in zip(vectors, by_hand.tolist(), strict=True):
        assert cosine(got, expected) > 0.9999
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-4)
    single = client.post("/models/minilm-nocard", json={"inputs": SENTENCES[0]}).json()
    assert len(single) == 1 and cosine(single[0], by_hand[0].tolist()) > 0.9999  # a string: still one list


def test_inference_client_unchanged(server, by_hand, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the client refuses even loopback otherwise
    live, _ = server
    client = InferenceClient(model=f"{live.url}/models/minilm")
    array = client.feature_extraction(SENTENCES[1])
    assert array.shape == (1, 384) and array.dtype == np.float32
    assert cosine(array[0].tolist(), by_hand[1].tolist()) > 0.9999
    raw = client.feature_extraction(SENTENCES[1], normalize=False, truncate=True)
    assert np.linalg.norm(raw[0]) > 1.5  # MiniLM's mean-pooled states are not unit length
    similarities = client.sentence_similarity(SENTENCES[0], other_sentences=SENTENCES[1:3])
    assert similarities == pytest.approx([float(by_hand[0] @ by_hand[i]) for i in (1, 2)], abs=1e-4)


def test_parameters(server):
    _, client = server
    short = client.post("/models/minilm", json={"inputs": "hello", "dimensions": 8}).json()[0]
    assert len(short) == 8 and np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)  # normalised after the cut
    long_text = "word " * 400
    assert client.post("/models/minilm", json={"inputs": long_text}).status_code == 200
    refused = client.post("/models/minilm", json={"inputs": long_text, "truncate": False})
    assert refused.status_code == 422 and "tokens" in refused.json()["error"]
    left = client.post("/models/minilm", json={"inputs": long_text + "end", "truncation_direction": "left"})
    assert left.status_code == 200
    for body, needle in (({"inputs": "x", "prompt_name": "query"}, "prompt"), ({"inputs": "x", "dimensions": 999}, "dimensions"),
                         ({"inputs": []}, "inputs"), ({"inputs": "x", "parameters": {}}, "parameters"),
                         ({"inputs": "x", "encoding_format": "base64"}, "encoding_format")):
        response = client.post("/models/minilm", json=body)
        assert response.status_code == 422 and needle in response.json()["error"], (body, response.text)


def test_concurrent_requests_share_forward_passes_and_answers(server):
    live, client = server
    alone = [client.post("/models/minilm", json={"inputs": s}).json()[0] for s in SENTENCES * 4]
    worker = live.app.state.registry.entries["minilm"].worker
    before = worker.batches

    async def fire():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/models/minilm", json={"inputs": s}) for s in SENTENCES * 4))

    together = [r.json()[0] for r in asyncio.run(fire())]
    assert all(cosine(a, b) > 0.99999 for a, b in zip(alone, together, strict=True))
    assert worker.batches - before < len(alone)


def test_pooling_modes_with_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(pool(hidden, right, "cls_token"), hidden[:, 0])
    assert torch.equal(pool(hidden, right, "lasttoken"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool(hidden, left, "lasttoken"), hidden[:, 3])
    assert torch.allclose(pool(hidden, right, "mean_tokens")[1], hidden[1, :2].mean(0))
    assert torch.equal(pool(hidden, right, "max_tokens")[1], hidden[1, 1])
    assert torch.allclose(pool(hidden, right, "mean_sqrt_len_tokens")[1], hidden[1, :2].sum(0) / 2 ** 0.5)
