"""`edgekif api`: an OpenAI-compatible HTTP endpoint for every kept model version.

    POST /v1/chat/completions   chat.completion, or chat.completion.chunk server-sent events with stream=true
    POST /v1/completions        text_completion (the prompt as one user message through the chat template)
    GET  /v1/models             every kept version ("edgekif:vNNNN") plus "edgekif" / "edgekif:latest" for the live one
    GET  /v1/models/{id}
    GET  /health                liveness and the live version
    GET  /metrics               Prometheus text format (service/api_metrics.py)

Model names: "edgekif" and "edgekif:latest" follow `current`; "edgekif:vNNNN" (or "vNNNN") pins a
kept version, opened on demand and unloaded after keep_alive idle seconds (service/api_pool.py).
Each request holds a lease on its runner, so a request that started (a stream included)
finishes on the version it started on.

Decoding is greedy unless temperature > 0; temperature, top_p, top_k, seed, stop and
repetition_penalty are honoured, anything that cannot be is refused with a 400 naming the
parameter (service/api_params.py). Text is whole UTF-8 characters, in pieces that join to the
answer (edgekif.decoding).

Bounds (ApiSettings): body size (413), max_tokens (400, param max_tokens), and concurrency:
`concurrency` generations run at once in a thread pool of that size (onnxruntime-genai blocks, the
event loop must not), up to `queue` more requests wait in line, and any request beyond that gets
429 at once with Retry-After (a bounded queue, so a burst is absorbed but memory and latency stay
bounded). Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""


import asyncio
import datetime as _dt
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from edgekif.decoding import DecodingError
from edgekif.errors import EdgekifError
from edgekif.infer import Completion, ContextLengthError
from edgekif.publish import VERSION_RE

from .api_params import MODEL_NAME, ApiError, ApiLimits, GenRequest, parse_request
from .api_pool import RunnerPool, Slot

__all__ = ["ApiError", "ApiSettings", "create_app", "remove_stale_socket", "server_config", "serve", "RunnerPool", "Slot"]

log = logging.getLogger(__name__)

# Ollama listens on 11434; the next port lets both run side by side on one machine.
DEFAULT_PORT = 11435
LATEST = f"{MODEL_NAME}:latest"


@dataclass
class ApiSettings:
    max_body_bytes: int = 1 << 20  # 1 MiB: far more than any chat a 2k-8k-token context can hold
    max_tokens: int = 1024  # upper bound for max_tokens, and its value when a request gives none
    concurrency: int = 2  # generations at once (each uses several onnxruntime threads)
    queue: int = 16  # requests that may wait for a free generation slot; beyond: 429
    keep_alive: float = 300.0  # seconds a pinned (not live) version stays loaded after its last request (Ollama's default 5 min)
    max_loaded: int = 3  # versions held in memory at once, the live one included (~300 MB each for SmolLM2 int8)
    warmup: bool = False  # open the live version and generate one token at start, before the first request waits for it


# --------------------------------------------------------------------------- generation


def generate(runner: Any, req: GenRequest, on_delta: Callable[[str], None] | None = None,
             stop: threading.Event | None = None) -> Completion:
    """The answer to a request; on_delta(text) gets it in pieces as it grows (whole characters,
    nothing past a stop string), joining to exactly the returned text."""
    try:
        return runner.complete(req.messages, req.max_tokens, sampling=req.sampling, stops=req.stops, on_text=on_delta,
                               cancel=stop.is_set if stop is not None else None)
    except ContextLengthError as e:
        raise ApiError(400, f"the messages take {e.prompt_tokens} tokens; the model's context length is {e.context_length}",
                       param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded") from None
    except DecodingError as e:
        raise ApiError(400, str(e), param=e.param, code="unsupported_parameter") from None


# --------------------------------------------------------------------------- model names


def model_id(version: str) -> str:
    return f"{MODEL_NAME}:{version}"


def pinned_version(name: str) -> str | None:
    """The version a model name pins ("edgekif:v0003" or "v0003"), None for the live aliases;
    anything else is 404."""
    if name in (MODEL_NAME, LATEST):
        return None
    version = name.removeprefix(f"{MODEL_NAME}:")
    if VERSION_RE.match(version):
        return version
    raise ApiError(404, f"The model `{name}` does not exist (this server serves `{MODEL_NAME}`, `{LATEST}` and `{MODEL_NAME}:vNNNN` "
                   "for each kept version: GET /v1/models)", param="model", code="model_not_found")


class Limiter:
    """`concurrency` holders at once, up to `queue` waiting; beyond that, 429. Event-loop only."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency, self.queue = concurrency, queue
        self._sem = asyncio.Semaphore(concurrency)
        self.pending = 0  # holding or waiting

    @property
    def waiting(self) -> int:
        return max(0, self.pending - self.concurrency)

    async def acquire(self) -> None:
        if self.pending >= self.concurrency + self.queue:
            raise ApiError(429, f"the server is busy ({self.concurrency} generating, {self.queue} waiting); retry shortly",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.pending += 1
        try:
            await self._sem.acquire()
        except BaseException:
            self.pending -= 1
            raise

    def release(self) -> None:
        self._sem.release()
        self.pending -= 1


# --------------------------------------------------------------------------- app


async def _read_body(request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", param=None, code="request_too_large")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads have no Content-Length: count as we go
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _usage(r: Completion) -> dict[str, int]:
    n = len(r.ids)
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": n, "total_tokens": r.prompt_tokens + n}


def _epoch(iso: str | None) -> int:
    try:
        return int(_dt.datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0


class VersionCatalog:
    """Kept versions and their manifests' figures, for /v1/models. A version folder never
    changes, so its row is read once (a manifest holds every holdout answer: not per request)."""

    def __init__(self, pool: RunnerPool) -> None:
        self.pool = pool
        self._rows: dict[str, dict[str, Any]] = {}

    def _describe(self, name: str) -> dict[str, Any]:
        if name not in self._rows:
            from edgekif.export.manifest import read_manifest
            from edgekif.errors import IntegrityError

            try:
                m = read_manifest(self.pool.store.models / name)
            except IntegrityError as e:
                return {"created": 0, "edgekif": {"version": name, "error": str(e)}}
            # `created` is the publish time, the one `edgekif models` and `status` show
            self._rows[name] = {"created": _epoch(m.published_at), "edgekif": {
                "version": name, "created": m.created, "published": m.published_at, "tasks": m.task_names, "scores": m.scores or {}, "accuracies": m.accuracies,
                "metrics": {t: s.get("metric") for t, s in (m.task_specs or {}).items()}, "export": m.export, "job_id": m.job_id}}
        return self._rows[name]

    def rows(self) -> list[dict[str, Any]]:
        kept = self.pool.store.versions()
        self._rows = {k: v for k, v in self._rows.items() if k in kept}
        live = self.pool.live_name()
        loaded = set(self.pool.open_versions())

        def row(name: str, version: str) -> dict[str, Any]:
            d = self._describe(version)
            return {"id": name, "object": "model", "created": d["created"], "owned_by": MODEL_NAME,
                    "edgekif": {**d["edgekif"], "live": version == live, "loaded": version in loaded}}

        aliases = [row(MODEL_NAME, live), row(LATEST, live)] if live in kept else []
        return aliases + [row(model_id(v), v) for v in reversed(kept)]  # newest first, as `ollama list`


def create_app(data_dir: str | os.PathLike, settings: ApiSettings | None = None, *, opener: Callable[[Path], Any] | None = None,
               version_opener: Callable[[Path, str], Any] | None = None):
    """The FastAPI app serving DATA_DIR/models/. `opener(data_dir)` opens the live version
    (default edgekif.publish.open_current), `version_opener(data_dir, "vNNNN")` a pinned one
    (default edgekif.publish.open_version); tests wrap them."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from .api_metrics import AccessLog, ApiMetrics

    settings = settings or ApiSettings()
    limits = ApiLimits(max_tokens=settings.max_tokens)
    pool = RunnerPool(data_dir, opener, version_opener=version_opener, keep_alive=settings.keep_alive, max_loaded=settings.max_loaded)
    catalog = VersionCatalog(pool)
    executor = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="edgekif-gen")
    limiter: Limiter | None = None  # made on the server's event loop
    metrics = ApiMetrics(queue_depth=lambda: limiter.waiting if limiter else 0,
                         in_progress=lambda: min(limiter.pending, limiter.concurrency) if limiter else 0, loaded=pool.loaded)

    async def sweeper() -> None:
        # unloads idle pinned versions; a pass every few seconds costs a few stat() calls
        while True:
            await asyncio.sleep(max(0.05, min(settings.keep_alive / 4, 5.0)))
            pool.sweep()

    def warm_up() -> None:
        from edgekif.decoding import GREEDY

        t0 = time.perf_counter()
        slot = pool.acquire()
        try:  # one token: onnxruntime allocates its buffers on the first run
            slot.runner.complete([{"role": "user", "content": "Hello"}], 1, sampling=GREEDY)
        finally:
            pool.release(slot)
        log.info("warmed up the live version", extra={"version": slot.version, "s": round(time.perf_counter() - t0, 3)})

    @asynccontextmanager
    async def lifespan(app):
        nonlocal limiter
        limiter = Limiter(settings.concurrency, settings.queue)
        app.state.limiter = limiter
        task = asyncio.create_task(sweeper())
        if settings.warmup:
            try:
                await asyncio.get_running_loop().run_in_executor(executor, warm_up)
            except (ApiError, EdgekifError) as e:  # nothing published yet: requests get 503 until something is
                log.warning("warm-up skipped", extra={"error": getattr(e, "message", str(e))})
        try:
            yield
        finally:
            task.cancel()
            executor.shutdown(wait=True)
            pool.close()

    app = FastAPI(title="edgekif", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.settings, app.state.metrics = pool, settings, metrics
    _install_error_handlers(app)
    app.add_middleware(AccessLog, metrics=metrics, endpoints={"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "live": pool.live_name(), "serving": pool.serving(), "loaded": pool.open_versions()}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": catalog.rows()}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        pinned_version(name)  # 404 for names that are no model
        for row in catalog.rows():
            if row["id"] == name or row["id"] == model_id(name):
                return {**row, "id": name}
        raise ApiError(404, f"The model `{name}` does not exist (kept: {', '.join(pool.store.versions()) or 'none'})", param="model",
                       code="model_not_found")

    async def completion(request: Request, kind: str):
        state = request.state
        req = parse_request(await _read_body(request, settings.max_body_bytes), limits, kind)
        state.model, state.stream = req.model, req.stream
        pinned = pinned_version(req.model)
        assert limiter is not None
        await limiter.acquire()
        loop = asyncio.get_running_loop()
        try:
            slot = await loop.run_in_executor(None, pool.acquire, pinned)  # may open a version: off the event loop
        except BaseException:
            limiter.release()
            raise
        if pinned is not None and slot.version != pinned:  # `current` named it, but it failed to open: another serves
            pool.release(slot)
            limiter.release()
            raise ApiError(503, f"version {pinned} cannot be opened now (see the server's log)", type="server_error", code="model_not_available")
        state.version = slot.version
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id(slot.version),
                "system_fingerprint": slot.version}
        headers = {"X-Edgekif-Version": slot.version}
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def push(item: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def work() -> Completion:
            # The lease and the slot live exactly as long as the generation, whatever the client
            # does: released here, not in the response, which may never be iterated.
            try:
                return generate(slot.runner, req, push if req.stream else None, stop)
            finally:
                pool.release(slot)
                loop.call_soon_threadsafe(limiter.release)

        def account(r: Completion) -> None:
            state.prompt_tokens, state.completion_tokens, state.finish_reason = r.prompt_tokens, len(r.ids), r.finish_reason
            metrics.tokens.labels(slot.version).inc(len(r.ids))
            metrics.prompt_tokens.labels(slot.version).inc(r.prompt_tokens)

        future = loop.run_in_executor(executor, work)
        if not req.stream:
            try:
                r = await future
            except ApiError:
                raise
            except Exception as e:
                log.exception("generation failed", extra={"version": slot.version})
                raise ApiError(500, f"generation failed: {e}", type="server_error") from e
            account(r)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason, "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                obj = "text_completion"
            return JSONResponse({**head, "object": obj, "choices": [choice], "usage": _usage(r)}, headers=headers)

        future.add_done_callback(lambda f: events.put_nowait(f))  # runs on the loop: the end marker
        return StreamingResponse(_sse(events, head, kind, slot.version, req.include_usage, stop, account), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, "chat")

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        return await completion(request, "text")

    return app


def _install_error_handlers(app: Any) -> None:
    """Every error answers with OpenAI's error body."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        request.state.error_code, request.state.error_param = e.code, e.param  # for the access log line
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)


async def _sse(events: asyncio.Queue, head: dict[str, Any], kind: str, version: str, include_usage: bool, stop: threading.Event,
               account: Callable[[Completion], None]) -> AsyncIterator[str]:
    """A streamed completion: the text pieces the worker pushes into `events`, then its end
    (the finished future), as server-sent events."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None = None, *, first: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]}, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        if kind == "chat":
            yield chunk(None, first=True)
        while True:
            item = await events.get()
            if isinstance(item, str):
                yield chunk(item)
                continue
            try:  # the future: generation ended
                r = item.result()
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            except Exception as e:
                log.exception("generation failed", extra={"version": version})
                yield f"data: {json.dumps(ApiError(500, f'generation failed: {e}', type='server_error').body())}\n\n"
                return
            account(r)
            yield chunk(None, "length" if r.finish_reason == "cancelled" else r.finish_reason)
            if include_usage:
                yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': _usage(r)})}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        stop.set()  # the client went away (or we are done): the worker stops at the next token


# --------------------------------------------------------------------------- server


def remove_stale_socket(path: Path) -> None:
    """uvicorn cannot bind over an old socket file: remove it if nothing listens there."""
    import socket
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise EdgekifError(f"{path}: exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
    raise EdgekifError(f"{path}: another server is listening on this socket")


def server_config(app, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, socket_path: str | None = None, log_level: str = "info",
                  own_logging: bool = True):
    """uvicorn's config; own_logging=False leaves uvicorn's loggers to the root handlers (JSON)."""
    import uvicorn

    kw: dict[str, Any] = {"log_level": log_level, "access_log": False}  # our own "request" line per request instead (api_metrics)
    if not own_logging:
        kw["log_config"] = None
    if socket_path:
        remove_stale_socket(Path(socket_path))
        return uvicorn.Config(app, uds=socket_path, **kw)
    return uvicorn.Config(app, host=host, port=port, **kw)


def serve(data_dir: str | os.PathLike, settings: ApiSettings, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          socket_path: str | None = None) -> int:
    """Run the API in the foreground until SIGINT/SIGTERM (uvicorn handles both)."""
    import uvicorn

    models = Path(data_dir) / "models"
    if not Path(data_dir).is_dir():  # a typo in --data-dir would otherwise serve 503s forever
        log.warning("the data directory does not exist", extra={"data_dir": str(data_dir)})
        raise EdgekifError(f"{data_dir}: no such data directory (give the daemon's --data-dir)")
    if not models.is_dir():
        log.warning("nothing published yet: requests get 503 until the daemon publishes a version", extra={"models": str(models)})
    config = server_config(create_app(data_dir, settings), host=host, port=port, socket_path=socket_path, own_logging=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
