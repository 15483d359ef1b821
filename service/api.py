"""`edgekif api`: an OpenAI-compatible HTTP endpoint for the live version (DATA_DIR/models/current).

    POST /v1/chat/completions   chat.completion, or chat.completion.chunk server-sent events with stream=true
    GET  /v1/models             the live version as "edgekif:vNNNN", plus the alias "edgekif"
    GET  /v1/models/{id}

Decoding is greedy, always: temperature, top_p, seed, stop, ... are accepted (clients send them
by default) and ignored, so an answer equals `edgekif infer` / GenaiRunner.generate on the same
messages. n must be 1.

Version switch: each request reads the `current` link (one readlink) and, when it names a new
version, opens it before serving; the request then holds a lease on that runner, so a request
that started (a stream included) finishes on the version it started on. A runner that is no
longer live is dropped when its last lease is released.

Bounds (ApiSettings): body size (413), max_tokens (400, param max_tokens), and concurrency:
`concurrency` generations run at once in a thread pool of that size (onnxruntime-genai blocks, the
event loop must not), up to `queue` more requests wait in line, and any request beyond that gets
429 at once with Retry-After (a bounded queue, so a burst is absorbed but memory and latency stay
bounded). Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""


import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from edgekif.errors import EdgekifError
from edgekif.layout import DataLayout
from edgekif.publish import VERSION_RE

log = logging.getLogger(__name__)

MODEL_NAME = "edgekif"
# Ollama listens on 11434; the next port lets both run side by side on one machine.
DEFAULT_PORT = 11435
ROLES = ("system", "user", "assistant")


@dataclass
class ApiSettings:
    max_body_bytes: int = 1 << 20  # 1 MiB: far more than any chat a 2k-8k-token context can hold
    max_tokens: int = 1024  # upper bound for max_tokens, and its value when a request gives none
    concurrency: int = 2  # generations at once (each uses several onnxruntime threads)
    queue: int = 16  # requests that may wait for a free generation slot; beyond: 429


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- runners


@dataclass(eq=False)
class Slot:
    """One opened version and the number of requests using it."""

    version: str
    runner: Any
    refs: int = 0


class RunnerPool:
    """The live runner plus older ones still used by requests in flight.

    acquire() blocks (it may open a new version): call it from a worker thread. release() only
    takes a short lock, so the event loop may call it.
    """

    def __init__(self, data_dir: str | os.PathLike, opener: Callable[[Path], Any] | None = None) -> None:
        from edgekif.publish import open_current

        self.data_dir = Path(data_dir)
        self.link = DataLayout(self.data_dir).current
        self._open = opener or open_current
        self._load_lock = threading.Lock()  # one version opens at a time
        self._lock = threading.Lock()  # guards refs, _live and _slots; held only briefly
        self._live: Slot | None = None
        self._slots: set[Slot] = set()  # every slot not yet closed (live + draining)
        self._failed: str | None = None  # failed to open: not retried while an older one serves, until the link changes

    def live_name(self) -> str | None:
        """The version `current` names now (one readlink), or None if nothing is published."""
        try:
            name = os.path.basename(os.readlink(self.link).rstrip("/"))
        except OSError:
            return None
        return name if VERSION_RE.match(name) else None

    def open_versions(self) -> list[str]:
        with self._lock:
            return sorted(s.version for s in self._slots)

    def acquire(self) -> Slot:
        target = self.live_name()
        with self._load_lock:
            live = self._live
            if target is not None and (live is None or (live.version != target and target != self._failed)):
                self._switch(target)
            with self._lock:
                if self._live is None:
                    raise ApiError(503, f"{self.link}: no model version is published yet", type="server_error", code="model_not_available")
                self._live.refs += 1
                return self._live

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.refs -= 1
            if slot.refs == 0 and slot is not self._live:
                self._close(slot)

    def close(self) -> None:
        with self._lock:
            for slot in list(self._slots):
                self._close(slot)
            self._live = None

    def _switch(self, target: str) -> None:
        t0 = time.perf_counter()
        try:
            runner = self._open(self.data_dir)  # resolves the link again: may be newer than target
        except (EdgekifError, OSError) as e:
            self._failed = target
            log.error("cannot open the published version; serving the previous one", extra={"version": target, "error": str(e),
                      "serving": self._live.version if self._live else None})
            return
        self._failed = None
        slot = Slot(version=str(runner.version), runner=runner)
        with self._lock:
            old, self._live = self._live, slot
            self._slots.add(slot)
            if old is not None and old.refs == 0:
                self._close(old)
        log.info("serving model version", extra={"version": slot.version, "previous": old.version if old else None,
                                                   "open_s": round(time.perf_counter() - t0, 3)})

    def _close(self, slot: Slot) -> None:
        """Drop a runner no request uses (caller holds _lock); onnxruntime frees it with the last reference."""
        if slot not in self._slots:
            return
        self._slots.discard(slot)
        close = getattr(slot.runner, "close", None)
        if callable(close):
            close()
        slot.runner = None
        log.info("closed model version", extra={"version": slot.version})


# --------------------------------------------------------------------------- generation


@dataclass
class Result:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


def generate(runner: Any, messages: list[dict[str, str]], max_tokens: int, on_delta: Callable[[str], None] | None = None,
             stop: threading.Event | None = None) -> Result:
    """Greedy answer to chat messages; on_delta(text) gets the answer in pieces as it grows.

    For an onnxruntime-genai runner this is GenaiRunner.generate_ids's loop, with EOS/length told
    apart for finish_reason and an early stop when the client has gone. Pieces are differences of
    decodes of the whole answer so far (a trailing partial UTF-8 character is held back), so they
    join to exactly the non-streamed text.
    """
    from edgekif.infer import GenaiRunner

    if not isinstance(runner, GenaiRunner):  # plain ONNX target: no incremental path, one piece
        n_prompt = len(runner.chat_ids(messages))
        ids = runner.generate_ids(messages, max_tokens)
        text = runner.tokenizer.decode(ids, skip_special_tokens=True)
        if on_delta and text:
            on_delta(text)
        return Result(text, n_prompt, len(ids), "length" if len(ids) >= max_tokens else "stop")

    og, tok = runner._og, runner.tokenizer
    ids = tok.encode(runner.chat_text(messages))
    n_prompt = len(ids)
    if n_prompt + 1 > runner.context_length:
        raise ApiError(400, f"the messages take {n_prompt} tokens; the model's context length is {runner.context_length}",
                       param="messages", code="context_length_exceeded")
    gen = og.Generator(runner.model, runner._params(n_prompt, max_tokens))
    gen.append_tokens(ids)
    out: list[int] = []
    sent = ""
    finish = "length"
    while len(out) < max_tokens:
        if gen.is_done():  # context length reached
            break
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token in runner.eos_ids:
            finish = "stop"
            break
        out.append(token)
        if on_delta is not None:
            text = tok.decode(out)
            if not text.endswith("\ufffd") and text.startswith(sent) and len(text) > len(sent):
                on_delta(text[len(sent):])
                sent = text
        if stop is not None and stop.is_set():  # the client disconnected: nobody reads the rest
            finish = "cancelled"
            break
    text = tok.decode(out)
    if on_delta is not None and text.startswith(sent) and len(text) > len(sent):
        on_delta(text[len(sent):])
    return Result(text, n_prompt, len(out), finish)


# --------------------------------------------------------------------------- requests


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    ignored: list[str] = field(default_factory=list)


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]: text parts only
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, "only text content parts are supported", param=f"messages[{i}].content[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, "content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_chat_request(body: bytes, settings: ApiSettings) -> ChatRequest:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = obj.get("model", MODEL_NAME)
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    raw = obj.get("messages")
    if raw is None:
        raise ApiError(400, "missing required parameter: messages", param="messages", code="missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, "each message must be an object with role and content", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise ApiError(400, f"role must be one of {', '.join(ROLES)} (got {role!r})", param=f"messages[{i}].role")
        if "content" not in m or m["content"] is None:
            raise ApiError(400, "missing content", param=f"messages[{i}].content")
        messages.append({"role": role, "content": _content(m["content"], i)})
    # max_completion_tokens is the newer name of max_tokens; either bounds the answer
    param = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = obj.get(param)
    if max_tokens is None:
        max_tokens = settings.max_tokens
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"{param} must be a positive integer", param=param)
    elif max_tokens > settings.max_tokens:
        raise ApiError(400, f"{param} is {max_tokens}; this server allows at most {settings.max_tokens}", param=param, code="max_tokens_exceeded")
    n = obj.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "only n=1 is supported (decoding is greedy: every choice would be the same)", param="n")
    stream = obj.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    opts = obj.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    ignored = sorted(k for k in ("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty",
                                  "logit_bias", "repetition_penalty") if obj.get(k) is not None)
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens, stream=stream, include_usage=include_usage, ignored=ignored)


def model_id(version: str) -> str:
    return f"{MODEL_NAME}:{version}"


def check_model(name: str, live: str | None) -> None:
    """Accept "edgekif", "edgekif:vNNNN" or "vNNNN" for the live version; anything else is 404."""
    if live is None:
        raise ApiError(503, "no model version is published yet", type="server_error", code="model_not_available")
    if name not in (MODEL_NAME, model_id(live), live):
        raise ApiError(404, f"The model `{name}` does not exist (this server serves `{MODEL_NAME}`, now `{model_id(live)}`)",
                       param="model", code="model_not_found")


class Limiter:
    """`concurrency` holders at once, up to `queue` waiting; beyond that, 429. Event-loop only."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency, self.queue = concurrency, queue
        self._sem = asyncio.Semaphore(concurrency)
        self.pending = 0  # holding or waiting

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


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(r: Result) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "total_tokens": r.prompt_tokens + r.completion_tokens}


