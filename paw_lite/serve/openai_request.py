"""What an OpenAI-style request asks for, read and checked: the program, its inputs, max_tokens,
streaming, and a constraint. Every refusal is an ApiError naming the field (400 unless said).

Outputs are greedy (a program is a function: one output per input). Sampling fields
(temperature, top_p, seed, presence/frequency penalties, user, ...) are accepted and ignored;
fields that would change what is returned and are not supported (n > 1, best_of > 1, logprobs,
echo, stop, suffix, logit_bias, tools) are refused rather than silently dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError
from .settings import ServeSettings

# Extra body fields for constraints (the openai client sends them with extra_body={...}): our
# names, and vLLM's guided decoding names, which clients written for vLLM already send.
CONSTRAINT_FIELDS = {"choices": "choices", "guided_choice": "choices", "regex": "regex", "guided_regex": "regex",
                     "json_schema": "json_schema", "guided_json": "json_schema"}


@dataclass(frozen=True)
class Inference:
    """A completions or chat request, checked."""

    model: str
    inputs: list[str]
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    constraint: dict[str, Any] = field(default_factory=dict)  # the keywords of fn(...): choices=, regex=, json_schema=


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def completion_request(data: dict[str, Any], settings: ServeSettings) -> Inference:
    """POST /v1/completions: `prompt` is the program's input; a list of them is a batch."""
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        inputs = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        inputs = list(prompt)
    else:
        raise ApiError(400, "prompt must be a string (the program's input) or a non-empty list of strings "
                            "(a batch); token-id prompts are not supported", param="prompt")
    if len(inputs) > settings.max_batch:
        raise ApiError(400, f"prompt holds {len(inputs)} inputs; the server takes at most {settings.max_batch} "
                            f"in one request (--max-batch)", param="prompt", code="too_many_inputs")
    for name in ("echo", "suffix", "best_of"):
        _refuse(data, name)
    return _common(data, settings, inputs, "prompt")


def chat_request(data: dict[str, Any], settings: ServeSettings) -> Inference:
    """POST /v1/chat/completions: the last user message is the program's input (the program is
    the instruction: system and earlier messages are not part of it)."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of message objects", param="messages")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ApiError(400, "messages holds no user message: the last user message is the program's input",
                       param="messages")
    text = _content(users[-1].get("content"))
    for name in ("tools", "functions", "tool_choice", "function_call"):
        _refuse(data, name)
    return _common(data, settings, [text], "messages")


def _content(content: object) -> str:
    """A message's text: a string, or the text parts of a list of content parts, joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"content part of type {str(p.get('type'))[:40]!r} is not supported: programs take "
                                    f"text only", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, "the last user message's content must be a string or a list of text parts", param="messages")


def _common(data: dict[str, Any], settings: ServeSettings, inputs: list[str], input_field: str) -> Inference:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: the name of a served program (GET /v1/models lists them)",
                       param="model")
    for text in inputs:
        if len(text) > settings.max_input_chars:
            raise ApiError(400, f"an input is {len(text)} characters long; the server takes at most "
                                f"{settings.max_input_chars} (--max-input-chars)", param=input_field,
                           code="input_too_long")
    n = data.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"n is {n!r}: outputs are greedy, so there is one per input (n=1)", param="n")
    for name in ("logprobs", "top_logprobs", "stop", "logit_bias"):
        _refuse(data, name)
    stream = data.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream must be true or false", param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return Inference(model=model, inputs=inputs, max_tokens=_max_tokens(data, settings), stream=bool(stream),
                     include_usage=bool(options.get("include_usage")), constraint=_constraint(data))


def _max_tokens(data: dict[str, Any], settings: ServeSettings) -> int:
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    value = data.get(name)
    if value is None:
        return settings.max_tokens_cap
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, f"{name} must be an integer >= 0, not {value!r}", param=name)
    if value > settings.max_tokens_cap:
        raise ApiError(400, f"{name} is {value}; the server allows at most {settings.max_tokens_cap} "
                            f"(--max-tokens-cap)", param=name, code="max_tokens_too_large")
    return value


def _constraint(data: dict[str, Any]) -> dict[str, Any]:
    """The constraint keywords of fn(...) the request asks for: response_format (json_schema,
    json_object) or an extra field (choices/guided_choice, regex/guided_regex, json_schema/guided_json)."""
    found: dict[str, tuple[str, Any]] = {}  # keyword -> (field it came from, value)

    def take(keyword: str, source: str, value: Any) -> None:
        if found:
            other = next(iter(found.values()))[0]
            raise ApiError(400, f"at most one constraint per request; got {other} and {source}", param=source)
        found[keyword] = (source, value)

    fmt = data.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}", param="response_format")
        if fmt["type"] == "json_object":
            take("json_schema", "response_format", {"type": "object"})
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                               param="response_format")
            take("json_schema", "response_format", schema)
    for name, keyword in CONSTRAINT_FIELDS.items():
        if data.get(name) is not None:
            take(keyword, name, data[name])
    return {keyword: value for keyword, (_, value) in found.items()}


def constraint_field(data: dict[str, Any]) -> str | None:
    """The request field a constraint came from (to name it in an error)."""
    if data.get("response_format") is not None:
        return "response_format"
    return next((name for name in CONSTRAINT_FIELDS if data.get(name) is not None), None)


def _refuse(data: dict[str, Any], name: str) -> None:
    value = data.get(name)
    if value in (None, False, [], {}, 1 if name == "best_of" else None, 0 if name == "logprobs" else None):
        return
    raise ApiError(400, f"{name} is not supported by paw-lite serve (outputs are greedy, one per input, "
                        f"without logprobs); leave it out", param=name, code="unsupported_parameter")
