"""Request validation, up front: wrong types, unknown or missing fields, values this server does not
support, each a 400 naming the parameter as OpenAI does; then the chat messages and the completion
prompt in the form the model takes."""

from __future__ import annotations

import json

from .responses import ApiError, bad
from .structured import check_response_format
from .tools import check_tool_choice, check_tools


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_error(name: str, expected: str, value) -> ApiError:
    return bad(f"{name}: expected {expected}, got {json.dumps(value)[:80]}", name, "invalid_type")


def _int(name, value, lo=None, hi=None):
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"{name} = {value}: expected an integer {bounds}", name)
    return value


def _number(name, value, lo, hi, lo_open=False):
    if not _is_number(value):
        raise _type_error(name, "a number", value)
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        raise bad(f"{name} = {value}: expected a number {'>' if lo_open else '>='} {lo} and <= {hi}", name)
    return float(value)


def _bool(name, value):
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


def _string(name, value):
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _stop(name, value):
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error(name, "a string or a list of strings", value)
    if len(value) > 16:
        raise bad(f"{name}: {len(value)} stop sequences, at most 16 are supported", name)
    return value


def _only(allowed, what):
    """A field this server accepts only at its default value."""
    def check(name, value):
        if value not in allowed:
            raise bad(f"{name} = {json.dumps(value)[:80]} is not supported by this server ({what})",
                       name, "unsupported_value")
        return value
    return check


def _stream_options(name, value):
    if not isinstance(value, dict):
        raise _type_error(name, "an object", value)
    for key, v in value.items():
        if key not in ("include_usage", "include_obfuscation"):  # obfuscation padding: accepted, not sent
            raise bad(f"{name}.{key}: unrecognized option", f"{name}.{key}", "unknown_parameter")
        _bool(f"{name}.{key}", v)
    return value


def _logit_bias(name, value):
    """{"token id": bias}, bias from -100 to 100 as OpenAI; ids are checked against the vocabulary later."""
    if not isinstance(value, dict):
        raise _type_error(name, "an object mapping token ids to numbers", value)
    if len(value) > 1024:
        raise bad(f"{name}: {len(value)} entries, at most 1024 are supported", name)
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 12):
            raise bad(f"{name}: key {json.dumps(key)[:40]} is not a token id", name)
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise bad(f"{name}[{key}] = {json.dumps(bias)[:40]}: expected a number from -100 to 100", name)
        out[int(key)] = float(bias)
    return out


def _metadata(name, value):
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _type_error(name, "an object of string values", value)
    return value


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")

_COMMON_FIELDS = {
    "model": _string,
    "max_tokens": lambda n, v: _int(n, v, 1),
    "temperature": lambda n, v: _number(n, v, 0, 2),
    "top_p": lambda n, v: _number(n, v, 0, 1),
    "top_k": lambda n, v: _int(n, v, -1),                   # extension (as vLLM): 0 or -1 is no cut
    "seed": lambda n, v: _int(n, v, -2**63, 2**64 - 1),
    "stop": _stop,
    "stream": _bool,
    "stream_options": _stream_options,
    "n": lambda n, v: _only({1}, "one choice per request; send the request again")(n, _int(n, v, 1)),
    "logit_bias": _logit_bias,
    "ignore_eos": _bool,                                    # extension (as vLLM): generate max_tokens tokens
    "presence_penalty": lambda n, v: _number(n, v, -2, 2),      # OpenAI's definition
    "frequency_penalty": lambda n, v: _number(n, v, -2, 2),
    "repetition_penalty": lambda n, v: _number(n, v, 0, 10, lo_open=True),  # extension (as vLLM): transformers'
    "min_p": lambda n, v: _number(n, v, 0, 1),                  # extension (as vLLM)
}
CHAT_FIELDS = {**_COMMON_FIELDS, "messages": None, "max_completion_tokens": lambda n, v: _int(n, v, 1),
                "logprobs": _bool, "top_logprobs": lambda n, v: _int(n, v, 0, 20),
                "response_format": check_response_format, "tools": check_tools, "tool_choice": check_tool_choice,
                "parallel_tool_calls": _bool,
                "reasoning_effort": lambda n, v: _only(REASONING_EFFORTS, "one of " + ", ".join(REASONING_EFFORTS))(
                    n, _string(n, v))}
