"""The OpenAI API for our models (the shapes of vLLM, TGI and `transformers serve`), so the `openai`
client works unchanged: `POST /v1/chat/completions` (messages through the model's chat template),
`POST /v1/completions`, `POST /v1/embeddings` (feature-extraction models), `GET /v1/models`; and
TGI's `POST /models/{name}/v1/chat/completions`, where `InferenceClient(model=url).chat_completion`
sends. The model is the folder name (`model` in the body). Generation goes through the model's
continuous-batching scheduler like every other request; errors on /v1 have OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import schemas
from ..errors import ApiError
from ..openapi_doc import RETRY
from ..registry import Entry
from ..request_parsing import read_json_data, validate
from ..settings import Settings
from ..tasks import Call
from ..tasks.feature_extraction import FeatureExtractionRequest
from ..tasks.text_generation import GenerationParameters, GenerationResult, Prompt, TokenStream
from ..tasks.text_inputs import check_client_batch, check_request_chars
from .deps import MetricsDep, RegistryDep, SettingsDep, serving

router = APIRouter(tags=["openai"])


# -- request bodies --------------------------------------------------------------------------------

class OpenAIBody(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do: clients add fields every release.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(OpenAIBody):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class SamplingFields(OpenAIBody):
    """What chat and completions share."""

    model: str = Field(description="The model's folder name (GET /v1/models).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1 (sampling), as OpenAI.")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=8)] | None = Field(
        None, description="Up to 8 strings; the text ends before the first one.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=1, description="1 only.")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="0 only.")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="0 only.")
    logit_bias: None = Field(None, description="Unsupported.")
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=0, description="0 only.")
    tools: None = Field(None, description="Unsupported.")
    tool_choice: None = Field(None, description="Unsupported.")
    response_format: None = Field(None, description="Unsupported.")


class CompletionRequest(SamplingFields):
    # With stream, one prompt (a string or a list of one).
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["stream"], "properties": {"stream": {"const": True}}},
        "then": {"properties": {"prompt": {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 1}]}}}})

    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(description="One prompt, or several (one choice each; not with stream).")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=0, description="0 only.")
    suffix: None = Field(None, description="Unsupported.")
    best_of: int | None = Field(None, ge=1, le=1, description="1 only.")


class EmbeddingRequest(OpenAIBody):
    model: str
    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="One text or a list of texts (token-id inputs are not accepted).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    cached = getattr(request.state, "openai_body", None)
    if cached is None:
        cached = request.state.openai_body = validate(model, await read_json_data(request), strict=True)
    return cached


def _leased(model: type[BaseModel], task: str):
    """A dependency: the body as `model`, and the model it names leased (it must be of `task`)."""

    async def dependency(request: Request) -> AsyncIterator[tuple[Any, Entry]]:
        body = await _body(request, model)
        name = request.path_params.get("name") or body.model
        async with serving(name, request) as entry:
            # A model this route does not serve is not found here (OpenAI answers 404 too, e.g. for a
            # chat model on /v1/completions): the document can then call any name valid.
            if entry.task != task:
                raise ApiError(404, f"model: {name!r} is a {entry.task} model; {request.url.path} serves {task} models",
                               "not_found")
            if model is ChatCompletionRequest and not getattr(entry.runner.tokenizer, "chat_template", None):
                raise ApiError(404, f"model: {name!r} has no chat template (use /v1/completions with a plain prompt)",
                               "not_found")
            yield body, entry

    return dependency


ChatLease = Annotated[tuple[ChatCompletionRequest, Entry], Depends(_leased(ChatCompletionRequest, "text-generation"))]
CompletionLease = Annotated[tuple[CompletionRequest, Entry], Depends(_leased(CompletionRequest, "text-generation"))]
EmbeddingLease = Annotated[tuple[EmbeddingRequest, Entry], Depends(_leased(EmbeddingRequest, "feature-extraction"))]


# -- generation ------------------------------------------------------------------------------------

def _parameters(body: SamplingFields, max_new: int | None, cap: int, logprobs: bool) -> GenerationParameters:
    if max_new is not None and max_new > cap:
        raise ApiError(422, f"max_tokens: at most {cap} on this server", "validation")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 8:
        raise ApiError(422, "stop: at most 8 strings", "validation")
    temperature = 1.0 if body.temperature is None else body.temperature
    sample = temperature >= 1e-3  # 0 (and what rounds to it) is greedy, as OpenAI documents
    return GenerationParameters(
        max_new_tokens=max_new or cap, do_sample=sample, temperature=temperature if sample and temperature != 1.0 else None,
        top_p=body.top_p if sample and body.top_p not in (None, 1.0) else None, stop=stops or None, seed=body.seed,
        details=logprobs)


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The model's own chat template over the messages, ending where the assistant's turn begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(422, "messages: this model has no chat template (use /v1/completions with a plain prompt)",
                       "validation")
    plain = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        plain.append({"role": message.role, "content": content or "", **({"name": message.name} if message.name else {})})
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja's TemplateError, raise_exception() in the template
        raise ApiError(422, f"messages: the model's chat template refused them ({str(exc)[:200]})", "validation") from None


class StopTrimmer:
    """OpenAI's stop strings end the text before them: streamed text is held back while it could
    still be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.input_length, "completion_tokens": len(result.tokens),
            "total_tokens": result.input_length + len(result.tokens)}


