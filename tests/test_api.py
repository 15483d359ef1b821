"""`edgekif api` (service/api.py) on tiny genai exports, with the official `openai` client as
the client: answers equal GenaiRunner.generate, streaming, a version switch during a stream,
the bounds and OpenAI-style error bodies.

Two tiny random Llamas with different weights are exported once per session (v1, v2), so the
version that answered can be told from the answer as well as from its `model` field.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import openai  # the dev extra: a missing client must fail these tests, not skip them
import pytest

from edgekif.infer import GenaiRunner
from edgekif.publish import open_current
from edgekif.publish import ModelStore
from service.api import ApiSettings, create_app, remove_stale_socket, server_config

MAX = 12  # max_tokens in the tests: a few ms per answer on the tiny model
CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Classify: a great movie"}],
]


def _tiny_export(root: Path, seed: int, target: str = "genai") -> Path:
    """An fp32 export (genai unless `target` says) of a tiny Llama whose weights are large enough
    (std 0.3) that greedy answers vary with the prompt and the seed (the default init answers
    "\\n" to everything)."""
    import torch

    from edgekif.export.exporter import export_model
    from tiny_models import tiny_llama
    from edgekif.records import Record

    model, tok = tiny_llama(seed=seed)
    torch.manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        # Byte tokens that are not printable ASCII get a zero (tied) embedding, hence logit 0:
        # a printable byte wins the argmax, so answers are readable text rather than "\ufffd".
        emb = model.get_input_embeddings().weight
        for i in range(len(tok)):
            piece = tok.decode([i])
            if i != tok.eos_token_id and not (piece.isascii() and piece.isprintable() and piece):
                emb[i] = 0.0
    base = root / f"base{seed}-{target}"
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    return export_model(base, root / f"export{seed}-{target}", target=target, precision="fp32", execution_provider="cpu",
                        holdout={"hello": [Record.from_prompt("Hello there", "")]})


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-exports")
    return {"v1": _tiny_export(root, 0), "v2": _tiny_export(root, 1)}


@pytest.fixture(scope="session")
def reference(exports) -> dict[str, GenaiRunner]:
    """Direct onnxruntime-genai runners: what the API's answers must equal."""
    return {k: GenaiRunner(v) for k, v in exports.items()}


@pytest.fixture()
def data_dir(tmp_path, exports) -> Path:
    ModelStore(tmp_path / "data").publish(exports["v1"])
    return tmp_path / "data"


@contextlib.contextmanager
def running(app, **kw):
    """uvicorn in a background thread on a free port; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=0, log_level="warning", **kw))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        if kw.get("socket_path"):
            yield server
        else:
            yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None, chunked: bool = False):
    """(status, headers, parsed JSON body) through http.client: bodies no SDK would send."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        if chunked:
            conn.putrequest(method, path)
            for k, v in {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **(headers or {})}.items():
                conn.putheader(k, v)
            conn.endheaders()
            for i in range(0, len(body or b""), 1024):
                part = body[i : i + 1024]
                conn.send(b"%x\r\n%s\r\n" % (len(part), part))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def post_chat(url: str, obj) -> tuple[int, dict, dict]:
    return raw(url, "POST", "/v1/chat/completions", json.dumps(obj).encode())


def assert_error(body: dict, *, param=None, code=None, type="invalid_request_error") -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    assert err["type"] == type and err["param"] == param and err["code"] == code, body