# Accepted and ignored (logged once each): they do not change what is generated here.
IGNORED_FIELDS = {"store": _bool, "metadata": _metadata, "service_tier": _string, "user": _string,
                  "prompt_cache_key": _string, "safety_identifier": _string}
COMPLETION_FIELDS = {**_COMMON_FIELDS, "prompt": None, "echo": _only({False}, "no echo"),
                      "logprobs": lambda n, v: _int(n, v, 0, 5), "best_of": _only({1}, "one choice"),
                      "suffix": _only({""}, "no suffix")}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_MESSAGE_KEYS = {"system": {"name"}, "user": {"name"}, "assistant": {"name", "tool_calls", "refusal"},
                 "tool": {"tool_call_id", "name"}}


def check_fields(body, allowed: dict, required: list[str]) -> dict:
    """The body's fields checked (`allowed`: name -> check); the ignored ones (IGNORED_FIELDS) are
    checked and returned under their names too, for the caller to log."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    allowed = {**IGNORED_FIELDS, **allowed}
    for name in body:
        if name not in allowed:
            raise bad(f"unrecognized request argument supplied: {name!r}", name, "unknown_parameter")
    for name in required:
        if body.get(name) is None:
            raise bad(f"missing required parameter: {name!r}", name, "missing_required_parameter")
    out = {}
    for name, value in body.items():
        if value is None:
            continue  # null means the default, as in OpenAI's API
        check = allowed[name]
        out[name] = check(name, value) if check else value
    return out


def chat_messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _type_error("messages", "a non-empty list of messages", value)
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, "an object with 'role' and 'content'", m)
        role, content = m.get("role"), m.get("content")
        for key in m:
            if key not in ("role", "content") and key not in _MESSAGE_KEYS.get(_ROLES.get(role), {"name"}):
                raise bad(f"{where}.{key}: unrecognized or unsupported message field", f"{where}.{key}",
                           "unknown_parameter")
        if role == "assistant" and content is None and m.get("tool_calls"):
            content = ""
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise bad(f"missing required parameter: '{where}.{missing}'", f"{where}.{missing}",
                       "missing_required_parameter")
        if role not in _ROLES:
            raise bad(f"{where}.role = {json.dumps(role)[:40]}: expected one of {', '.join(_ROLES)}",
                       f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                        and set(part) <= {"type", "text"}):
                    raise bad(f"{where}.content[{j}]: only text parts {{\"type\": \"text\", \"text\": ...}} "
                               "are supported", f"{where}.content", "unsupported_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string or a list of text parts", content)
        message = {"role": _ROLES[role], "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(f"{where}.tool_calls", m["tool_calls"])
        if role == "tool":
            message["tool_call_id"] = _string(f"{where}.tool_call_id", m.get("tool_call_id", ""))
        if m.get("name") is not None:
            message["name"] = _string(f"{where}.name", m["name"])
        out.append(message)
    return out


def _tool_calls(name, value) -> list[dict]:
    """An assistant message's tool_calls, as the client sent them back (arguments a JSON string)."""
    if not isinstance(value, list):
        raise _type_error(name, "a list of tool calls", value)
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", ""), (str, dict)):
            raise bad(f"{name}[{i}]: expected {{\"id\", \"type\": \"function\", \"function\": "
                      "{\"name\", \"arguments\"}}", f"{name}[{i}]")
    return value


def completion_prompt(model, value) -> str | list[int]:
    """A completion prompt: a string, a list of token ids, or a one-element list of either. A string
    is returned as it is (the caller tokenizes it off the event loop), ids checked against the vocabulary."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    elif isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        raise bad(f"prompt: {len(value)} prompts in one request; this server takes one per request",
                   "prompt", "unsupported_value")
    if isinstance(value, str):
        if not value:
            raise bad("prompt is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(_is_int(v) for v in value):
        if not all(0 <= v < model.config.vocab_size for v in value):
            raise bad(f"prompt: token ids must be in 0..{model.config.vocab_size - 1}", "prompt")
        return list(value)
    raise _type_error("prompt", "a string or a non-empty list of token ids", value)
