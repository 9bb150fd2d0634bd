"""What one server holds while it runs: its settings, the model (once loaded), the admission bounds, the metrics and
the upstream client."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from edgepack.core.errors import ApiError
from edgepack.serve.admission import Slots
from edgepack.serve.config import ServerConfig
from edgepack.serve.metrics import Metrics
from edgepack.serve.router import Upstream
from edgepack.serve.session import ModelSession


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: ModelSession | None = None
        self.load_error: str | None = None
        self.engine = asyncio.Semaphore(1)  # generations at once: the model's concurrency, once it is loaded
        self.generations: ThreadPoolExecutor | None = None  # a thread for each generation that runs
        self.metrics = Metrics()
        retry = config.retry_after_s
        self.local = Slots(1 + config.max_queue, lambda n: f"the server is busy: {n} requests are running or queued "
                           f"(the queue holds {config.max_queue}); retry after {retry} s", "queue_full", retry,
                           on_full=self.metrics.count_busy)
        self.remote = Slots(config.max_upstream, lambda n: f"the server is busy: {n} requests to the upstream model "
                            f"are in flight (--max-upstream {config.max_upstream}); retry after {retry} s",
                            "upstream_busy", retry, on_full=self.metrics.count_busy)
        self.upstream = Upstream(config.router) if config.router.policy != "local" else None

    def set_model(self, model: ModelSession) -> None:
        """The loaded model: as many generations run at once as it takes; the queue waits beyond those."""
        self.engine = asyncio.Semaphore(model.concurrency)
        self.generations = ThreadPoolExecutor(max_workers=model.concurrency, thread_name_prefix="edgepack-generate")
        self.local.limit = model.concurrency + self.config.max_queue
        if model.runtime.generates_concurrently:
            counters = model.runtime.scheduler().counters
            self.metrics.watch_batching(lambda: counters.steps)
        self.model = model  # last: requests see the model only when all of the above is ready

    @property
    def in_flight(self) -> int:
        """Local generations running or waiting for the engine."""
        return self.local.in_use

    def require_model(self) -> ModelSession:
        if self.model is None:
            raise ApiError(503, self.load_error or "the model is still loading; GET /health says when it is ready",
                           "server_error", code="model_not_ready", headers={"Retry-After": "1"})
        return self.model