class Gate:
    """Holds a generation after its second token until released: a stream stays in flight as long
    as the test needs. Installed on one version's runner by wrapping its onnxruntime-genai module."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def opener(self, version: str):
        def open_(data_dir):
            runner = open_current(data_dir)
            if runner.version == version:
                runner._og = _GatedOg(runner._og, self)
            return runner

        return open_


class _GatedOg:
    def __init__(self, og, gate: Gate) -> None:
        self._og, self._gate = og, gate

    def __getattr__(self, name):
        return getattr(self._og, name)

    def Generator(self, model, params):  # noqa: N802 (onnxruntime-genai's name)
        return _GatedGenerator(self._og.Generator(model, params), self._gate)


class _GatedGenerator:
    def __init__(self, gen, gate: Gate) -> None:
        self._gen, self._gate, self._n = gen, gate, 0

    def __getattr__(self, name):
        return getattr(self._gen, name)

    def generate_next_token(self) -> None:
        if self._n == 2:
            self._gate.started.set()
            assert self._gate.release.wait(60), "gate never released"
        self._n += 1
        self._gen.generate_next_token()


# --------------------------------------------------------------------------- answers


def test_chat_completions_equal_genai_runner(data_dir, reference):
    ref = reference["v1"]
    with running(create_app(data_dir)) as url:
        c = client(url)
        for messages in CHATS:
            r = c.chat.completions.create(model="edgekif", messages=messages, max_tokens=MAX, temperature=0, top_p=0.9, seed=3)
            ids = ref.generate_ids(messages, MAX)
            assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
            assert r.model == "edgekif:v0001" and r.system_fingerprint == "v0001"
            assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
            assert r.choices[0].message.content == ref.generate(messages, MAX)  # temperature 0: greedy (top_p, seed change nothing)
            assert r.choices[0].finish_reason == ("length" if len(ids) == MAX else "stop")
            prompt = len(ref.tokenizer.encode(ref.chat_text(messages)))
            assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, len(ids), prompt + len(ids))
        # the answers differ across prompts: equality above is not between constant strings
        assert len({ref.generate(m, MAX) for m in CHATS}) > 1
        # the live version's own name, the pinned id and :latest are accepted too
        for name in ("v0001", "edgekif:v0001", "edgekif:latest"):
            r = c.chat.completions.create(model=name, messages=CHATS[0], max_tokens=3)
            assert r.choices[0].message.content == ref.generate(CHATS[0], 3)
            assert r.usage.completion_tokens == len(ref.generate_ids(CHATS[0], 3))


def test_streaming_chunks_join_to_the_same_answer(data_dir, reference):
    ref = reference["v1"]
    with running(create_app(data_dir)) as url:
        c = client(url)
        for messages in CHATS:
            chunks = list(c.chat.completions.create(model="edgekif", messages=messages, max_tokens=MAX, stream=True,
                                                    stream_options={"include_usage": True}))
            assert all(ch.object == "chat.completion.chunk" and ch.model == "edgekif:v0001" for ch in chunks)
            assert len({ch.id for ch in chunks}) == 1
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text == ref.generate(messages, MAX)
            ids = ref.generate_ids(messages, MAX)
            finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            assert finishes == ["length" if len(ids) == MAX else "stop"]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
        # the wire format: data: {...} events, then data: [DONE]
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": CHATS[0], "max_tokens": 4, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
        assert resp.getheader("x-edgekif-version") == "v0001"
        events = resp.read().decode().split("\n\n")
        conn.close()
        assert events[-2:] == ["data: [DONE]", ""]
        assert all(e.startswith("data: {") for e in events[:-2])


def test_models_list_and_retrieve(data_dir):
    with running(create_app(data_dir)) as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["edgekif", "edgekif:latest", "edgekif:v0001"]
        assert c.models.retrieve("edgekif").owned_by == "edgekif"
        # one publish time per version: the API's `created` is the time `edgekif models` shows
        from edgekif.export.manifest import read_manifest
        import datetime as dt

        published = read_manifest(Path(data_dir) / "models" / "v0001").published_at
        row = c.models.retrieve("edgekif:v0001")
        assert published and row.created == int(dt.datetime.fromisoformat(published).timestamp())
        assert row.model_extra["edgekif"]["published"] == published
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("gpt-4o")


# --------------------------------------------------------------------------- version switch


def test_version_switch_during_a_stream(data_dir, exports, reference):
    """A stream that started on v0001 finishes on v0001 after v0002 is published; a request
    made meanwhile gets v0002; v0001's runner is closed once the stream ends."""
    gate = Gate()
    app = create_app(data_dir, opener=gate.opener("v0001"))
    messages = CHATS[2]
    with running(app) as url:
        c = client(url)
        stream = c.chat.completions.create(model="edgekif", messages=messages, max_tokens=MAX, stream=True)
        first = next(iter(stream))
        assert first.model == "edgekif:v0001"
        assert gate.started.wait(30)  # v0001 is generating, held after its second token

        assert ModelStore(data_dir).publish(exports["v2"]) == "v0002"
        r = c.chat.completions.create(model="edgekif", messages=messages, max_tokens=MAX)
        assert r.model == "edgekif:v0002" and r.choices[0].message.content == reference["v2"].generate(messages, MAX)
        assert [m.id for m in c.models.list().data] == ["edgekif", "edgekif:latest", "edgekif:v0002", "edgekif:v0001"]
        assert app.state.pool.open_versions() == ["v0001", "v0002"]  # v0001 still serves the stream

        gate.release.set()
        rest = list(stream)
        assert all(ch.model == "edgekif:v0001" for ch in rest)
        text = "".join(ch.choices[0].delta.content or "" for ch in [first, *rest] if ch.choices)
        assert text == reference["v1"].generate(messages, MAX)
        assert reference["v1"].generate(messages, MAX) != reference["v2"].generate(messages, MAX)  # the versions are told apart
        assert app.state.pool.open_versions() == ["v0002"]  # released before [DONE] was sent

        r = c.chat.completions.create(model="edgekif", messages=messages, max_tokens=MAX)
        assert r.model == "edgekif:v0002"
        # the old version is kept: its pinned name still answers, from v0001, and the live one stays v0002
        r = c.chat.completions.create(model="v0001", messages=messages, max_tokens=MAX)
        assert r.model == "edgekif:v0001" and r.choices[0].message.content == reference["v1"].generate(messages, MAX)
        assert c.chat.completions.create(model="edgekif", messages=messages, max_tokens=2).model == "edgekif:v0002"


