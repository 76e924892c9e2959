"""text-generation: `{"inputs": prompt, "parameters": {...}, "stream": bool}` -> `[{"generated_text"}]`,
or server-sent events token by token, in the shapes of TGI's /generate and /generate_stream (what
`InferenceClient.text_generation` sends and parses)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from ..errors import ApiError, InputError, job_error
from ..metrics import Metrics
from ..request_parsing import read_json
from ..scheduler import GenerationScheduler
from ..settings import Settings
from .base import Call, ServedTask, StrictBody, wait_for_job
from .text_inputs import check_request_chars

# -- schemas ---------------------------------------------------------------------------------------

class GenerationParameters(StrictBody):
    """TGI's parameters. Those marked unsupported are accepted only at their neutral value."""

    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate (default: generation_config, else 20; capped by the server).")
    # Bounds: a temperature or penalty near 0 turns logits into inf/NaN, which torch's sampler rejects.
    temperature: float | None = Field(None, ge=1e-3, le=1e3, description="Sampling temperature (setting it turns sampling on).")
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens (turns sampling on).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (turns sampling on).")
    typical_p: float | None = Field(None, gt=0, le=1, description="Typical decoding mass (turns sampling on).")
    do_sample: bool | None = Field(None, description="Sample instead of greedy decoding.")
    repetition_penalty: float | None = Field(None, ge=1e-2, le=1e2, description="Penalty for repeated tokens (1.0 = none).")
    return_full_text: bool | None = Field(None, description="Prepend the prompt to generated_text (default false, as TGI).")
    stop: list[str] | None = Field(None, max_length=8, description="Stop when one of these strings is generated (it is kept in the text, as TGI).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Random seed for sampling.")
    truncate: int | None = Field(None, ge=1, description="Keep only the last N prompt tokens.")
    details: bool | None = Field(None, description="Return token ids, log-probabilities and the finish reason.")
    decoder_input_details: bool | None = Field(None, description="With details: also list the prompt tokens (prefill).")
    best_of: int | None = Field(None, ge=1, le=1, description="Unsupported beyond 1.")
    # bool, not Literal[False]: a Literal would take 0 (0 == False)
    watermark: bool | None = Field(None, description="Unsupported (false only).", json_schema_extra={"enum": [False, None]})

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, value):
        if value:
            raise ValueError("watermarking is not supported")
        return value
    top_n_tokens: int | None = Field(None, ge=0, le=0, description="Unsupported (0 only).")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="Unsupported (0 only).")
    adapter_id: None = Field(None, description="Unsupported.")
    grammar: None = Field(None, description="Unsupported.")



class TextGenerationRequest(StrictBody):
    inputs: str = Field(min_length=1, description="The prompt (not empty, as TGI).")
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    stream: bool = Field(False, description="Server-sent events, one per token (TGI's /generate_stream shape).")
    options: dict[str, Any] | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class GenerationDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = []
    tokens: list[Token] = []


class GenerationOutput(BaseModel):
    generated_text: str
    details: GenerationDetails | None = None


