"""Structured output requests: `response_format` (json_object, json_schema) and a forced `tool_choice`
(a named function, or "required"), each turned into a JSON schema the generation is constrained to
(`constrain.py`, through llguidance).

A forced tool call is generated as bare JSON, whatever the chat template's own call format (as vLLM
does): for a named function the output is its arguments, matching its `parameters` schema; for
"required" it is `{"name": ..., "arguments": {...}}` for one of the tools. `ForcedCall.call(text)`
turns that text into the OpenAI `tool_calls` entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .responses import bad
from .tools import new_call

ANY_OBJECT = {"type": "object"}


def response_format_schema(value: dict | None):
    """The schema a request's response_format asks for (None: free text)."""
    if value is None or value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return ANY_OBJECT
    return value["json_schema"].get("schema", ANY_OBJECT)


def check_response_format(name, value):
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad(f"{name}: expected an object with a 'type'", name, "invalid_type")
    kind = value["type"]
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise bad(f"{name}.type = {kind!r}: expected one of text, json_object, json_schema", f"{name}.type")
    for key in value:
        if key not in allowed[kind]:
            raise bad(f"{name}.{key}: unrecognized for type {kind!r}", f"{name}.{key}", "unknown_parameter")
    if kind == "json_schema":
        spec = value.get("json_schema")
        where = f"{name}.json_schema"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad(f"{where}: expected {{\"name\": ..., \"schema\": {{...}}, \"strict\": true}}", where)
        for key in spec:
            if key not in ("name", "schema", "strict", "description"):
                raise bad(f"{where}.{key}: unrecognized", f"{where}.{key}", "unknown_parameter")
        if "schema" in spec and not isinstance(spec["schema"], dict):
            raise bad(f"{where}.schema: expected a JSON Schema object", f"{where}.schema", "invalid_type")
        if "strict" in spec and not isinstance(spec["strict"], bool) and spec["strict"] is not None:
            raise bad(f"{where}.strict: expected true or false", f"{where}.strict", "invalid_type")
    return value


@dataclass(frozen=True)
class ForcedCall:
    """A tool call the request forces: `schema` constrains the output, `call(text)` reads it back."""
    schema: dict
    name: str | None      # the named function; None for "required" (the output names it)

    def call(self, text: str) -> dict | None:
        """The tool_calls entry for the generated text (None when it is not complete JSON, e.g. cut by
        max_tokens or a stop string)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.name is not None:
            return new_call(self.name, text)
        if not isinstance(value, dict) or "name" not in value:
            return None
        return new_call(value["name"], value.get("arguments", {}))


def forced_call(tool_choice, tools: list[dict] | None) -> ForcedCall | None:
    """The call a tool_choice forces, or None ("auto", "none", absent)."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if not tools:
        raise bad("tool_choice: forcing a tool call needs `tools`", "tool_choice")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if tool_choice == "required":
        options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": n}, "arguments": f.get("parameters", ANY_OBJECT)}}
                   for n, f in functions.items()]
        return ForcedCall(options[0] if len(options) == 1 else {"anyOf": options}, None)
    name = tool_choice["function"]["name"]
    if name not in functions:
        raise bad(f"tool_choice: function {name!r} is not among the request's tools "
                  f"({', '.join(functions)})", "tool_choice")
    return ForcedCall(functions[name].get("parameters", ANY_OBJECT), name)