def _logprobs(tokens: list[dict]) -> dict:
    return {"content": [{"token": t["text"], "logprob": t["logprob"] if t["logprob"] is not None else -9999.0,
                         "bytes": list(t["text"].encode()), "top_logprobs": []} for t in tokens if not t["special"]]}


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _cut(text: str, stops: list[str]) -> str:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(found)] if found else text


async def _stream(call: Call, prompt: Prompt, params: GenerationParameters, chunk, include_usage: bool,
                  first: dict | None) -> Response:
    """OpenAI's server-sent chunks: `chunk(delta_or_text, finish_reason)` builds each one."""
    tokens = await TokenStream.open(call, prompt, params)
    trimmer = StopTrimmer(params.stop or [])

    async def events():
        if first is not None:
            yield _sse(chunk(first, None))
        async for item in tokens:
            if isinstance(item, ApiError):
                yield _sse({"error": {"message": item.message, "type": "server_error" if item.status >= 500 else
                                      "invalid_request_error", "param": None, "code": item.error_type}})
                return
            if isinstance(item, GenerationResult):
                call.metrics.generated_tokens.labels(call.name).inc(len(item.tokens))
                rest = trimmer.flush()
                if rest:
                    yield _sse(chunk(rest, None))
                yield _sse(chunk(None, _finish_reason(item)))
                if include_usage:
                    yield _sse({**chunk(None, None), "choices": [], "usage": _usage(item)})
                yield _sse("[DONE]")
                return
            if not item["special"]:
                text = trimmer.feed(item["text"])
                if text:
                    yield _sse(chunk(text, None))

    return StreamingResponse(events(), media_type="text/event-stream", headers=tokens.headers())


async def _chat(request: Request, body: ChatCompletionRequest, entry: Entry, settings, metrics) -> Response:
    call = Call(entry.name, entry.runner, entry.worker, settings, metrics)
    prompt = chat_prompt(entry.runner.tokenizer, body.messages)
    check_request_chars([prompt], settings)
    params = _parameters(body, body.max_completion_tokens or body.max_tokens, settings.max_new_tokens,
                         bool(body.logprobs))
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": entry.name,
            "system_fingerprint": None}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(content, finish_reason):
        delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
        out = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return {**out, "usage": None} if include_usage else out

    if body.stream:
        return await _stream(call, Prompt(prompt, special_tokens=False), params, chunk, include_usage,
                             first={"role": "assistant", "content": ""})
    result, job = await call.run(Prompt(prompt, special_tokens=False), params)
    metrics.generated_tokens.labels(entry.name).inc(len(result.tokens))
    message = {"role": "assistant", "content": _cut(result.generated_text, params.stop or [])}
    choice = {"index": 0, "message": message, "logprobs": _logprobs(result.tokens) if body.logprobs else None,
              "finish_reason": _finish_reason(result)}
    return call.json({"id": ident, "object": "chat.completion", "created": created, "model": entry.name,
                      "system_fingerprint": None, "choices": [choice], "usage": _usage(result)}, job)


OPENAI_ERROR = {"model": schemas.OpenAIErrorResponse}
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "JSON of one chunk (or of an error), or [DONE] at the end"}}}
V1_AUTH = {401: {**OPENAI_ERROR, "description": "Missing or wrong API key (only when one is configured)"}}


def _responses(ok: str, error: dict) -> dict:
    return {
        200: {"description": ok, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        401: {**error, "description": "Missing or wrong API key (only when one is configured)"},
        408: {**error, "description": "The body took longer than body_timeout_s"},
        413: {**error, "description": "The body, its text or its prompt is too large"},
        404: {**error, "description": "No such model, a model of another task, or (chat) a model without a chat template"},
        422: {**error, "description": "Invalid body, or messages the model's chat template refuses"},
        429: {**error, **RETRY, "description": "More than max_concurrent_requests in flight"},
        500: {**error, "description": "The model failed; the error id is in the server log"},
        503: {**error, **RETRY, "description": "The model is loading, or its folder failed to load"},
    }


CHAT_RESPONSES = _responses("A chat.completion, or with `stream` server-sent chat.completion.chunk events ending in "
                            "`data: [DONE]`", OPENAI_ERROR)
# TGI's route answers errors in our (TGI's) shape
TGI_CHAT_RESPONSES = _responses("A chat.completion, or server-sent chunks with `stream`", {"model": schemas.ErrorResponse})


def _post(path: str, summary: str, body: type[BaseModel], responses: dict = CHAT_RESPONSES):
    """A POST route whose JSON body (read by its lease dependency) is documented as `body`."""
    schema = {"$ref": f"#/components/schemas/{body.__name__}"}
    return router.post(path, summary=summary, response_class=JSONResponse, responses=responses,
                       openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}})


