"""Text generation as server-sent events, in the shape of TGI's /generate_stream (what
`InferenceClient.text_generation(stream=True)` parses)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from fastapi.responses import Response, StreamingResponse

from .errors import job_error
from .metrics import Metrics
from .pipelines import InputError


class ReleasingStream(StreamingResponse):
    """A streaming response that frees its model and concurrency slot however the stream ends."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def stream_generation(entry, body, finish: Callable[[], None], metrics: Metrics) -> Response:
    """Submit the generation and answer with one event per token once the first token exists.

    Waiting for the first token means input errors still get a plain 4xx; after that, a failure is
    sent as a final `{"error", "error_type"}` event. `finish` releases the model and the slot when
    the stream ends, also when the client goes away (which cancels the generation).
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    done = object()
    job = entry.worker.submit(body.inputs, body.parameters, emit=lambda tok: loop.call_soon_threadsafe(events.put_nowait, tok))
    job.future.add_done_callback(lambda _f: events.put_nowait(done))
    try:
        first = await events.get()
    except asyncio.CancelledError:
        job.cancel.set()
        raise
    if first is done:
        exc = job.future.exception()
        if exc is not None:
            raise (job_error(exc) or exc)
        first = None

    async def stream():
        try:
            previous, index = first, 0
            while previous is not None:
                item = await events.get()
                if item is done:
                    exc = job.future.exception()
                    if isinstance(exc, InputError):
                        yield _sse({"error": str(exc), "error_type": "validation"})
                        return
                    if exc is not None:
                        yield _sse({"error": f"generation failed (error id {getattr(exc, 'error_id', '-')})",
                                    "error_type": "generation"})
                        return
                    result = job.future.result()
                    metrics.generated_tokens.labels(entry.name).inc(len(result.tokens))
                    index += 1
                    yield _sse({"index": index, "token": previous, "top_tokens": None,
                                "generated_text": result.generated_text,
                                "details": {"finish_reason": result.finish_reason, "generated_tokens": len(result.tokens),
                                            "seed": result.seed, "input_length": result.input_length}})
                    return
                index += 1
                yield _sse({"index": index, "token": previous, "top_tokens": None, "generated_text": None, "details": None})
                previous = item
        finally:
            job.cancel.set()  # a client that went away stops the generation

    headers = {
        "x-queue-time": f"{job.queue_ms:.3f}",
        "x-inference-time": f"{(time.perf_counter() - job.started) * 1000:.3f}" if job.started else "0",
        "x-model-name": entry.name,
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
    }
    return ReleasingStream(stream(), on_close=finish, media_type="text/event-stream", headers=headers)
