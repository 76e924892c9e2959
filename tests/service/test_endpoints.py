"""Every route and parameter against one real server (uvicorn on a loopback port)."""

from __future__ import annotations

import base64
import json
import math

import pytest

from tests.scores import assert_scores_close
from tests.service.service_helpers import BROKEN, GOOD


def test_health_ready_docs(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"] == {"ready": len(GOOD), "failed": len(BROKEN)}
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()  # one path per model (service/openapi_doc.py)
    assert {f"/models/{name}" for name in GOOD + BROKEN} <= set(spec["paths"]) and "/models/{name}" not in spec["paths"]
    assert "post" in spec["paths"]["/models/sentiment"] and "get" in spec["paths"]["/models/sentiment"]


def test_models_lists_good_and_failed_folders(http):
    models = {m["name"]: m for m in http.get("/models").json()["models"]}
    assert set(models) == set(GOOD) | set(BROKEN)  # the hidden folder is not there
    assert {n for n, m in models.items() if m["status"] == "ready"} == set(GOOD)
    assert "safetensors" in models["corrupt"]["error"]
    assert models["no-config"]["error"] == "no config.json"
    assert models["writer"]["task"] == "text-generation"
    assert models["topics"]["task"] == "text-classification" and models["topics"]["card"] == {}


def test_model_details(http):
    info = http.get("/models/sentiment").json()
    assert info["labels"] == ["negative", "positive"]
    assert info["card"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "model-index" not in info["card"]
    assert info["metrics"][0]["value"] == 0.81 and info["results"]["eval_accuracy"] == 0.81
    missing = http.get("/models/nope")
    assert missing.status_code == 404 and "sentiment" in missing.json()["error"]


def test_text_classification_shapes(http):
    one = http.post("/models/sentiment", json={"inputs": "a fine film"})
    assert one.status_code == 200
    body = one.json()
    assert len(body) == 1 and [d["label"] for d in body[0]] != []  # one list per input
    assert {d["label"] for d in body[0]} == {"negative", "positive"}
    assert math.isclose(sum(d["score"] for d in body[0]), 1.0, rel_tol=1e-5)
    assert body[0][0]["score"] >= body[0][1]["score"]
    for header in ("x-queue-time", "x-inference-time"):
        assert float(one.headers[header]) >= 0
    many = http.post("/models/sentiment", json={"inputs": ["good", "bad", "ugly"]}).json()
    assert len(many) == 3 and all(len(r) == 2 for r in many)
    assert_scores_close(many[0], http.post("/models/sentiment", json={"inputs": ["good"]}).json()[0])


def test_text_classification_parameters(http):
    top1 = http.post("/models/topics", json={"inputs": "x", "parameters": {"top_k": 1}}).json()[0]
    assert len(top1) == 1
    full = http.post("/models/topics", json={"inputs": "x"}).json()[0]
    assert len(full) == 3 and top1[0]["label"] == full[0]["label"]
    assert top1[0]["score"] == pytest.approx(full[0]["score"], abs=1e-5)
    raw = http.post("/models/topics", json={"inputs": "x", "parameters": {"function_to_apply": "none"}}).json()[0]
    sig = http.post("/models/topics", json={"inputs": "x", "parameters": {"function_to_apply": "sigmoid"}}).json()[0]
    by_label = {d["label"]: d["score"] for d in raw}
    for d in sig:
        assert math.isclose(d["score"], 1 / (1 + math.exp(-by_label[d["label"]])), rel_tol=1e-5)
    soft = {d["label"]: d["score"] for d in full}
    denom = sum(math.exp(v) for v in by_label.values())
    for label, logit in by_label.items():
        assert math.isclose(soft[label], math.exp(logit) / denom, rel_tol=1e-5)


def test_long_inputs_truncate_or_refuse(http):
    long_text = "word " * 1000
    assert http.post("/models/sentiment", json={"inputs": long_text}).status_code == 200
    refused = http.post("/models/sentiment", json={"inputs": long_text, "parameters": {"truncate": False}})
    assert refused.status_code == 422 and "tokens" in refused.json()["error"]


def test_gpt2_classifier_batches_with_padding(http):
    texts = ["short", "a much longer sentence than the first one"]
    together = http.post("/models/gpt2-cls", json={"inputs": texts}).json()
    for text, result in zip(texts, together, strict=True):
        alone = http.post("/models/gpt2-cls", json={"inputs": text}).json()[0]
        assert [d["label"] for d in alone] == [d["label"] for d in result]
        for a, b in zip(alone, result, strict=True):
            assert abs(a["score"] - b["score"]) < 1e-5


def test_image_classification_raw_b64_multipart(http, cat_png, coffee_jpeg):
    raw = http.post("/models/mobilenet", content=cat_png, headers={"content-type": "image/png"})
    assert raw.status_code == 200 and "x-inference-time" in raw.headers
    labels = raw.json()
    assert {d["label"] for d in labels} == {"cat", "dog", "bird"}
    b64 = http.post("/models/mobilenet", json={"inputs": base64.b64encode(cat_png).decode(), "parameters": {"top_k": 2}})
    assert b64.status_code == 200 and len(b64.json()) == 2
    assert_scores_close(b64.json(), [d for d in labels if d["label"] in {e["label"] for e in b64.json()}])
    data_url = "data:image/png;base64," + base64.b64encode(cat_png).decode()
    assert_scores_close(http.post("/models/mobilenet", json={"inputs": data_url}).json(), labels)
    multipart = http.post("/models/mobilenet", files={"file": ("cat.png", cat_png, "image/png")}, data={"top_k": "1"})
    assert multipart.status_code == 200 and len(multipart.json()) == 1
    assert multipart.json()[0]["score"] == pytest.approx(labels[0]["score"], abs=1e-5)
    multipart_params = http.post("/models/mobilenet", files={"image": ("c.jpg", coffee_jpeg, "image/jpeg")},
                                 data={"parameters": json.dumps({"function_to_apply": "none"})})
    assert multipart_params.status_code == 200 and len(multipart_params.json()) == 3
    octet = http.post("/models/resnet", content=coffee_jpeg, headers={"content-type": "application/octet-stream"})
    assert octet.status_code == 200 and len(octet.json()) == 3


def test_image_determinism(http, cat_png):
    a = http.post("/models/resnet", content=cat_png, headers={"content-type": "image/png"}).json()
    b = http.post("/models/resnet", content=cat_png, headers={"content-type": "image/png"}).json()
    assert_scores_close(a, b)


def test_generation_parameters(http):
    greedy = http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6}})
    assert greedy.status_code == 200 and "x-queue-time" in greedy.headers
    text = greedy.json()[0]["generated_text"]
    assert text == http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6}}).json()[0]["generated_text"]
    full = http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6, "return_full_text": True}}).json()
    assert full[0]["generated_text"] == "Hello world" + text
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95,
               "repetition_penalty": 1.2, "seed": 7}
    s1 = http.post("/models/writer", json={"inputs": "Hello", "parameters": sampled}).json()
    s2 = http.post("/models/writer", json={"inputs": "Hello", "parameters": sampled}).json()
    assert s1 == s2  # same seed, same text
    details = http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 5, "details": True,
                                                                                         "decoder_input_details": True}}).json()[0]
    d = details["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5 == len(d["tokens"])
    assert [t["id"] for t in d["prefill"]] == [15496, 995]  # the real GPT-2 tokenizer
    assert "".join(t["text"] for t in d["tokens"]) == details["generated_text"]
    assert all(t["logprob"] <= 0 for t in d["tokens"])


def test_generation_stop_sequence(http):
    text = http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6}}).json()[0]["generated_text"]
    stop = text.split()[0]
    stopped = http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6, "stop": [stop], "details": True}}).json()[0]
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop) and len(stopped["generated_text"]) <= len(text)