@_post("/v1/chat/completions", "OpenAI chat completions (text-generation models with a chat template)",
       ChatCompletionRequest)
async def chat_completions(request: Request, leased: ChatLease, settings: SettingsDep, metrics: MetricsDep) -> Response:
    return await _chat(request, *leased, settings, metrics)


@_post("/models/{name}/v1/chat/completions", "TGI's chat route: the model in the path (what "
       "InferenceClient(model=url).chat_completion calls)", ChatCompletionRequest, TGI_CHAT_RESPONSES)
async def tgi_chat_completions(name: str, request: Request, leased: ChatLease, settings: SettingsDep,
                               metrics: MetricsDep) -> Response:
    return await _chat(request, *leased, settings, metrics)


@_post("/v1/completions", "OpenAI (legacy) completions on a plain prompt", CompletionRequest)
async def completions(request: Request, leased: CompletionLease, settings: SettingsDep, metrics: MetricsDep) -> Response:
    body, entry = leased
    call = Call(entry.name, entry.runner, entry.worker, settings, metrics)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_client_batch(prompts, settings)
    check_request_chars(prompts, settings)
    params = _parameters(body, body.max_tokens or 16, settings.max_new_tokens, False)  # OpenAI's default: 16
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": ident, "object": "text_completion", "created": created, "model": entry.name, "system_fingerprint": None}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        if len(prompts) != 1:
            raise ApiError(422, "prompt: one prompt only with stream", "validation")

        def chunk(text, finish_reason):
            out = {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}
            return {**out, "usage": None} if include_usage else out

        return await _stream(call, Prompt(prompts[0]), params, chunk, include_usage,
                             first=prompts[0] if body.echo else None)
    outcomes = await asyncio.gather(*(call.run(Prompt(p), params) for p in prompts))
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (prompt, (result, _job)) in enumerate(zip(prompts, outcomes, strict=True)):
        metrics.generated_tokens.labels(entry.name).inc(len(result.tokens))
        text = _cut(result.generated_text, params.stop or [])
        choices.append({"index": index, "text": prompt + text if body.echo else text, "logprobs": None,
                        "finish_reason": _finish_reason(result)})
        prompt_tokens += result.input_length
        completion_tokens += len(result.tokens)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return call.json({**base, "choices": choices, "usage": usage}, outcomes[0][1])


# -- embeddings and models -------------------------------------------------------------------------

@_post("/v1/embeddings", "OpenAI embeddings (feature-extraction models)", EmbeddingRequest)
async def embeddings(request: Request, leased: EmbeddingLease, settings: SettingsDep, metrics: MetricsDep) -> Response:
    body, entry = leased
    call = Call(entry.name, entry.runner, entry.worker, settings, metrics)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(422, "input: must contain at least one text", "validation")
    check_client_batch(texts, settings)
    check_request_chars(texts, settings)
    params = FeatureExtractionRequest(inputs=texts, dimensions=body.dimensions)
    result, job = await call.run(texts, params, size=len(texts))

    def encode(vector: list[float]):
        if body.encoding_format == "base64":  # little-endian float32, what the openai client decodes
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    return call.json({"object": "list", "data": data, "model": entry.name,
                      "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}, job)


@router.get("/v1/models", summary="OpenAI's model list: every model folder that is not failed", responses={**V1_AUTH})
async def list_models(registry: RegistryDep) -> dict:
    data = [{"id": e.name, "object": "model", "created": int(e.loaded_at or time.time()), "owned_by": "hf-serve",
             "task": e.task} for e in (registry.entries[n] for n in registry.names()) if e.status != "failed"]
    return {"object": "list", "data": data}


SCHEMAS = (ChatCompletionRequest, CompletionRequest, EmbeddingRequest)


def schema_limits(settings: Settings) -> dict[str, dict[str, dict]]:
    """The server's caps on these bodies, for the OpenAPI document (service/openapi_doc.py)."""
    tokens = {"maximum": settings.max_new_tokens}
    texts = {"maxItems": settings.max_client_batch_size}
    return {"ChatCompletionRequest": {"max_tokens": tokens, "max_completion_tokens": tokens},
            "CompletionRequest": {"max_tokens": tokens, "prompt": texts},
            "EmbeddingRequest": {"input": texts}}
