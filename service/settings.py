"""Every server knob: an environment variable `HF_SERVE_<NAME>` and a CLI flag `--<name>`.

Precedence: CLI flag > environment variable > `.env` file > default. `hf-serve --help` prints the
descriptions below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of the inference server (env prefix `HF_SERVE_`)."""

    model_config = SettingsConfigDict(
        env_prefix="HF_SERVE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        protected_namespaces=(),
    )

    models_dir: Path = Field(Path("models"), description="Folder whose sub-folders are the served models (one model per folder; the folder name is the model name).")
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 inside a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key: SecretStr | None = Field(None, description="When set, every route except /health, the playground page / and the API docs (/docs, /redoc, /openapi.json: static pages that hold no model or request data) requires `Authorization: Bearer <key>`, compared in constant time.")
    max_client_batch_size: int = Field(32, ge=1, description="Most inputs one request may send (422 above).")
    max_batch_requests: int = Field(32, ge=1, description="Most inputs in one forward pass (one micro-batch of the batcher).")
    max_batch_size: int | None = Field(None, ge=1, description="Deprecated (kept for one release): sets both max_client_batch_size and max_batch_requests.")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="Upper bound (ms) on how long the batcher waits for more requests; a lone request runs at once, and batches form while the previous forward pass runs.")
    max_batch_tokens: int = Field(16384, ge=1, description="Most padded tokens (batch size x longest input) in one text forward pass.")
    max_concurrent_sequences: int = Field(16, ge=1, description="Text generation: most sequences decoding together in one batch (continuous batching); more wait in the model's queue.")
    max_batch_prefill_tokens: int = Field(4096, ge=1, description="Text generation: most prompt tokens prefilled together between two decoding steps (a longer prompt alone is still admitted).")
    max_batch_total_tokens: int = Field(16384, ge=1, description="Text generation: most tokens (prompt + max_new_tokens, summed over the sequences in flight) the KV cache holds; a sequence waits until it fits.")
    adapter_mode: Literal["merge", "share"] = Field("merge", description="PEFT adapter folders: merge each into its own copy of the base at load (fastest), or share one base in memory between the adapters on it (requests for different adapters run in separate forward passes).")
    request_timeout_s: float = Field(60.0, gt=0, description="Most seconds a request may wait for its answer (for a stream: between two tokens); 504 after. A forward pass running this long is given up as hung: its model is marked failed and reloaded, and a fresh torch thread serves the other models.")
    max_concurrent_requests: int = Field(128, ge=1, description="Inference requests in flight at once; more are refused with 429 and Retry-After.")
    max_request_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest accepted request body in bytes (413 above, refused by Content-Length before the body is read).")
    body_timeout_s: float = Field(60.0, gt=0, description="Most seconds a client may take to send a whole request body (408 after): a slow client cannot hold a connection forever.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest image (width x height) accepted, checked from the header before any pixel is decoded (413 above): decompression bombs never reach memory.")
    max_image_memory_mb: int = Field(256, ge=1, description="Most memory (MB) one image may need once the model's own image processor has resized it (estimated from the image header, before any pixel is decoded; 413 above): a 60000x1 image that a shortest-edge resize would blow up to billions of pixels is refused, a photo is not.")
    max_input_chars: int = Field(16384, ge=1, description="Most characters of one text input that are tokenized: longer inputs are cut to this before tokenizing (parameters.truncate=true; generation keeps the end of the prompt) or refused with 422 (truncate=false). 32 characters per token of max_input_length, so truncation to max_input_length tokens still sees the whole first 512 tokens.")
    max_request_chars: int = Field(262144, ge=1, description="Most characters of text in one request, all inputs together, after each is cut to max_input_chars (413 above): bounds the tokenizing a single request can cost.")
    max_input_length: int = Field(512, ge=1, description="Most tokens per text input; longer inputs are truncated (or refused with parameters.truncate=false).")
    max_new_tokens: int = Field(512, ge=1, description="Largest max_new_tokens a text-generation request may ask for (422 above).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's own choice).")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description=(
        "Weights dtype: auto is float32 on CPU and float16 on GPU. bfloat16 on a CPU pays only with AMX or "
        "AVX-512 BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later) and is several times slower "
        "elsewhere (a startup warning says so)."))
    backend: Literal["torch", "torch-compile", "onnx"] = Field("torch", description="Runtime of the text-classification, image-classification and feature-extraction models: torch (eager); torch-compile (torch.compile with inductor, compiled at load for every input shape the model is fed, which takes seconds to a minute per model; on a CPU it needs a C++ compiler such as g++); or onnx (ONNX Runtime on CPU; needs `pip install .[onnx]`; each model is exported once per folder version into onnx_cache). Either is checked against eager torch on probe inputs; a model that does not compile or export, or disagrees, falls back to eager torch (GET /models says which backend serves it, and why). Text generation always runs on eager torch.")
    quantize: Literal["none", "int8"] = Field("none", description="With backend=onnx: int8 quantizes the text models' weights (ONNX Runtime dynamic quantization of MatMul/Gemm), and the image models that have calibration images (calibration_dir) statically (weights and activations); an image model without them, or whose held-out calibration images show its int8 graph changing more than 2 % of the labels (95 % confidence), stays float32 (GET /models says which; docs/performance.md, ONNX Runtime).")
    calibration_dir: Path | None = Field(None, description="With backend=onnx quantize=int8: a folder with one sub-folder per image model, named as the model, holding a few hundred images like those it will be sent, which it was not trained on (a validation split; any layout, class sub-folders included). Up to 320 are read at load: 64 fix the int8 activation ranges, the others check the int8 model's labels against float32's.")
    onnx_cache: Path = Field(Path("~/.cache/hf-serve/onnx"), description="Folder for the exported ONNX files (backend=onnx), outside the model folders, which may be read-only; keyed by a hash of each folder's config and weight files and the library versions (the float32 and int8 files side by side). Not writable: each load exports again, into a temporary folder.")
    allow_pickle: bool = Field(False, description="Also load pickle weights (pytorch_model.bin) when a folder has no safetensors; they are still loaded with torch's weights_only unpickler. Off: such folders are listed as failed.")
    preload: bool = Field(True, description="Load every model at startup (in the background; /ready turns 200 when done). false: load on first request.")
    reload_interval_s: float = Field(5.0, ge=0, description="Seconds between scans of models_dir for new, changed or removed folders; 0 disables polling (POST /admin/reload still works).")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Origins allowed by CORS (comma-separated or JSON list); empty disables CORS.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level of the server and uvicorn.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str) and not value.strip().startswith("["):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _batch_size_alias(self):
        # The old knob meant both limits; it still sets both, then stays None so nothing reads it.
        if self.max_batch_size is not None:
            self.max_client_batch_size = self.max_batch_requests = self.max_batch_size
            self.max_batch_size = None
        return self

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.resolved_device() == "cpu" else torch.float16
        return getattr(torch, self.dtype)
