"""Request and response bodies in the Hugging Face Inference API shapes.

Sources: huggingface.js `packages/tasks/src/tasks/{text-classification,text-generation,
image-classification}/spec` and TGI's `/generate` + `/generate_stream` (what
`huggingface_hub.InferenceClient` sends and parses). Unknown fields are refused (422 naming the field).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FunctionToApply = Literal["softmax", "sigmoid", "none"]


class _Strict(BaseModel):
    # NaN and Infinity parse as JSON in Python; as a temperature or penalty they only make torch fail.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ClassificationParameters(_Strict):
    top_k: int | None = Field(None, ge=1, description="Return only the k most probable labels (text: all labels by default; images: 5).")
    function_to_apply: FunctionToApply | None = Field(
        None, description="softmax, sigmoid or none (raw logits). Default: sigmoid for multi-label or single-logit models, else softmax."
    )
    truncate: bool = Field(True, description="Text only: cut inputs longer than the model's max length (true) or refuse them with 422 (false).")


class TextClassificationRequest(_Strict):
    inputs: str | list[str] = Field(description="One text, or a list of texts (one result list per text).")
    parameters: ClassificationParameters = Field(default_factory=ClassificationParameters)
    options: dict[str, Any] | None = Field(None, description="Accepted for compatibility with the legacy Inference API; ignored.")

    @field_validator("inputs")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must contain at least one text")
        return value


class ImageClassificationRequest(_Strict):
    inputs: str = Field(description="The image, base64-encoded (a data: URL prefix is accepted).")
    parameters: ClassificationParameters = Field(default_factory=ClassificationParameters)
    options: dict[str, Any] | None = None


class GenerationParameters(_Strict):
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
    watermark: bool | None = Field(None, description="Unsupported (false only).")
    top_n_tokens: int | None = Field(None, ge=0, le=0, description="Unsupported (0 only).")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="Unsupported (0 only).")
    adapter_id: None = Field(None, description="Unsupported.")
    grammar: None = Field(None, description="Unsupported.")

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, value):
        if value:
            raise ValueError("watermarking is not supported")
        return value


class TextGenerationRequest(_Strict):
    inputs: str = Field(description="The prompt.")
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    stream: bool = Field(False, description="Server-sent events, one per token (TGI's /generate_stream shape).")
    options: dict[str, Any] | None = None


class ClassificationOutput(BaseModel):
    label: str
    score: float


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


class ErrorResponse(BaseModel):
    """Every error: 4xx for the caller's mistakes, 503 while loading or overloaded, 500 for our bugs."""

    error: str = Field(description="What went wrong, for a human (an error id for 500s: it is in the server log).")
    error_type: str = Field(description="Machine-readable kind: validation, not_found, unauthorized, payload_too_large, "
                                        "unsupported_media_type, overloaded, loading, unavailable, inference, internal, ...")


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


class ModelList(BaseModel):
    models: list[ModelInfo]
