"""The serving baseline users would copy: transformers' own "Web server inference" tutorial.

Reproduced from the transformers documentation, `docs/source/en/pipeline_webserver.md` ("Using
pipelines for a webserver" / "Web server inference"): a Starlette app whose route puts
`(string, response_q)` on one `asyncio.Queue`, and a single `server_loop` task that takes one item at
a time, calls `pipe(string)` and puts the output on that request's own response queue. One model
loop, no batching, requests served one at a time in arrival order; the pipeline call runs on the
event loop itself, as in the tutorial. The body is the raw text (the tutorial's
`payload.decode("utf-8")`), or, for an image model (not in the tutorial, added the same way), the
raw image bytes.

Two departures, neither on the request path: the tutorial's `@app.on_event("startup")` is written as
Starlette's `lifespan` (the same startup task; `on_event` is deprecated in Starlette 1.x), and the model
comes from `TUTORIAL_MODEL` / `TUTORIAL_TASK` instead of a hard-coded Hub id. On a GPU
(`benchmarks/gpu_check.py`) the pipeline gets what a user adds there, `device` and `dtype`
(`TUTORIAL_DEVICE=cuda:0 TUTORIAL_DTYPE=float16`); for text generation, `TUTORIAL_MAX_NEW_TOKENS=N`
makes every answer exactly N greedy tokens (`min_new_tokens` too), so tokens/s compare.

    TUTORIAL_MODEL=models/demo-sentiment TUTORIAL_TASK=text-classification \
        uvicorn benchmarks.tutorial_server:app --host 127.0.0.1 --port 8002
    curl -X POST -d "a gorgeous, witty film" http://127.0.0.1:8002/
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os

from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from transformers import pipeline

TASK = os.environ.get("TUTORIAL_TASK", "text-classification")
MODEL = os.environ["TUTORIAL_MODEL"]


async def homepage(request):
    payload = await request.body()
    string = payload.decode("utf-8") if TASK != "image-classification" else payload
    response_q = asyncio.Queue()
    await request.app.model_queue.put((string, response_q))
    output = await response_q.get()
    return JSONResponse(output)


def _pipeline_kwargs() -> tuple[dict, dict]:
    """(pipeline(...) kwargs, per-call kwargs) from the TUTORIAL_* variables; both empty by default."""
    build, call = {}, {}
    if os.environ.get("TUTORIAL_DEVICE"):
        build["device"] = os.environ["TUTORIAL_DEVICE"]
    if os.environ.get("TUTORIAL_DTYPE"):
        build["dtype"] = os.environ["TUTORIAL_DTYPE"]
    if TASK == "text-generation" and os.environ.get("TUTORIAL_MAX_NEW_TOKENS"):
        n = int(os.environ["TUTORIAL_MAX_NEW_TOKENS"])
        call = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "return_full_text": False}
    return build, call


async def server_loop(q):
    build, call = _pipeline_kwargs()
    pipe = pipeline(TASK, model=MODEL, **build)
    while True:
        (string, response_q) = await q.get()
        if TASK == "image-classification":
            string = Image.open(io.BytesIO(string)).convert("RGB")
        out = pipe(string, **call)
        await response_q.put(out)


@contextlib.asynccontextmanager
async def lifespan(app):
    q = asyncio.Queue()
    app.model_queue = q
    task = asyncio.create_task(server_loop(q))
    yield
    task.cancel()


app = Starlette(routes=[Route("/", homepage, methods=["POST"])], lifespan=lifespan)