def create_app(data_dir: str | os.PathLike, settings: ApiSettings | None = None, *, opener: Callable[[Path], Any] | None = None):
    """The FastAPI app serving DATA_DIR/models/current. `opener(data_dir)` opens the live version
    (default edgekif.publish.open_current; tests wrap it)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    settings = settings or ApiSettings()
    pool = RunnerPool(data_dir, opener)
    executor = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="edgekif-gen")
    limiter: Limiter | None = None  # made on the server's event loop

    @asynccontextmanager
    async def lifespan(app):
        nonlocal limiter
        limiter = Limiter(settings.concurrency, settings.queue)
        app.state.limiter = limiter
        try:
            yield
        finally:
            executor.shutdown(wait=True)
            pool.close()

    app = FastAPI(title="edgekif", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.settings = pool, settings
    _install_error_handlers(app)

    def _model_row(name: str, live: str) -> dict[str, Any]:
        try:
            created = int(os.stat(DataLayout(pool.data_dir).version(live)).st_mtime)
        except OSError:
            created = 0
        return {"id": name, "object": "model", "created": created, "owned_by": MODEL_NAME}

    @app.get("/v1/models")
    async def list_models():
        live = pool.live_name()
        rows = [] if live is None else [_model_row(model_id(live), live), _model_row(MODEL_NAME, live)]
        return {"object": "list", "data": rows}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        live = pool.live_name()
        check_model(name, live)
        return _model_row(name, live)  # type: ignore[arg-type]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat_request(await _read_body(request, settings.max_body_bytes), settings)
        check_model(req.model, pool.live_name())
        assert limiter is not None
        await limiter.acquire()
        loop = asyncio.get_running_loop()
        try:
            slot = await loop.run_in_executor(None, pool.acquire)  # may open a new version: off the event loop
        except BaseException:
            limiter.release()
            raise
        if req.model not in (MODEL_NAME, model_id(slot.version), slot.version):  # a pinned version switched meanwhile
            pool.release(slot)
            limiter.release()
            check_model(req.model, slot.version)
        cid, created = _completion_id(), int(time.time())
        head = {"id": cid, "created": created, "model": model_id(slot.version), "system_fingerprint": slot.version}
        headers = {"X-Edgekif-Version": slot.version}
        if req.ignored:
            log.debug("ignored sampling options (greedy decoding)", extra={"options": req.ignored})
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def push(item: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def work() -> Result:
            # The lease and the slot live exactly as long as the generation, whatever the client
            # does: released here, not in the response, which may never be iterated.
            try:
                return generate(slot.runner, req.messages, req.max_tokens, push if req.stream else None, stop)
            finally:
                pool.release(slot)
                loop.call_soon_threadsafe(limiter.release)

        t0 = time.perf_counter()
        future = loop.run_in_executor(executor, work)
        if not req.stream:
            try:
                r = await future
            except ApiError:
                raise
            except Exception as e:
                log.exception("generation failed", extra={"version": slot.version})
                raise ApiError(500, f"generation failed: {e}", type="server_error") from e
            log.info("chat completion", extra={"version": slot.version, "prompt_tokens": r.prompt_tokens,
                                               "completion_tokens": r.completion_tokens, "s": round(time.perf_counter() - t0, 3)})
            return JSONResponse({
                **head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason, "logprobs": None}],
                "usage": _usage(r),
            }, headers=headers)

        future.add_done_callback(lambda f: events.put_nowait(f))  # runs on the loop: the end marker
        return StreamingResponse(_sse(events, head, slot.version, req.include_usage, stop, t0), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _install_error_handlers(app: Any) -> None:
    """Every error answers with OpenAI's error body."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)


async def _sse(events: asyncio.Queue, head: dict[str, Any], version: str, include_usage: bool, stop: threading.Event, t0: float) -> AsyncIterator[str]:
    """A streamed chat completion: the tokens the worker pushes into `events`, then its end
    (the finished future), as server-sent events."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await events.get()
            if isinstance(item, str):
                yield chunk({"content": item})
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
            yield chunk({}, "length" if r.finish_reason == "cancelled" else r.finish_reason)
            if include_usage:
                yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(r)})}\n\n"
            yield "data: [DONE]\n\n"
            log.info("chat completion (stream)", extra={"version": version, "prompt_tokens": r.prompt_tokens,
                                                        "completion_tokens": r.completion_tokens, "s": round(time.perf_counter() - t0, 3)})
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

    kw: dict[str, Any] = {"log_level": log_level, "access_log": False}  # one "chat completion" line per request instead
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

    config = server_config(create_app(data_dir, settings), host=host, port=port, socket_path=socket_path, own_logging=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