# -- the runner ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    """What a generation starts from: text, tokenized with the model's special tokens (a TGI
    prompt) or without them (a chat template's output, which already holds them)."""

    text: str
    special_tokens: bool = True


@dataclass
class GenerationResult:
    generated_text: str
    finish_reason: str
    tokens: list[dict] = field(default_factory=list)
    prefill: list[dict] = field(default_factory=list)
    seed: int | None = None
    input_length: int = 0


class GenerationSequence:
    """One request's generation: its prompt, its own sampling (transformers' logits processors and a
    seeded generator of its own), incremental detokenisation, stop sequences and stream. The
    scheduler (service/scheduler.py) hands it one row of logits per step."""

    def __init__(self, runner: TextGenerationRunner, prompt: str, prompt_ids: list[int], p: GenerationParameters,
                 max_new_tokens: int, emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]):
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        self.runner, self.prompt, self.prompt_ids, self.params = runner, prompt, prompt_ids, p
        self.max_new_tokens, self.emit, self.cancelled = max_new_tokens, emit, cancelled
        self.stop = p.stop or []
        self.sample = bool(p.do_sample or p.temperature not in (None, 1.0) or p.top_k or p.top_p not in (None, 1.0)
                           or p.typical_p not in (None, 1.0))
        # The order of generate(): repetition penalty, then temperature, top-k, top-p, typical.
        self.processors: list = []
        if p.repetition_penalty and p.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        if self.sample:
            if p.temperature not in (None, 1.0):
                self.processors.append(TemperatureLogitsWarper(p.temperature))
            if p.top_k:
                self.processors.append(TopKLogitsWarper(p.top_k))
            if p.top_p not in (None, 1.0):
                self.processors.append(TopPLogitsWarper(p.top_p))
            if p.typical_p not in (None, 1.0):
                self.processors.append(TypicalLogitsWarper(p.typical_p))
            self.generator = torch.Generator(device=runner.model.device)
            if p.seed is not None:
                self.generator.manual_seed(p.seed)
            else:
                self.generator.seed()
        self.ids: list[int] = []
        self.tokens: list[dict] = []
        self.text = ""
        self.prefix_offset = self.read_offset = 0
        self.stop_hit = self.eos_hit = False

    def push(self, logits: torch.Tensor) -> int | None:
        """Choose, record and stream the next token; None once the sequence is finished."""
        scores = logits.unsqueeze(0)
        if self.processors:
            seen = torch.tensor([self.prompt_ids + self.ids], device=scores.device)
            for processor in self.processors:
                scores = processor(seen, scores)
        logprobs = torch.log_softmax(scores, dim=-1)[0]
        if self.sample:
            token_id = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator))
        else:
            token_id = int(scores[0].argmax())
        logprob = float(logprobs[token_id])
        self._record(token_id, logprob if math.isfinite(logprob) else None)
        done = self.eos_hit or self.stop_hit or len(self.ids) >= self.max_new_tokens
        return None if done else token_id

    def _record(self, token_id: int, logprob: float | None) -> None:
        runner = self.runner
        self.ids.append(token_id)
        special = token_id in runner.special_ids
        if token_id in runner.eos_ids:
            self.eos_hit = True
        text = runner.tokenizer.decode([token_id]) if special else self._decode_new()
        token = {"id": token_id, "text": text, "logprob": logprob, "special": special}
        self.tokens.append(token)
        if not special:
            self.text += text
            if self.stop and any(s in self.text for s in self.stop):
                self.stop_hit = True
        if self.emit is not None:
            self.emit(token)

    def _decode_new(self) -> str:
        # TGI's incremental detokenisation: decode a small window, emit only completed characters.
        tok = self.runner.tokenizer
        visible = [i for i in self.ids if i not in self.runner.special_ids]
        prefix = tok.decode(visible[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new = tok.decode(visible[self.prefix_offset:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(visible)
            return new[len(prefix):]
        return ""

    def result(self) -> GenerationResult:
        p = self.params
        reason = "stop_sequence" if self.stop_hit else "eos_token" if self.eos_hit else "length"
        text = self.prompt + self.text if p.return_full_text else self.text
        prefill = []
        if p.details and p.decoder_input_details:
            prefill = [{"id": i, "text": self.runner.tokenizer.decode([i]), "logprob": None} for i in self.prompt_ids]
        return GenerationResult(text, reason, self.tokens, prefill, p.seed, len(self.prompt_ids))


class TextGenerationRunner:
    def __init__(self, model, tokenizer, settings: Settings):
        self.model = model
        self.tokenizer = tokenizer
        self.max_input_chars = settings.max_input_chars
        max_input_length, max_new_tokens_cap = settings.max_input_length, settings.max_new_tokens
        positions = (
            getattr(model.config, "max_position_embeddings", None)
            or getattr(model.config, "n_positions", None)
            or max_input_length
        )
        self.context = int(positions)
        self.max_input_length = int(min(max_input_length, positions))
        self.special_ids = set(tokenizer.all_special_ids)
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.default_max_new_tokens = min(gen.max_new_tokens or 20, max_new_tokens_cap)

    @property
    def labels(self):
        return None

    def start(self, prompt: Prompt, p: GenerationParameters, emit: Callable[[dict], None] | None,
              cancelled: Callable[[], bool]) -> GenerationSequence:
        """Tokenize a prompt into a sequence the scheduler can run (InputError if it cannot)."""
        # Only the end of the prompt is kept (below), so only its end is tokenized (tokenizing costs
        # in proportion to the text).
        ids = self.tokenizer(prompt.text[-self.max_input_chars:], add_special_tokens=prompt.special_tokens)["input_ids"]
        if not ids:
            raise InputError("the prompt has no tokens", "inputs")
        keep = min(p.truncate or self.max_input_length, self.max_input_length, self.context - 1)
        ids = ids[-keep:]  # keep the end of the prompt, as TGI does
        # never run past the model's context: finish_reason "length" says it stopped early
        max_new = min(p.max_new_tokens or self.default_max_new_tokens, self.context - len(ids))
        return GenerationSequence(self, prompt.text, ids, p, max_new, emit, cancelled)

    def smoke(self):
        ids = self.tokenizer("Hello world", return_tensors="pt")["input_ids"][:, :8]
        if ids.shape[1] == 0:
            return None
        return self.model(input_ids=ids.to(self.model.device)).logits


# -- the task --------------------------------------------------------------------------------------

def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class TextGeneration(ServedTask):
    name = "text-generation"
    architecture_suffixes = ("ForCausalLM", "LMHeadModel")
    has_labels = False
    json_requests = (TextGenerationRequest,)
    response_models = (GenerationOutput,)
    response_schema = {"type": "array", "items": {"$ref": "#/components/schemas/GenerationOutput"},
                       "title": "TextGenerationOutput"}
    response_description = "text-generation: one generated text, or server-sent events with `stream`"
    stream_content = {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                "description": "JSON: {index, token, top_tokens, generated_text, "
                                               "details} as TGI's /generate_stream, or {error, error_type}"}},
    }, "description": "One server-sent event per token"}}

    def schema_limits(self, settings: Settings) -> dict[str, dict[str, dict]]:
        return {"GenerationParameters": {"max_new_tokens": {"maximum": settings.max_new_tokens}}}

    def worker(self, name: str, runner: TextGenerationRunner, settings: Settings, metrics: Metrics) -> GenerationScheduler:
        return GenerationScheduler(name, runner, settings, metrics)

    def load(self, path: Path, settings: Settings) -> TextGenerationRunner:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..loading import load_model, load_processor

        model = load_model(AutoModelForCausalLM, path, settings, self.name)
        return TextGenerationRunner(model, load_processor(AutoTokenizer, path, settings), settings)

    async def handle(self, request: Request, call: Call) -> Response:
        body = await read_json(request, TextGenerationRequest)
        p = body.parameters
        if p.max_new_tokens is not None and p.max_new_tokens > call.settings.max_new_tokens:
            raise ApiError(422, f"parameters.max_new_tokens: at most {call.settings.max_new_tokens} on this server", "validation")
        check_request_chars([body.inputs], call.settings)
        if body.stream:
            return await self.stream(call, body)
        result, job = await call.run(Prompt(body.inputs), p)
        call.metrics.generated_tokens.labels(call.name).inc(len(result.tokens))
        out: dict[str, Any] = {"generated_text": result.generated_text}
        if p.details:
            out["details"] = {
                "finish_reason": result.finish_reason,
                "generated_tokens": len(result.tokens),
                "seed": result.seed,
                "prefill": result.prefill,
                "tokens": result.tokens,
            }
        return call.json([out], job)

    @staticmethod
    async def stream(call: Call, body: TextGenerationRequest) -> Response:
        """TGI's /generate_stream events; input errors before the first token are plain 4xx."""
        tokens = await TokenStream.open(call, Prompt(body.inputs), body.parameters)

        async def events():
            # Each event carries the token before the newest one, so that the last event can carry
            # the last token together with generated_text and details, as TGI's do.
            previous, index = None, 0
            async for item in tokens:
                if isinstance(item, ApiError):
                    yield _sse({"error": item.message, "error_type": item.error_type})
                    return
                if isinstance(item, GenerationResult):
                    call.metrics.generated_tokens.labels(call.name).inc(len(item.tokens))
                    yield _sse({"index": index + 1, "token": previous, "top_tokens": None,
                                "generated_text": item.generated_text,
                                "details": {"finish_reason": item.finish_reason, "generated_tokens": len(item.tokens),
                                            "seed": item.seed, "input_length": item.input_length}})
                    return
                if previous is not None:
                    index += 1
                    yield _sse({"index": index, "token": previous, "top_tokens": None, "generated_text": None,
                                "details": None})
                previous = item

        return StreamingResponse(events(), media_type="text/event-stream", headers=tokens.headers())