def test_a_version_that_fails_to_open_leaves_the_previous_one_serving(data_dir, exports, reference):
    from edgekif.errors import ModelError
    from edgekif.publish import resolve_current

    opened = []

    def opener(root):
        opened.append(resolve_current(root).name)
        if opened[-1] == "v0002":
            raise ModelError("v0002: cannot load (simulated)")
        return open_current(root)

    app = create_app(data_dir, opener=opener)
    with running(app) as url:
        c = client(url)
        assert c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=MAX).model == "edgekif:v0001"
        ModelStore(data_dir).publish(exports["v2"])
        for _ in range(2):  # v0001 answers; v0002 is tried once, not on every request
            r = c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=MAX)
            assert r.model == "edgekif:v0001" and r.choices[0].message.content == reference["v1"].generate(CHATS[0], MAX)
        assert opened == ["v0001", "v0002"]
        # the next publish is opened: the same model again, as another job's export (its own
        # manifest: publishing the very same export twice only re-points current)
        again = data_dir.parent / "v2-again"
        shutil.copytree(exports["v2"], again)
        manifest = json.loads((again / "manifest.json").read_text())
        (again / "manifest.json").write_text(json.dumps({**manifest, "job_id": 99}))
        ModelStore(data_dir).publish(again)
        r = c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=MAX)
        assert r.model == "edgekif:v0003" and r.choices[0].message.content == reference["v2"].generate(CHATS[0], MAX)
        assert app.state.pool.open_versions() == ["v0003"]


# --------------------------------------------------------------------------- bounds and errors


def test_bad_requests_get_openai_error_bodies(data_dir):
    with running(create_app(data_dir, ApiSettings(max_tokens=16, max_body_bytes=4096))) as url:
        status, _, body = raw(url, "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}')
        assert status == 400
        assert_error(body, code="invalid_json")

        status, _, body = post_chat(url, {"model": "edgekif"})
        assert status == 400
        assert_error(body, param="messages", code="missing_required_parameter")
        status, _, body = post_chat(url, {"messages": []})
        assert status == 400
        assert_error(body, param="messages")
        status, _, body = post_chat(url, {"messages": [{"role": "robot", "content": "hi"}]})
        assert status == 400
        assert_error(body, param="messages[0].role")
        status, _, body = post_chat(url, {"messages": [{"role": "user"}]})
        assert status == 400
        assert_error(body, param="messages[0].content")

        status, _, body = post_chat(url, {"model": "llama3", "messages": CHATS[0]})
        assert status == 404
        assert_error(body, param="model", code="model_not_found")

        status, _, body = post_chat(url, {"messages": CHATS[0], "max_tokens": 17})
        assert status == 400
        assert_error(body, param="max_tokens", code="max_tokens_exceeded")
        status, _, body = post_chat(url, {"messages": CHATS[0], "max_completion_tokens": 1000})
        assert status == 400
        assert_error(body, param="max_completion_tokens", code="max_tokens_exceeded")
        status, _, body = post_chat(url, {"messages": CHATS[0], "max_tokens": 16})
        assert status == 200 and body["usage"]["completion_tokens"] <= 16

        big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        for chunked in (False, True):  # with a Content-Length, and without one (counted as it arrives)
            status, _, body = raw(url, "POST", "/v1/chat/completions", big, chunked=chunked)
            assert status == 413
            assert_error(body, code="request_too_large")

        status, _, body = raw(url, "GET", "/v1/nothing")
        assert status == 404 and body["error"]["code"] == "not_found"

        c = client(url)
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="gpt-4o", messages=CHATS[0])
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=100)
        assert e.value.body["param"] == "max_tokens"


