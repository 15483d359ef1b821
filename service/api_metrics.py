"""`edgekif api`'s operations side: Prometheus metrics (GET /metrics) and one structured access
log line per request, rejected ones included.

Metrics live in a CollectorRegistry of the app's own (not prometheus_client's global one), so
two apps in one process (the tests) count apart. The access log is a pure ASGI middleware: it
sees the status of every response (errors answered by the exception handlers too) and, for a
stream, waits for its last byte, so the latency is the whole request's. Handlers add fields
(model version, token counts) to the request's `state`, which the line then includes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger("edgekif.api.access")

# Seconds: a label answer takes ~0.1-1 s on a small CPU, a long chat answer tens of seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ApiMetrics:
    def __init__(self, queue_depth: Callable[[], float], in_progress: Callable[[], float],
                 loaded: Callable[[], list[dict[str, Any]]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edgekif_api_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("edgekif_api_request_seconds", "time from request to the response's last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("edgekif_api_tokens_generated", "answer tokens generated", ["version"], registry=r)
        self.prompt_tokens = Counter("edgekif_api_prompt_tokens", "prompt tokens read", ["version"], registry=r)
        Gauge("edgekif_api_queue_depth", "requests waiting for a generation slot", registry=r).set_function(queue_depth)
        Gauge("edgekif_api_generations_in_progress", "requests generating now", registry=r).set_function(in_progress)
        r.register(_LoadedCollector(loaded))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LoadedCollector:
    """edgekif_api_loaded_versions (a count) and edgekif_api_version_loaded{version, live}: read at scrape time."""

    def __init__(self, loaded: Callable[[], list[dict[str, Any]]]) -> None:
        self._loaded = loaded

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        rows = self._loaded()
        yield GaugeMetricFamily("edgekif_api_loaded_versions", "model versions held in memory", value=len(rows))
        per = GaugeMetricFamily("edgekif_api_version_loaded", "1 per loaded version (live: the one `edgekif` names)", labels=["version", "live"])
        for row in rows:
            per.add_metric([row["version"], "true" if row["live"] else "false"], 1)
        yield per


class AccessLog:
    """ASGI middleware: one "request" log line and the request metrics per HTTP request."""

    def __init__(self, app: Any, metrics: ApiMetrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = {"code": 500}

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.endpoints else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            fields = {k: state[k] for k in ("model", "version", "prompt_tokens", "completion_tokens", "finish_reason", "stream", "error_code", "error_param")
                      if state.get(k) is not None}
            client = scope.get("client")
            level = logging.INFO if status["code"] < 500 else logging.ERROR
            if endpoint in ("/health", "/metrics") and status["code"] < 400:  # probes every few seconds would drown the rest
                level = logging.DEBUG
            log.log(level, "request", extra={"method": scope.get("method"), "path": path, "status": status["code"],
                                                 "s": round(seconds, 3), "client": f"{client[0]}:{client[1]}" if client else None, **fields})
