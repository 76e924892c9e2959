"""The baseline server: the usual tutorial, FastAPI calling `transformers.pipeline` once per request.

No batching, no queue: FastAPI runs each synchronous endpoint on its thread pool, so concurrent
requests run concurrent `pipeline(...)` calls. Started exactly like ours (uvicorn on 127.0.0.1):

    NAIVE_MODEL=models/demo-sentiment NAIVE_TASK=text-classification \
        uvicorn benchmarks.naive_server:app --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import io
import os

from fastapi import Body, FastAPI
from PIL import Image
from pydantic import BaseModel
from transformers import pipeline

TASK = os.environ["NAIVE_TASK"]
pipe = pipeline(TASK, model=os.environ["NAIVE_MODEL"])
app = FastAPI()


class TextRequest(BaseModel):
    inputs: str
    parameters: dict = {}


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/text")
def text(body: TextRequest):
    return pipe(body.inputs, **body.parameters)


@app.post("/image")
def image(data: bytes = Body(..., media_type="image/png")):
    return pipe(Image.open(io.BytesIO(data)).convert("RGB"))