def test_nan_sampling_parameters_are_refused_by_name(data_dir):
    """json.loads reads NaN, which passes every range comparison: it was sampled with (or read as greedy)."""
    with running(create_app(data_dir)) as url:
        for key in ("temperature", "top_p", "repetition_penalty"):
            status, _, body = raw(url, "POST", "/v1/chat/completions",
                                  b'{"messages": [{"role": "user", "content": "hi"}], "seed": 7, "%s": NaN}' % key.encode())
            assert status == 400, body
            assert_error(body, param=key)
            assert "nan" in body["error"]["message"]


def test_lone_surrogates_and_deep_nesting_are_400_not_500(data_dir):
    with running(create_app(data_dir)) as url:
        # valid JSON, not valid Unicode: the tokenizer must not see it
        for path, obj, param in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi\ud800"}]}, "messages[0].content"),
            ("/v1/chat/completions", {"messages": CHATS[1][:1] + [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
             "messages[1].content"),
            ("/v1/completions", {"prompt": "hi\ud800"}, "prompt"),
            ("/v1/completions", {"prompt": ["hi\ud800"]}, "prompt"),
        ):
            status, _, body = raw(url, "POST", path, json.dumps(obj).encode())
            assert status == 400, body
            assert_error(body, param=param)
            assert "lone" in body["error"]["message"] and "surrogate" in body["error"]["message"]
        # nested past the parser's recursion limit: a JSON 400, not a plain-text 500
        deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, headers, body = raw(url, "POST", "/v1/chat/completions", deep)
        assert status == 400 and headers["content-type"] == "application/json", body
        assert_error(body, code="invalid_json")
        assert post_chat(url, {"messages": CHATS[0], "max_tokens": 2})[0] == 200  # and the server still answers


def test_plain_onnx_target_keeps_to_the_context_length(tmp_path_factory, tmp_path):
    """The onnx target re-runs the whole sequence: past max_position_embeddings it answered garbage with 200."""
    from edgekif.errors import ModelError

    export = _tiny_export(tmp_path_factory.mktemp("api-onnx"), 0, target="onnx")
    ModelStore(tmp_path / "data").publish(export)
    runner = open_current(tmp_path / "data")
    assert type(runner).__name__ == "OnnxRunner" and runner.context_length == 512
    runner.eos_ids = set()  # never stops early: the answer runs to its bound
    fits = [{"role": "user", "content": "a" * 486}]  # 505 prompt tokens with the byte-level tokenizer's template
    with running(create_app(tmp_path / "data", opener=lambda _: runner)) as url:
        status, _, body = post_chat(url, {"messages": [{"role": "user", "content": "a" * 700}], "max_tokens": 4})
        assert status == 400
        assert_error(body, param="messages", code="context_length_exceeded")
        assert "719 tokens" in body["error"]["message"] and "512" in body["error"]["message"]
        status, _, body = raw(url, "POST", "/v1/completions", json.dumps({"prompt": "a" * 700, "max_tokens": 4}).encode())
        assert status == 400
        assert_error(body, param="prompt", code="context_length_exceeded")
        status, _, body = post_chat(url, {"messages": fits, "max_tokens": 50})
        assert status == 200, body
        assert body["usage"] == {"prompt_tokens": 505, "completion_tokens": 7, "total_tokens": 512}
        assert body["choices"][0]["finish_reason"] == "length"
    # edgekif infer's and evaluation's paths: each row ends at the context too, a prompt past it is refused
    assert [len(ids) for ids in runner.generate_batch_ids([fits, CHATS[0]], 50)] == [7, 50]
    assert len(runner.generate_ids(fits, 50)) == 7
    with pytest.raises(ModelError, match="prompt of 719 tokens does not fit the context length 512"):
        runner.generate_batch_ids([[{"role": "user", "content": "a" * 700}], CHATS[0]], 4)


def test_no_published_version_is_503(tmp_path):
    with running(create_app(tmp_path / "empty")) as url:
        status, _, body = post_chat(url, {"messages": CHATS[0]})
        assert status == 503
        assert_error(body, type="server_error", code="model_not_available")
        assert raw(url, "GET", "/v1/models")[2] == {"object": "list", "data": []}


def test_concurrency_bound_queues_then_429(data_dir, reference):
    """concurrency=1, queue=1: the second request waits for the first, a third is refused."""
    gate = Gate()
    app = create_app(data_dir, ApiSettings(concurrency=1, queue=1), opener=gate.opener("v0001"))
    with running(app) as url:
        c = client(url)
        stream = c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=MAX, stream=True)
        assert gate.started.wait(30)
        queued: dict = {}
        t = threading.Thread(target=lambda: queued.update(r=post_chat(url, {"messages": CHATS[1], "max_tokens": MAX})))
        t.start()
        deadline = time.monotonic() + 30
        while app.state.limiter.pending < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, body = post_chat(url, {"messages": CHATS[1], "max_tokens": MAX})
        assert status == 429 and headers.get("retry-after") == "1"
        assert_error(body, type="rate_limit_error", code="rate_limit_exceeded")
        assert not queued  # still waiting
        gate.release.set()
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == reference["v1"].generate(CHATS[0], MAX)
        t.join(60)
        status, _, body = queued["r"]
        assert status == 200 and body["choices"][0]["message"]["content"] == reference["v1"].generate(CHATS[1], MAX)
        assert app.state.limiter.pending == 0


