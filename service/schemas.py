"""The bodies every route shares: errors and the model listing. Each task's request and response
bodies live in its module (service/tasks/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every error: 4xx for the caller's mistakes, 503 while loading or overloaded, 500 for our bugs."""

    error: str = Field(description="What went wrong, for a human (an error id for 500s: it is in the server log).")
    error_type: str = Field(description="Machine-readable kind: validation, not_found, unauthorized, payload_too_large, "
                                        "unsupported_media_type, overloaded, loading, unavailable, inference, internal, ...")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error, server_error")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: str | None = Field(None, description="Our error_type (model_not_found for an unknown model).")


class OpenAIErrorResponse(BaseModel):
    """Every error of the /v1 routes, in OpenAI's shape (what the openai client parses)."""

    error: OpenAIErrorDetail


class ModelInfo(BaseModel):
    name: str
    status: Literal["ready", "loading", "available", "failed"]
    task: str | None = None
    error: str | None = Field(None, description="Why the folder could not be loaded (status failed), or why its last reload failed.")
    architecture: str | None = None
    labels: list[str] | None = None
    card: dict[str, Any] = Field(default_factory=dict, description="Model-card metadata (YAML header) without model-index.")
    metrics: list[dict[str, Any]] = Field(default_factory=list, description="Eval results from the card's model-index.")
    results: dict[str, Any] | None = Field(None, description="all_results.json, when present.")
    loaded_at: float | None = None
    chat_template: bool = Field(False, description="Its tokenizer has a chat template: /v1/chat/completions serves it.")
    backend: str | None = Field(None, description="What runs its forward passes once loaded: torch (eager), torch-compile (torch.compile), onnx or onnx-int8 (ONNX Runtime); setting backend.")
    backend_note: str | None = Field(None, description="Why it runs on eager torch when another backend was asked for; or what the other backend runs (the shapes compiled, the int8 check).")


class ModelList(BaseModel):
    models: list[ModelInfo]
