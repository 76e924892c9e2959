"""huggingface_hub.InferenceClient works unchanged against /models/{name}."""

from __future__ import annotations

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from tests.scores import assert_scores_close


@pytest.fixture(scope="module", autouse=True)
def _client_online():
    """huggingface_hub refuses *every* request, even to 127.0.0.1, when HF_HUB_OFFLINE=1 (read once at
    import). The server itself loads local folders only, so only the client side needs this."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield


@pytest.fixture(scope="module")
def client_for(live):
    def make(name: str, **kwargs) -> InferenceClient:
        return InferenceClient(model=f"{live.url}/models/{name}", **kwargs)

    return make


def test_text_classification(client_for, http):
    out = client_for("sentiment").text_classification("What a wonderful film")
    assert isinstance(out, list) and {o.label for o in out} == {"negative", "positive"}
    raw = http.post("/models/sentiment", json={"inputs": "What a wonderful film"}).json()[0]
    assert_scores_close([{"label": o.label, "score": o.score} for o in out], raw)
    top = client_for("topics").text_classification("x", top_k=1, function_to_apply="sigmoid")
    assert len(top) == 1 and 0 < top[0].score < 1


def test_text_generation(client_for, http):
    client = client_for("writer")
    text = client.text_generation("Hello world", max_new_tokens=6)
    raw = http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6}}).json()
    assert isinstance(text, str) and text == raw[0]["generated_text"]
    detailed = client.text_generation("Hello world", max_new_tokens=6, details=True)
    assert detailed.generated_text == text
    assert detailed.details.finish_reason == "length" and detailed.details.generated_tokens == 6
    assert [t.text for t in detailed.details.tokens] and "".join(t.text for t in detailed.details.tokens) == text
    sampled = client.text_generation("Hello", max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9, top_k=20,
                                     repetition_penalty=1.1, seed=3, stop=["zzzz"], return_full_text=True)
    assert sampled.startswith("Hello")


def test_text_generation_stream(client_for):
    client = client_for("writer")
    full = client.text_generation("Hello world", max_new_tokens=6)
    tokens = list(client.text_generation("Hello world", max_new_tokens=6, stream=True))
    assert len(tokens) == 6 and "".join(tokens) == full
    events = list(client.text_generation("Hello world", max_new_tokens=6, stream=True, details=True))
    assert events[-1].generated_text == full and events[-1].details.finish_reason == "length"
    assert all(e.generated_text is None for e in events[:-1])
    assert events[0].token.id >= 0 and events[0].token.special is False


def test_image_classification(client_for, cat_png, tmp_path):
    client = client_for("mobilenet")
    out = client.image_classification(cat_png)  # raw bytes, no content type
    assert {o.label for o in out} == {"cat", "dog", "bird"}
    path = tmp_path / "cat.png"
    path.write_bytes(cat_png)
    from_file = client.image_classification(path, top_k=2)  # with parameters: base64 JSON
    assert len(from_file) == 2
    assert [o.score for o in from_file] == pytest.approx([o.score for o in out[:2]], abs=1e-5)


def test_errors_reach_the_client(client_for):
    with pytest.raises(HfHubHTTPError) as exc:
        client_for("nope").text_classification("x")
    assert exc.value.response.status_code == 404
    from huggingface_hub.errors import ValidationError

    with pytest.raises(ValidationError):  # TGI-style error_type "validation"
        client_for("writer").text_generation("x", max_new_tokens=10**6)