def test_unix_socket(data_dir, tmp_path):
    path = tmp_path / "api.sock"
    path_str = str(path)
    with running(create_app(data_dir), socket_path=path_str):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path_str)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["data"][-1]["id"] == "edgekif:v0001"
    # a socket file left behind by a dead server is removed; a live one or a regular file is refused
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "stale.sock"))
    remove_stale_socket(tmp_path / "stale.sock")
    assert not (tmp_path / "stale.sock").exists()
    (tmp_path / "file").write_text("x")
    from edgekif.errors import EdgekifError

    with pytest.raises(EdgekifError, match="not a socket"):
        remove_stale_socket(tmp_path / "file")


def test_cli_api_parses_the_options():
    from service.cli import add_daemon_commands
    from edgekif.cli import build_parser

    args = build_parser(add_daemon_commands).parse_args(["api", "--data-dir", "/d", "--port", "9000", "--socket", "/run/x.sock", "--queue", "0"])
    assert (args.port, args.host, args.socket, args.queue, args.concurrency, args.max_tokens) == (9000, "127.0.0.1", "/run/x.sock", 0, 2, 1024)
    assert build_parser(add_daemon_commands).parse_args(["api"]).port == 11435


# --------------------------------------------------------------------------- issue 23: versions, parameters, operations


def test_every_kept_version_is_addressable(data_dir, exports, reference):
    ModelStore(data_dir).publish(exports["v2"])  # live: v0002; v0001 kept
    app = create_app(data_dir, ApiSettings(keep_alive=0))
    with running(app) as url:
        c = client(url)
        rows = {m.id: m for m in c.models.list().data}
        assert list(rows) == ["edgekif", "edgekif:latest", "edgekif:v0002", "edgekif:v0001"]
        assert rows["edgekif"].model_extra["edgekif"]["version"] == "v0002" and rows["edgekif:v0001"].created > 0
        assert rows["edgekif:v0001"].model_extra["edgekif"]["live"] is False and "accuracies" in rows["edgekif:v0001"].model_extra["edgekif"]
        assert c.models.retrieve("edgekif:v0001").id == "edgekif:v0001"
        r = c.chat.completions.create(model="edgekif:v0001", messages=CHATS[2], max_tokens=MAX)
        assert r.model == "edgekif:v0001" and r.choices[0].message.content == reference["v1"].generate(CHATS[2], MAX)
        assert app.state.pool.open_versions() == []  # keep_alive 0: unloaded after the request; the live one loads on its first
        assert c.chat.completions.create(model="edgekif", messages=CHATS[2], max_tokens=2).model == "edgekif:v0002"
        assert app.state.pool.serving() == "v0002" and app.state.pool.open_versions() == ["v0002"]
        ModelStore(data_dir).remove("v0001")
        status, _, body = post_chat(url, {"model": "edgekif:v0001", "messages": CHATS[0]})
        assert status == 404 and "v0001 was removed" in body["error"]["message"]
        assert_error(body, param="model", code="model_not_found")