class TokenStream:
    """The tokens of one generation as they are chosen, then its GenerationResult (or the ApiError
    it failed with); `open` waits for the first token, so that input errors can still be plain 4xx.
    Closing the iteration (a client that went away) cancels the generation."""

    def __init__(self, call: Call, job, events: asyncio.Queue, first):
        self.call, self.job, self._events, self._first = call, job, events, first

    @classmethod
    async def open(cls, call: Call, payload: Prompt, params: GenerationParameters) -> TokenStream:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = call.worker.submit(payload, params, emit=lambda tok: loop.call_soon_threadsafe(events.put_nowait, tok))
        job.future.add_done_callback(lambda _f: events.put_nowait(_DONE))
        first = await wait_for_job(events.get(), job, call.settings.request_timeout_s, "first token")
        if first is _DONE:
            exc = job.future.exception()
            if exc is not None:
                raise (job_error(exc) or exc)
        return cls(call, job, events, first)

    def headers(self) -> dict[str, str]:
        job = self.job
        return {"x-queue-time": f"{job.queue_ms:.3f}",
                "x-inference-time": f"{(time.perf_counter() - job.started) * 1000:.3f}" if job.started else "0",
                "x-model-name": self.call.name, "cache-control": "no-cache", "x-accel-buffering": "no"}

    async def __aiter__(self):
        try:
            item = self._first
            while True:
                if item is _DONE:
                    exc = self.job.future.exception()
                    if exc is None:
                        yield self.job.future.result()
                    elif isinstance(exc, InputError):
                        yield ApiError(422, str(exc), "validation")
                    else:
                        yield ApiError(500, f"generation failed (error id {getattr(exc, 'error_id', '-')})", "generation")
                    return
                yield item
                try:
                    item = await asyncio.wait_for(self._events.get(), self.call.settings.request_timeout_s)
                except asyncio.TimeoutError:  # the gap between two tokens is bounded too
                    yield ApiError(504, "no next token within request_timeout_s "
                                        f"({self.call.settings.request_timeout_s:g} s)", "timeout")
                    return
        finally:
            self.job.cancel.set()  # a client that went away stops the generation


_DONE = object()
