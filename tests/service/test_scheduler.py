"""service/scheduler.py: concurrent generations share decoding steps and each gets exactly its own
continuation: checked teacher-forced, against a plain forward pass of the model alone on the same
tokens (so it holds on any CPU, where batched and solo kernels round differently)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import httpx
import pytest
import torch

from service.scheduler import supports_batching
from tests.service.service_helpers import LiveServer, Settings, build_tiny_gpt2, wait_ready
from tests.tiny_models import build_tiny_bert, build_tiny_llama_chat

PROMPTS = ["Hello world", "The weather today is", "Once upon a time there was a",
           "In 1998 the company", "My favourite food", "A B C D E F G", "Python is", "x"]


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-models")
    build_tiny_gpt2(root / "gpt2")
    build_tiny_llama_chat(root / "llama")
    build_tiny_bert(root / "classifier", labels=["a", "b"])
    return root


@pytest.fixture(scope="module")
def server(gen_dir):
    settings = Settings(models_dir=gen_dir, reload_interval_s=0, max_new_tokens=512, _env_file=None)
    with LiveServer(settings) as live, live.client() as client:
        wait_ready(client)
        yield live, client


def generate_all(live, name: str, bodies: list[dict]) -> list[dict]:
    async def fire():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            return await asyncio.gather(*(http.post(f"/models/{name}", json=b) for b in bodies))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json()[0] for r in responses]


def reference_logprobs(model, tokenizer, prompt: str, generated: list[int]) -> torch.Tensor:
    """log p(token_i | prompt, tokens before i) from one unpadded forward pass of the model alone."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + generated])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    steps = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return steps


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_each_sequence_gets_its_own_continuation(server, gen_dir, name):
    """8 distinct prompts decoded together: each sequence's logprobs are those of the model alone on
    its own prompt and tokens (atol 1e-4), and each greedy token is the solo argmax (up to ties)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    live, _ = server
    worker = live.app.state.registry.entries[name].worker
    steps_before = worker.batches
    bodies = [{"inputs": p, "parameters": {"max_new_tokens": 12 + 3 * i, "details": True}} for i, p in enumerate(PROMPTS)]
    outputs = generate_all(live, name, bodies)
    model = AutoModelForCausalLM.from_pretrained(gen_dir / name).eval()
    tokenizer = AutoTokenizer.from_pretrained(gen_dir / name)
    for body, out in zip(bodies, outputs, strict=True):
        tokens = out["details"]["tokens"]
        assert len(tokens) == body["parameters"]["max_new_tokens"] == out["details"]["generated_tokens"]
        ids = [t["id"] for t in tokens]
        reference = reference_logprobs(model, tokenizer, body["inputs"], ids)
        got = torch.tensor([t["logprob"] for t in tokens])
        torch.testing.assert_close(got, reference[torch.arange(len(ids)), ids], atol=1e-4, rtol=0)
        assert bool((reference.max(-1).values - reference[torch.arange(len(ids)), ids] <= 1e-4).all())
    # shared steps: fewer decoding steps than tokens generated, and several sequences in one step
    assert worker.batches - steps_before < sum(b["parameters"]["max_new_tokens"] for b in bodies) / 2
    assert worker.largest_batch > 1


def test_stop_sequences_lengths_and_eos_end_each_sequence_alone(server, gen_dir, tmp_path):
    live, client = server
    solo = client.post("/models/gpt2", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 10, "details": True}}).json()[0]
    texts = [t["text"] for t in solo["details"]["tokens"]]
    stop = next(t for t in texts[3:] if t.strip())  # a piece of text the sequence will produce
    bodies = [{"inputs": "Hello world", "parameters": {"max_new_tokens": 10, "stop": [stop], "details": True}},
              {"inputs": "Hello world", "parameters": {"max_new_tokens": 3, "details": True}},
              {"inputs": "The weather today is", "parameters": {"max_new_tokens": 25, "details": True}}]
    stopped, short, long = generate_all(live, "gpt2", bodies)
    assert stopped["details"]["finish_reason"] == "stop_sequence" and stop in stopped["generated_text"]
    assert stopped["details"]["generated_tokens"] < 10
    assert short["details"]["finish_reason"] == "length" and short["details"]["generated_tokens"] == 3
    assert long["details"]["finish_reason"] == "length" and long["details"]["generated_tokens"] == 25

    # EOS: a copy of the model whose end-of-sequence token is the one it generates third
    eos_id = solo["details"]["tokens"][2]["id"]
    folder = shutil.copytree(gen_dir / "gpt2", tmp_path / "gpt2-eos")
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [eos_id]}))
    shutil.copytree(folder, live.app.state.settings.models_dir / "gpt2-eos")
    try:
        client.post("/admin/reload")
        ended, other = generate_all(live, "gpt2-eos", [
            {"inputs": "Hello world", "parameters": {"max_new_tokens": 10, "details": True}},
            {"inputs": "In 1998 the company", "parameters": {"max_new_tokens": 10, "details": True}}])
        assert ended["details"]["finish_reason"] == "eos_token" and ended["details"]["generated_tokens"] <= 3
        assert ended["details"]["tokens"][-1]["id"] == eos_id
        other_ids = [t["id"] for t in other["details"]["tokens"]]
        assert other["details"]["finish_reason"] == ("eos_token" if eos_id in other_ids else "length")
    finally:
        shutil.rmtree(live.app.state.settings.models_dir / "gpt2-eos")
        client.post("/admin/reload")


def test_streams_carry_only_their_own_tokens(server, gen_dir):
    live, _ = server

    async def stream(http, prompt):
        events = []
        async with http.stream("POST", "/models/gpt2", json={"inputs": prompt, "stream": True,
                                                                "parameters": {"max_new_tokens": 16}}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        return events

    async def fire():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            return await asyncio.gather(*(stream(http, p) for p in PROMPTS[:4]))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gen_dir / "gpt2").eval()
    tokenizer = AutoTokenizer.from_pretrained(gen_dir / "gpt2")
    for prompt, events in zip(PROMPTS[:4], asyncio.run(fire()), strict=True):
        assert [e["index"] for e in events] == list(range(1, 17))
        assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
        ids = [e["token"]["id"] for e in events]
        reference = reference_logprobs(model, tokenizer, prompt, ids)
        got = torch.tensor([e["token"]["logprob"] for e in events])
        torch.testing.assert_close(got, reference[torch.arange(len(ids)), ids], atol=1e-4, rtol=0)


def test_new_sequences_join_a_running_batch(server):
    """A short request sent while a long one streams finishes while the long one is still decoding:
    it joined between two steps instead of waiting for the long one to end."""
    live, _ = server
    worker = live.app.state.registry.entries["llama"].worker

    async def scenario():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            body = {"inputs": "Once", "stream": True, "parameters": {"max_new_tokens": 240}}
            async with http.stream("POST", "/models/llama", json=body) as long:
                lines = long.aiter_lines()
                while not (await lines.__anext__()).startswith("data:"):
                    pass  # the long sequence has its first token: it is in the running batch
                short = await http.post("/models/llama", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
                still_decoding = len(worker._active)
                rest = [line async for line in lines if line.startswith("data:")]
            return short, still_decoding, rest

    short, still_decoding, rest = asyncio.run(scenario())
    assert short.status_code == 200 and still_decoding == 1
    assert '"finish_reason": "length"' in rest[-1]  # and the long one ran to its end afterwards


def test_a_long_generation_never_stalls_other_models(server):
    """Classifications sent while a long generation decodes all come back before it ends."""
    live, _ = server
    worker = live.app.state.registry.entries["llama"].worker

    async def scenario():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            body = {"inputs": "Tell me", "stream": True, "parameters": {"max_new_tokens": 250}}
            async with http.stream("POST", "/models/llama", json=body) as long:
                lines = long.aiter_lines()
                while not (await lines.__anext__()).startswith("data:"):
                    pass
                answers = [await http.post("/models/classifier", json={"inputs": f"sentence {i}"}) for i in range(10)]
                still_decoding = len(worker._active)
                rest = [line async for line in lines if line.startswith("data:")]
            return answers, still_decoding, rest

    answers, still_decoding, rest = asyncio.run(scenario())
    assert all(a.status_code == 200 for a in answers)
    assert still_decoding == 1  # every classification came back while the generation was still running
    assert '"finish_reason": "length"' in rest[-1]


def test_a_stream_whose_client_left_stops(server):
    live, _ = server
    worker = live.app.state.registry.entries["gpt2"].worker
    with httpx.Client(base_url=live.url, timeout=60) as http, \
            http.stream("POST", "/models/gpt2", json={"inputs": "Go", "stream": True,
                                                      "parameters": {"max_new_tokens": 500}}) as response:
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data:")
            if seen == 2:
                break  # the client goes away after two tokens
    done = threading.Event()
    for _ in range(200):
        if not worker._active:
            done.set()
            break
        threading.Event().wait(0.05)
    assert done.is_set(), "the abandoned sequence is still decoding"
    assert http.is_closed


def test_cache_kinds():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert supports_batching(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    sliding = MistralForCausalLM(MistralConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    assert not supports_batching(sliding)  # sliding-window caches run one sequence at a time
