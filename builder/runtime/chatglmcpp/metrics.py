"""Prometheus metrics (`GET /metrics`), named like vLLM's and llama-server's where they overlap."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """One registry per app (tests run several apps in one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("chatglmcpp_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.running = Gauge("chatglmcpp_requests_running", "Requests the engine is generating for", registry=r)
        self.waiting = Gauge("chatglmcpp_requests_waiting", "Requests queued for the engine", registry=r)
        self.admitted = Gauge(
            "chatglmcpp_requests_admitted", "Requests admitted: tokenizing, waiting or running", registry=r
        )
        self.rejected = Counter("chatglmcpp_requests_rejected", "Requests refused with 503 (queue full)", registry=r)
        self.cancelled = Counter(
            "chatglmcpp_requests_cancelled", "Requests whose client went away", ["state"], registry=r
        )
        self.prompt_tokens = Counter("chatglmcpp_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("chatglmcpp_generation_tokens", "Tokens generated", registry=r)
        self.engine_restarts = Counter("chatglmcpp_engine_restarts", "Engine process restarts", registry=r)
        self.queue_wait = Histogram(
            "chatglmcpp_queue_wait_seconds", "Time from admission to the engine", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "chatglmcpp_request_seconds", "Request time, admission to last byte", buckets=LATENCY_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
