"""`edgekif api` requests: parsing, and the parameter table (honoured, accepted at their no-op
value, or refused with a 400 naming the parameter: never silently dropped).

Messages become the model's input by edgekif.taskfile.prompt_messages, the rule training,
evaluation and `edgekif infer` use, so the same shapes fail with the same messages everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from edgekif.decoding import Sampling
from edgekif.errors import ValidationError

MODEL_NAME = "edgekif"
MAX_STOPS = 4  # OpenAI's bound on `stop`
SEED_MAX = 2**31 - 1  # onnxruntime-genai's random_seed is a C int


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


@dataclass
class ApiLimits:
    max_tokens: int = 1024  # upper bound for max_tokens, and its value when a request gives none


@dataclass
class GenRequest:
    """A chat or text completion request, parsed: what the generation needs."""

    kind: str  # "chat" | "text"
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


# Parameters that have no effect at one value (clients send their defaults): accepted at that
# value, refused at any other. The value is a predicate on what the client sent.
def _neutral(ok, why: str):
    return ok, why


_NEUTRAL_BOTH: dict[str, tuple[Any, str]] = {
    "n": _neutral(lambda v: v == 1, "only one choice per request (n=1)"),
    "presence_penalty": _neutral(lambda v: v == 0, "onnxruntime-genai has no presence penalty (repetition_penalty is a different, multiplicative one)"),
    "frequency_penalty": _neutral(lambda v: v == 0, "onnxruntime-genai has no frequency penalty (repetition_penalty is a different, multiplicative one)"),
    "logit_bias": _neutral(lambda v: v == {}, "logit biases are not supported"),
    "user": _neutral(lambda v: isinstance(v, str), "user must be a string"),  # an end-user id for the caller's own logs
}
_NEUTRAL_CHAT: dict[str, tuple[Any, str]] = {
    "logprobs": _neutral(lambda v: v is False, "log probabilities are not returned"),
    "top_logprobs": _neutral(lambda v: v == 0, "log probabilities are not returned"),
    "tools": _neutral(lambda v: v == [], "tool calls are not supported (the model was not trained for them)"),
    "tool_choice": _neutral(lambda v: v == "none", "tool calls are not supported"),
    "parallel_tool_calls": _neutral(lambda v: isinstance(v, bool), "tool calls are not supported"),
    "functions": _neutral(lambda v: v == [], "function calls are not supported"),
    "function_call": _neutral(lambda v: v == "none", "function calls are not supported"),
    "response_format": _neutral(lambda v: isinstance(v, dict) and v.get("type") == "text" and set(v) == {"type"},
                                "only {\"type\": \"text\"}: structured (JSON) output is not supported"),
}
_NEUTRAL_TEXT: dict[str, tuple[Any, str]] = {
    "logprobs": _neutral(lambda v: v == 0, "log probabilities are not returned"),
    "echo": _neutral(lambda v: v is False, "the prompt is not echoed"),
    "best_of": _neutral(lambda v: v == 1, "only one candidate per request (best_of=1)"),
    "suffix": _neutral(lambda v: v == "", "insertion (a suffix) is not supported"),
}
_HONOURED_BOTH = {"model", "max_tokens", "stream", "stream_options", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty"}
_HONOURED = {"chat": _HONOURED_BOTH | {"messages", "max_completion_tokens"}, "text": _HONOURED_BOTH | {"prompt"}}


def _number(obj: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    # json.loads reads NaN, which every comparison lets through
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"{key} must be a number {'>' if lo_open else '>='} {lo} and <= {hi} (got {v!r})", param=key)
    return float(v)


def _int(obj: dict, key: str, lo: int, hi: int) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{key} must be an integer from {lo} to {hi} (got {v!r})", param=key)
    return v


def parse_sampling(obj: dict) -> Sampling:
    """temperature 0 or absent: greedy (the model was trained and evaluated greedily)."""
    temperature = _number(obj, "temperature", 0.0, 2.0)
    top_p = _number(obj, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(obj, "top_k", 0, 1 << 20)
    seed = _int(obj, "seed", 0, SEED_MAX)
    penalty = _number(obj, "repetition_penalty", 0.0, 10.0, lo_open=True)
    return Sampling(temperature=temperature or 0.0, top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, seed=seed,
                    repetition_penalty=1.0 if penalty is None else penalty)


def parse_stops(obj: dict) -> list[str]:
    v = obj.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings", param="stop")
    return list(stops)


def _check_params(obj: dict, kind: str) -> None:
    neutral = {**_NEUTRAL_BOTH, **(_NEUTRAL_CHAT if kind == "chat" else _NEUTRAL_TEXT)}
    for key in obj:  # in the client's order: the first offending one is named
        if key in _HONOURED[kind]:
            continue
        if key in neutral:
            ok, why = neutral[key]
            if obj[key] is not None and not ok(obj[key]):
                raise unsupported(key, why)
            continue
        raise ApiError(400, f"unrecognized request argument supplied: {key}", param=key, code="unsupported_parameter")


def _load(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # valid JSON nested deeper than the parser's recursion limit
        raise ApiError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return obj


def _max_tokens(obj: dict, limits: ApiLimits, kind: str) -> int:
    # max_completion_tokens is the newer name of max_tokens; either bounds the answer
    param = "max_completion_tokens" if kind == "chat" and obj.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = obj.get(param)
    if max_tokens is None:
        return limits.max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"{param} must be a positive integer", param=param)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"{param} is {max_tokens}; this server allows at most {limits.max_tokens}", param=param, code="max_tokens_exceeded")
    return max_tokens


def _content(value: Any, i: int) -> Any:
    """A message's content as text: a string, or OpenAI's list of text parts joined."""
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]: text parts only
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, "only text content parts are supported", param=f"messages[{i}].content[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    return value  # anything else: prompt_messages names what is wrong with it


def _check_unicode(texts: list[tuple[str, Any]]) -> None:
    """Each (param, text) is valid Unicode: JSON's "\\ud800" escape gives a lone surrogate, which
    no UTF-8 tokenizer accepts (a 500 from deep inside the runtime otherwise). Checked after the
    one rule, so that where the rule refuses it too, its message is the one clients see."""
    for param, value in texts:
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{param} is not valid Unicode: it holds a lone surrogate U+{ord(value[e.start]):04X} at character {e.start}",
                           param=param) from None


def _prompt_rule(obj: Any) -> list[dict[str, str]]:
    """edgekif.taskfile.prompt_messages (the one rule), its ValidationError as a 400 naming the field."""
    from edgekif.taskfile import prompt_messages

    try:
        return prompt_messages(obj)
    except ValidationError as e:
        raise ApiError(400, e.message, param=e.field) from None


def chat_messages(raw: Any) -> list[dict[str, str]]:
    if raw is None:
        raise ApiError(400, "missing required parameter: messages", param="messages", code="missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    messages, texts = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, "each message must be an object with role and content", param=f"messages[{i}]")
        for key in m:
            if key not in ("role", "content"):  # name, tool_calls, ...: the chat template has no place for them
                raise unsupported(f"messages[{i}].{key}", "a message has a role and a text content only")
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name for the system role
        if "content" in m and m["content"] is not None:
            messages.append({"role": role, "content": _content(m["content"], i)})
            texts.append((f"messages[{i}].content", messages[-1]["content"]))
        else:
            messages.append({"role": role})
    prompt = _prompt_rule({"messages": messages})
    _check_unicode(texts)
    return prompt


def text_prompt(raw: Any) -> list[dict[str, str]]:
    """/v1/completions: the prompt (a string, or a list of one string) as one user message."""
    if raw is None:
        raise ApiError(400, "missing required parameter: prompt", param="prompt", code="missing_required_parameter")
    if isinstance(raw, list):
        if len(raw) != 1 or not isinstance(raw[0], str):
            raise ApiError(400, "prompt must be a string or a list of one string (one prompt per request; token arrays are not supported)",
                           param="prompt")
        raw = raw[0]
    if not isinstance(raw, str):
        raise ApiError(400, "prompt must be a string", param="prompt")
    prompt = _prompt_rule({"prompt": raw})
    _check_unicode([("prompt", raw)])
    return prompt


def parse_request(body: bytes, limits: ApiLimits, kind: str) -> GenRequest:
    obj = _load(body)
    model = obj.get("model", MODEL_NAME)
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    _check_params(obj, kind)
    messages = chat_messages(obj.get("messages")) if kind == "chat" else text_prompt(obj.get("prompt"))
    stream = obj.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    opts = obj.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise ApiError(400, "stream_options may only hold include_usage", param="stream_options")
    return GenRequest(kind=kind, model=model, messages=messages, max_tokens=_max_tokens(obj, limits, kind), sampling=parse_sampling(obj),
                      stops=parse_stops(obj), stream=stream, include_usage=bool(opts.get("include_usage")))
