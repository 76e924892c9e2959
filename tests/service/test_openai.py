"""service/routes/openai.py: the real `openai` client (sync, async, streaming) and
`InferenceClient.chat_completion` against tiny models; the slow test uses the real SmolLM2."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from transformers import AutoTokenizer

from service.routes.openai import ChatMessage, StopTrimmer, chat_prompt
from tests.service.service_helpers import LiveServer, Settings, build_tiny_gpt2, wait_ready
from tests.tiny_models import build_tiny_llama_chat, build_tiny_sentence_encoder, smollm2_dir

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def oa_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-models")
    build_tiny_llama_chat(root / "chat")
    build_tiny_gpt2(root / "plain")  # no chat template
    build_tiny_sentence_encoder(root / "embed")
    return root


@pytest.fixture(scope="module")
def server(oa_dir):
    with LiveServer(Settings(models_dir=oa_dir, reload_interval_s=0, _env_file=None)) as live, live.client() as client:
        wait_ready(client)
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_list(client):
    ids = {m.id: m for m in client.models.list()}
    assert set(ids) == {"chat", "plain", "embed"} and ids["chat"].owned_by == "hf-serve"


def test_chat_completion_uses_the_models_chat_template(client, oa_dir):
    tokenizer = AutoTokenizer.from_pretrained(oa_dir / "chat")
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    built = chat_prompt(tokenizer, [ChatMessage(**m) for m in MESSAGES])
    assert tokenizer(built, add_special_tokens=False)["input_ids"] == list(expected)
    out = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=7, temperature=0, seed=1)
    assert out.object == "chat.completion" and out.model == "chat" and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(expected)
    assert out.usage.completion_tokens == (7 if choice.finish_reason == "length" else out.usage.completion_tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=7, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy, same path


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    whole = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content


def test_async_client_concurrently(server):
    async def scenario():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        calls = [client.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"Count to {i}"}],
                                                max_tokens=5, temperature=0.7, seed=i) for i in range(6)]
        results = await asyncio.gather(*calls)
        await client.close()
        return results

    results = asyncio.run(scenario())
    assert all(r.usage.completion_tokens >= 1 for r in results)


def test_completions_and_stop_strings(client):
    out = client.completions.create(model="plain", prompt="Hello world", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    text = out.choices[0].text
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 8  # the real GPT-2 tokenizer
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        cut = client.completions.create(model="plain", prompt="Hello world", max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text  # OpenAI cuts the stop
        assert text.startswith(cut.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="plain", prompt="Hello world", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == text
    several = client.completions.create(model="plain", prompt=["Hello world", "Good night"], max_tokens=3, temperature=0)
    assert [c.index for c in several.choices] == [0, 1] and several.choices[0].text == text[:len(several.choices[0].text)]


def test_embeddings_float_and_base64(client, server):
    default = client.embeddings.create(model="embed", input=["a cat", "a dog"])  # the client asks for base64
    floats = client.embeddings.create(model="embed", input="a cat", encoding_format="float")
    assert len(default.data) == 2 and len(default.data[0].embedding) == 32
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    assert default.usage.prompt_tokens > 2
    direct = httpx.post(f"{server.url}/models/embed", json={"inputs": "a cat"}).json()[0]
    assert np.allclose(direct, floats.data[0].embedding, atol=1e-6)


def test_errors_have_openais_shape(client, server):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert missing.value.body["code"] == "model_not_found"
    # a model this route does not serve is not found here, as OpenAI answers for a chat model on /v1/completions
    with pytest.raises(openai.NotFoundError, match="chat template"):
        client.chat.completions.create(model="plain", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError, match="feature-extraction"):
        client.chat.completions.create(model="embed", messages=MESSAGES)
    with pytest.raises(openai.UnprocessableEntityError) as n2:
        client.chat.completions.create(model="chat", messages=MESSAGES, n=2)
    assert n2.value.body["param"] == "n" and n2.value.body["type"] == "invalid_request_error"
    bad = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": [{"role": "wizard"}]})
    assert bad.status_code == 422 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(f"{server.url}/v1/chat/completions", content=b"{").json()["error"]["code"] == "validation"


def test_inference_client_chat_completion_on_the_tgi_route(server, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=f"{server.url}/models/chat")
    out = client.chat_completion(MESSAGES, max_tokens=5, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat_completion(
        MESSAGES, max_tokens=5, temperature=0, stream=True))
    assert streamed == out.choices[0].message.content
    base = InferenceClient(base_url=f"{server.url}/v1")
    assert base.chat_completion(MESSAGES, model="chat", max_tokens=5, temperature=0).choices[0].message.content == streamed


def test_stop_trimmer_holds_back_a_possible_stop():
    trimmer = StopTrimmer(["END"])
    assert trimmer.feed("abc E") == "abc " and trimmer.feed("N") == "" and trimmer.feed("D more") == ""
    assert trimmer.stopped and trimmer.flush() == ""
    other = StopTrimmer(["END"])
    assert other.feed("xE") == "x" and other.feed("y") == "Ey" and other.flush() == ""


@pytest.mark.slow
def test_real_smollm2_answers_through_openai(tmp_path):
    (tmp_path / "smollm2").symlink_to(smollm2_dir(), target_is_directory=True)  # 517 MB: not copied
    with LiveServer(Settings(models_dir=tmp_path, reload_interval_s=0, _env_file=None)) as live, live.client() as http:
        wait_ready(http, timeout=120)
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0)
        assert "Paris" in out.choices[0].message.content and out.choices[0].finish_reason == "stop"
        assert "<|im_end|>" not in out.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=20, temperature=0, stream=True) if c.choices)
        assert "Paris" in streamed