def test_sampling_is_seeded_and_stop_strings_cut(data_dir, reference):
    ref = reference["v1"]
    greedy = ref.generate(CHATS[0], MAX)
    with running(create_app(data_dir)) as url:
        c = client(url)
        a, b = (c.chat.completions.create(model="edgekif", messages=CHATS[1], max_tokens=MAX, temperature=0.7, seed=1).choices[0].message.content
                for _ in range(2))
        assert a == b
        others = {c.chat.completions.create(model="edgekif", messages=CHATS[1], max_tokens=MAX, temperature=1.5, seed=s).choices[0].message.content
                  for s in range(2, 6)}
        assert len(others | {a}) > 1  # the seed matters: sampling is really on
        assert c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=MAX,
                                         extra_body={"top_k": 5, "repetition_penalty": 1.0}).choices[0].message.content == greedy
        stop = greedy[3:5]
        assert stop and greedy.find(stop) >= 0
        r = c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=MAX, stop=[stop])
        assert r.choices[0].message.content == greedy[: greedy.find(stop)] and r.choices[0].finish_reason == "stop"
        chunks = list(c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=MAX, stop=stop, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == greedy[: greedy.find(stop)]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 2}, "n"), ({"functions": [{"name": "f"}]}, "functions"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 1}, "presence_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"), ({"min_p": 0.1}, "min_p"),
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
])
def test_unsupported_parameters_are_refused_by_name(data_dir, extra, param):
    app = create_app(data_dir)
    from fastapi.testclient import TestClient

    with TestClient(app) as tc:
        r = tc.post("/v1/chat/completions", json={"messages": CHATS[0], "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
        # their no-op values are accepted (clients send defaults)
        ok = tc.post("/v1/chat/completions", json={"messages": CHATS[0], "max_tokens": 2, "n": 1, "frequency_penalty": 0, "presence_penalty": 0,
                                                    "logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                                                    "user": "u1", "logit_bias": {}})
        assert ok.status_code == 200, ok.json()


def test_text_completions_health_metrics_and_access_log(data_dir, reference, caplog):
    import logging

    ref = reference["v1"]
    as_chat = [{"role": "user", "content": "Hello there"}]
    caplog.set_level(logging.INFO, logger="edgekif.api.access")
    with running(create_app(data_dir)) as url:
        c = client(url)
        r = c.completions.create(model="edgekif", prompt="Hello there", max_tokens=MAX)
        assert r.object == "text_completion" and r.choices[0].text == ref.generate(as_chat, MAX) and r.model == "edgekif:v0001"
        r = c.completions.create(model="edgekif", prompt=["Hello there"], max_tokens=MAX, stream=True)
        assert "".join(ch.choices[0].text for ch in r if ch.choices) == ref.generate(as_chat, MAX)
        status, _, body = raw(url, "POST", "/v1/completions", json.dumps({"prompt": "x", "echo": True}).encode())
        assert status == 400 and body["error"]["param"] == "echo"
        status, _, body = raw(url, "POST", "/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode())
        assert status == 400 and body["error"]["param"] == "prompt"
        assert raw(url, "GET", "/health")[:3:2] == (200, {"status": "ok", "live": "v0001", "serving": "v0001", "loaded": ["v0001"]})
        conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    assert 'edgekif_api_requests_total{endpoint="/v1/completions",status="200"} 2.0' in text
    assert 'edgekif_api_requests_total{endpoint="/v1/completions",status="400"} 2.0' in text
    assert "edgekif_api_request_seconds_bucket" in text and 'edgekif_api_tokens_generated_total{version="v0001"}' in text
    assert "edgekif_api_queue_depth 0.0" in text and "edgekif_api_loaded_versions 1.0" in text
    lines = [r for r in caplog.records if r.name == "edgekif.api.access"]
    assert any(r.status == 400 and r.error_param == "echo" for r in lines)
    assert any(r.status == 200 and r.version == "v0001" and r.completion_tokens > 0 for r in lines)


class _ScriptedOg:
    """onnxruntime-genai with a generator that emits given tokens: answers with multi-byte characters."""

    def __init__(self, og, tokens):
        self._og, self._tokens = og, tokens

    def __getattr__(self, name):
        return getattr(self._og, name)

    def Generator(self, model, params):  # noqa: N802
        outer = self

        class Gen:
            def __init__(self):
                self.i = -1

            def append_tokens(self, ids):
                pass

            def is_done(self):
                return False

            def generate_next_token(self):
                self.i += 1

            def get_next_tokens(self):
                return [outer._tokens[min(self.i, len(outer._tokens) - 1)]]

        return Gen()


def test_answers_are_whole_utf8_characters(data_dir):
    text = "héllo 😀 中"
    runner = open_current(data_dir)
    eos = next(iter(runner.eos_ids))
    tokens = [int(t) for t in runner.tokenizer.encode(text)] + [eos]
    assert len(tokens) > len(text) + 1  # byte-level: the emoji and the CJK take several tokens each
    runner._og = _ScriptedOg(runner._og, tokens)
    emoji_end = text.index("😀") + 1
    cut = len(text[:emoji_end].encode()) - 1  # max_tokens ending inside the emoji
    with running(create_app(data_dir, opener=lambda _: runner)) as url:
        c = client(url)
        assert c.chat.completions.create(model="edgekif", messages=CHATS[0]).choices[0].message.content == text
        chunks = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(model="edgekif", messages=CHATS[0], stream=True) if ch.choices]
        assert "".join(chunks) == text and not any("\ufffd" in p for p in chunks)
        r = c.chat.completions.create(model="edgekif", messages=CHATS[0], max_tokens=cut)
        assert r.choices[0].message.content == text[: emoji_end - 1] and r.choices[0].finish_reason == "length"
        chunks = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(model="edgekif", messages=CHATS[0], stream=True, max_tokens=cut)
                  if ch.choices]
        assert "".join(chunks) == text[: emoji_end - 1]
    pieces: list[str] = []
    assert runner.generate("x", cut, stream_callback=pieces.append) == text[: emoji_end - 1] == "".join(pieces)  # edgekif infer's path


def test_one_prompt_rule_for_the_api_and_infer(data_dir, reference, tmp_path, capsys):
    from edgekif.cli import _read_prompts
    from edgekif.errors import ValidationError
    from service.cli import main

    shapes = [
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "S"}], "messages[1].role", "a system message may only come first"),
        ([{"role": "assistant", "content": "A"}], "messages[0].role", "the message before the answer must be the user's"),
        ([{"role": "user", "content": "  "}], "messages[0].content", "is empty"),
    ]
    with running(create_app(data_dir)) as url:
        for messages, param, message in shapes:
            status, _, body = post_chat(url, {"messages": messages})
            assert status == 400 and body["error"]["param"] == param and message in body["error"]["message"], body
            f = tmp_path / "p.jsonl"
            f.write_text(json.dumps({"messages": messages}) + "\n")
            with pytest.raises(ValidationError) as e:
                _read_prompts(str(f))
            assert e.value.field == param and e.value.message == body["error"]["message"]
        # a final assistant message is a task file's answer: not part of the prompt, in both
        with_answer = CHATS[0] + [{"role": "assistant", "content": "an answer"}]
        status, _, body = post_chat(url, {"messages": with_answer, "max_tokens": MAX})
        assert status == 200 and body["choices"][0]["message"]["content"] == reference["v1"].generate(CHATS[0], MAX)
    # edgekif infer: a kept version by name; a missing data dir for the API is an error
    assert main(["infer", "--model", "v0001", "--max-new-tokens", str(MAX), "--data-dir", str(data_dir), "Hello there"]) == 0
    assert capsys.readouterr().out == reference["v1"].generate("Hello there", MAX) + "\n"
    assert main(["api", "--data-dir", str(tmp_path / "nonexistent")]) != 0
    assert "no such data directory" in capsys.readouterr().err


def test_warmup_opens_the_live_version_at_start(data_dir):
    app = create_app(data_dir, ApiSettings(warmup=True))
    with running(app):
        assert app.state.pool.open_versions() == ["v0001"]