def sse_events(response) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]


def test_generation_stream(http):
    body = {"inputs": "Hello world", "stream": True, "parameters": {"max_new_tokens": 5}}
    with http.stream("POST", "/models/writer", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert len(events) == 5 and [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 5
    assert set(events[0]["token"]) == {"id", "text", "logprob", "special"}
    plain = http.post("/models/writer", json={**body, "stream": False}).json()[0]["generated_text"]
    assert plain == last["generated_text"]


@pytest.mark.parametrize(("model", "body", "needle"), [
    ("sentiment", {"inputs": 5}, "inputs"),
    ("sentiment", {"inputs": []}, "inputs"),
    ("sentiment", {"text": "x"}, "inputs"),
    ("sentiment", {"inputs": "x", "parameters": {"top_k": 0}}, "parameters.top_k"),
    ("sentiment", {"inputs": "x", "parameters": {"function_to_apply": "relu"}}, "parameters.function_to_apply"),
    ("sentiment", {"inputs": "x", "parameters": {"nope": 1}}, "parameters.nope"),
    ("sentiment", {"inputs": ["x"] * 33}, "inputs"),
    ("writer", {"inputs": "x", "parameters": {"temperature": 0}}, "parameters.temperature"),
    ("writer", {"inputs": "x", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
    ("writer", {"inputs": "x", "parameters": {"max_new_tokens": 100000}}, "parameters.max_new_tokens"),
    ("writer", {"inputs": "x", "parameters": {"watermark": True}}, "parameters.watermark"),
    ("writer", {"inputs": "x", "parameters": {"best_of": 2}}, "parameters.best_of"),
    ("writer", {"inputs": "", "parameters": {}}, "inputs"),
    ("writer", {"inputs": "x", "stream": "maybe"}, "stream"),
    ("mobilenet", {"inputs": "!!not base64!!"}, "inputs"),
    ("mobilenet", {"inputs": "aGVsbG8=", "parameters": {"top_k": -1}}, "parameters.top_k"),
])
def test_invalid_bodies_are_422_naming_the_field(http, model, body, needle):
    response = http.post(f"/models/{model}", json=body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert payload["error_type"] == "validation" and needle in payload["error"]


def test_not_json_and_wrong_media(http):
    bad = http.post("/models/sentiment", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "JSON" in bad.json()["error"]
    empty = http.post("/models/sentiment", content=b"")
    assert empty.status_code == 422
    garbage = http.post("/models/mobilenet", content=b"\x89PNG garbage", headers={"content-type": "image/png"})
    assert garbage.status_code == 415 and garbage.json()["error_type"] == "unsupported_media_type"
    text = http.post("/models/mobilenet", content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415
    two_files = http.post("/models/mobilenet", files={"a": ("a.png", b"x"), "b": ("b.png", b"y")})
    assert two_files.status_code == 422
    b64_garbage = http.post("/models/mobilenet", json={"inputs": base64.b64encode(b"not an image").decode()})
    assert b64_garbage.status_code == 415


def test_unknown_routes_and_methods_use_the_error_shape(http):
    missing = http.get("/nope")
    assert missing.status_code == 404 and set(missing.json()) == {"error", "error_type"}
    wrong = http.delete("/models/sentiment")
    assert wrong.status_code == 405 and wrong.json()["error_type"] == "method_not_allowed"
    assert http.post("/models/nope", json={"inputs": "x"}).json()["error_type"] == "not_found"


def test_broken_model_is_503_with_reason(http):
    response = http.post("/models/corrupt", json={"inputs": "x"})
    assert response.status_code == 503 and "safetensors" in response.json()["error"]


def test_model_that_raises_gives_500_and_others_keep_working(http):
    ok = http.post("/models/fragile", json={"inputs": "!"})
    assert ok.status_code == 200
    boom = http.post("/models/fragile", json={"inputs": "the weather is lovely"})
    assert boom.status_code == 500
    payload = boom.json()
    assert payload["error_type"] == "inference" and "error id" in payload["error"]
    assert "Traceback" not in boom.text and "IndexError" not in boom.text
    assert_scores_close(http.post("/models/fragile", json={"inputs": "!"}).json(), ok.json())
    assert http.post("/models/sentiment", json={"inputs": "fine"}).status_code == 200
    assert http.get("/health").status_code == 200


def test_413_by_content_length_and_by_counting(models_dir):
    from service_helpers import LiveServer, Settings, wait_ready

    settings = Settings(models_dir=models_dir, reload_interval_s=0, max_request_bytes=1000, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        big = client.post("/models/sentiment", json={"inputs": "x" * 2000})
        assert big.status_code == 413 and big.json()["error_type"] == "payload_too_large"

        def chunks():  # no Content-Length: the server has to count
            for _ in range(20):
                yield b"x" * 100

        streamed = client.post("/models/mobilenet", content=chunks(), headers={"content-type": "image/png"})
        assert streamed.status_code == 413
        assert client.post("/models/sentiment", json={"inputs": "small"}).status_code == 200


def test_wrong_methods_name_every_allowed_one(http):
    """405 lists every method the path serves (Starlette alone names the first matching route's)."""
    for method in ("OPTIONS", "PUT", "DELETE"):
        response = http.request(method, "/models/sentiment")
        assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    assert http.request("DELETE", "/v1/models").headers["allow"] == "GET"
