"""Prometheus metrics (GET /metrics). One registry per app, so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hf_serve_requests", "Inference requests by model and HTTP status.", ["model", "status"], registry=r)
        self.errors = Counter("hf_serve_errors", "Error responses by model and error_type.", ["model", "error_type"], registry=r)
        self.latency = Histogram("hf_serve_request_seconds", "End-to-end inference request latency.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("hf_serve_queue_seconds", "Time a request waited for its forward pass.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.forward_seconds = Histogram("hf_serve_forward_seconds", "Duration of one batched forward pass (or one generation).", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("hf_serve_batch_size", "Inputs per forward pass.", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("hf_serve_queue_depth", "Requests waiting in a model's queue.", ["model"], registry=r)
        self.in_flight = Gauge("hf_serve_requests_in_flight", "Inference requests being served now.", registry=r)
        self.rejected = Counter("hf_serve_rejected", "Requests refused with 429 (over max_concurrent_requests).", registry=r)
        self.generated_tokens = Counter("hf_serve_generated_tokens", "Tokens produced by text-generation.", ["model"], registry=r)
        self.models = Gauge("hf_serve_models", "Model folders by status.", ["status"], registry=r)
        self.reloads = Counter("hf_serve_model_loads", "Model loads by outcome.", ["outcome"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
