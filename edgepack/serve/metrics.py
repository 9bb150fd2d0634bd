"""The server's Prometheus metrics, written by prometheus_client (its text format and label escaping): requests by
route and status, answers by where they came from, tokens in and out, decode tokens/s, in-flight requests, queue
depth, time to first token. Each server has a registry of its own."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._answers: Tally[str] = Tally()  # for /health: answers by where they came from
        self.requests = Counter("edgepack_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=self.registry)
        self.routes = Counter("edgepack_answers", "Generated answers by where they came from.", ["route"],
                              registry=self.registry)
        self.prompt_tokens = Counter("edgepack_prompt_tokens", "Prompt tokens read.", registry=self.registry)
        self.completion_tokens = Counter("edgepack_completion_tokens", "Tokens generated.", registry=self.registry)
        self.decode_tps = Gauge("edgepack_decode_tokens_per_second", "Decode speed of the last finished generation.",
                                registry=self.registry)
        self.in_flight = Gauge("edgepack_in_flight_requests", "Requests running or waiting for the engine.",
                               registry=self.registry)
        self.queue_depth = Gauge("edgepack_queue_depth", "Requests waiting for the engine.", registry=self.registry)
        self.busy = Counter("edgepack_rejected_busy", "Requests turned away with 503: the queue was full.",
                            registry=self.registry)
        self.ttft = Histogram("edgepack_time_to_first_token_seconds", "From request to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def count_route(self, served_by: str) -> None:
        self.routes.labels(route=served_by).inc()
        with self._lock:
            self._answers[served_by] += 1

    def count_busy(self) -> None:
        self.busy.inc()

    def answers(self) -> dict[str, int]:
        with self._lock:
            return dict(self._answers)

    def local_share(self) -> float | None:
        """The share of answers the local model gave (its fallbacks included)."""
        with self._lock:
            total = sum(self._answers.values())
            return (self._answers["local"] + self._answers["local-fallback"]) / total if total else None

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def count_tokens(self, prompt: int, completion: int, decode_seconds: float | None) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        if decode_seconds and completion > 1:
            self.decode_tps.set((completion - 1) / decode_seconds)

    def watch_batching(self, read_steps: Callable[[], int]) -> None:
        """Report the batching engine's decode steps. (Not the prompt tokens it reused from its prefix cache: that
        count, read before and after one's own request, tells how much of it another user's prompt shared.)"""
        self.registry.register(_BatchingCollector(read_steps))

    def render(self, in_flight: int, queued: int) -> str:
        self.in_flight.set(in_flight)
        self.queue_depth.set(queued)
        return generate_latest(self.registry).decode()


class _BatchingCollector(Collector):
    def __init__(self, read_steps: Callable[[], int]) -> None:
        self.read_steps = read_steps

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("edgepack_batch_steps", "Decode steps of the batching engine (each may carry "
                                  "several requests' tokens).", value=self.read_steps())
