"""What a served task is, and what the server hands it for one request.

A task module (service/tasks/<task>.py) holds everything about one task: its request and response
schemas, how a folder of that task is recognised and loaded, its runner (what the batcher calls),
its smoke input, response formatting and its part of the OpenAPI document. The registry, the routes
and the batcher know tasks only through `ServedTask` and the `TASKS` table (service/tasks/__init__.py).

A runner is what a task's `load` returns; the task's `worker` batches its requests. The default,
micro-batching (service/batching.py), calls on the torch thread `prepare(payload) ->
(prepared, cost)` per request and `run_batch(prepared_list, params_list) -> results` once per
micro-batch. Text generation has continuous batching instead
(service/scheduler.py; its runner makes one `Sequence` per request).
`smoke()` runs the task's smoke input once after loading and returns the raw outputs, which must be
finite; `labels` lists the label names, or None.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from ..batching import Job, ModelWorker
from ..errors import ApiError, job_error
from ..metrics import Metrics
from ..settings import Settings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")


class StrictBody(BaseModel):
    """Request bodies refuse unknown fields (422 naming the field). NaN and Infinity parse as JSON in
    Python; as a temperature or penalty they only make torch fail."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


async def wait_for_job(awaitable, job: Job, timeout: float, what: str) -> Any:
    """`awaitable` (a job's result, or its first event) within `timeout`: a 504 after it. The job is
    cancelled when the request gives up or its client goes away."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        job.cancel.set()
        raise ApiError(504, f"no {what} within request_timeout_s ({timeout:g} s)", "timeout") from None
    except asyncio.CancelledError:
        job.cancel.set()
        raise


@dataclass
class Call:
    """One inference request as a task's `handle` sees it: the leased model and the server around it."""

    name: str
    runner: Any
    worker: ModelWorker
    settings: Settings
    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)

    async def run(self, payload: Any, params: Any, size: int = 1) -> tuple[Any, Job]:
        """Queue one job on the model's batcher and wait for its result (errors become ApiErrors)."""
        job = self.worker.submit(payload, params, size=size)
        try:
            result = await wait_for_job(asyncio.shield(job.future), job, self.settings.request_timeout_s, "answer")
        except ApiError:
            raise
        except Exception as exc:
            error = job_error(exc)
            if error is None:
                raise
            raise error from None
        self.metrics.queue_seconds.labels(self.name).observe(job.queue_ms / 1000)
        return result, job

    def headers(self, job: Job) -> dict[str, str]:
        """TEI's timing headers (ms) and the model that answered."""
        return {
            "x-queue-time": f"{job.queue_ms:.3f}",
            "x-inference-time": f"{job.inference_ms:.3f}",
            "x-total-time": f"{(time.perf_counter() - self.started) * 1000:.3f}",
            "x-model-name": self.name,
        }

    def json(self, content: Any, job: Job) -> JSONResponse:
        return JSONResponse(content, headers=self.headers(job))


class ServedTask:
    """One served task. Subclasses set the class attributes and implement `load` and `handle`."""

    name: ClassVar[str]
    #: other pipeline tags that mean this task (e.g. "sentiment-analysis")
    aliases: ClassVar[tuple[str, ...]] = ()
    #: a config architecture ending in one of these is this task when the card names none
    architecture_suffixes: ClassVar[tuple[str, ...]] = ()
    #: a folder of this task has at least one of these files (its processor)
    processor_files: ClassVar[tuple[str, ...]] = TOKENIZER_FILES
    processor_description: ClassVar[str] = "tokenizer files (tokenizer.json / tokenizer_config.json / vocab)"
    #: whether the config's id2label names are this task's labels
    has_labels: ClassVar[bool] = True
    # -- the OpenAPI document of POST /models/{name}
    json_requests: ClassVar[tuple[type[BaseModel], ...]] = ()
    other_request_content: ClassVar[dict[str, dict]] = {}
    response_models: ClassVar[tuple[type[BaseModel], ...]] = ()
    response_schema: ClassVar[dict] = {}
    response_description: ClassVar[str] = ""
    stream_content: ClassVar[dict[str, dict]] = {}
    #: error statuses only this task answers, besides the common ones (service/openapi_doc.py)
    error_responses: ClassVar[dict[int, str]] = {}

    def schema_limits(self, settings: Settings) -> dict[str, dict[str, dict]]:
        """The server's caps on this task's request fields, as JSON-schema keywords for the document:
        {schema name: {property: {"maximum": ...}}}."""
        return {}

    def model_constraints(self, runner: Any) -> dict[str, dict[str, dict]]:
        """What one loaded model takes beyond its task's schemas (e.g. its own prompt names), for its
        path in the document: {schema name: {property: schema}}."""
        return {}

    def recognises(self, path: Path, card: dict, config: dict) -> bool:
        """A folder is this task for a reason besides its pipeline tag or architecture (checked after
        the tag, before the architecture)."""
        return False

    def worker(self, name: str, runner: Any, settings: Settings, metrics: Metrics) -> Any:
        """What batches this task's requests: micro-batching by default (service/batching.py)."""
        return ModelWorker(name, runner, settings, metrics)

    def load(self, path: Path, settings: Settings) -> Any:
        """Model + processor -> runner (blocking: runs on the torch thread). Raise InvalidFolder."""
        raise NotImplementedError

    async def handle(self, request: Request, call: Call) -> Response:
        """Parse the request, run it through `call`, format the response."""
        raise NotImplementedError
