"""The bodies of the tool-call formats that are not one JSON object (`tools.ToolCallParser` finds the
sections; these read what is between their markers), as the families' chat templates write them:

- GLM-4.5 / 4.6 / 4.7: `<tool_call>NAME` then `<arg_key>K</arg_key><arg_value>V</arg_value>` per argument
  (newlines between them in 4.5/4.6, none in 4.7) and `</tool_call>`; a value is written raw when it is a
  string, else as JSON, so a value that reads as JSON is taken as JSON, any other as a string.
- DeepSeek-V3 / R1: `<｜tool▁calls▁begin｜>`, per call `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`
  then a ```json fenced object and `<｜tool▁call▁end｜>`, then `<｜tool▁calls▁end｜>`; DeepSeek-V3.1 writes
  `NAME<｜tool▁sep｜>{json}` in the call instead.
- Kimi-K2: `<|tool_calls_section_begin|>`, per call `<|tool_call_begin|>functions.NAME:IDX
  <|tool_call_argument_begin|>{json}<|tool_call_end|>`, then `<|tool_calls_section_end|>`.
- MiniMax-M2: `<minimax:tool_call>`, per call `<invoke name="NAME">` with `<parameter name="K">V</parameter>`
  per argument (values as GLM's: strings raw, others JSON) and `</invoke>`, then `</minimax:tool_call>`.

Each returns [(name, arguments)] or None where the body is not that format (then it is shown as text).
"""

from __future__ import annotations

import json
import re

Call = tuple[str, object]   # (function name, arguments: a dict, or the raw text where it is not JSON)

DEEPSEEK_CALL = ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>")
KIMI_CALL = ("<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>")
GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_glm(body: str) -> list[Call] | None:
    """One call: NAME, then its key/value pairs."""
    name, _, rest = body.partition("<arg_key>")
    name = name.strip()
    if not NAME.fullmatch(name):
        return None
    rest = "<arg_key>" + rest if rest else ""
    pairs = GLM_ARG.findall(rest)
    if GLM_ARG.sub("", rest).strip():   # anything beside the pairs: not this format
        return None
    return [(name, {k.strip(): _json_or_text(v) for k, v in pairs})]


def _calls(body: str, begin: str, end: str) -> list[str] | None:
    """The texts between each begin and end marker, or None if anything else is there."""
    parts = body.strip().split(begin)
    if parts[0].strip():
        return None
    calls = []
    for part in parts[1:]:
        inner, sep, after = part.partition(end)
        if after.strip():
            return None
        calls.append(inner)
    return calls or None


def parse_deepseek(body: str) -> list[Call] | None:
    """The calls of one `tool▁calls` section (its own markers already stripped)."""
    begin, end, sep = DEEPSEEK_CALL
    out = []
    for call in _calls(body, begin, end) or ():
        head, found, args = call.partition(sep)
        if not found:
            return None
        fenced = re.fullmatch(r"\s*(\S+)\s*```(?:json)?\s*(.*?)\s*```\s*", args, re.S)
        if head.strip() == "function" and fenced:           # V3 / R1: function<sep>NAME ```json {...} ```
            name, args = fenced.group(1), fenced.group(2)
        else:                                                 # V3.1: NAME<sep>{...}
            name = head.strip()
        if not NAME.fullmatch(name):
            return None
        out.append((name, _json_or_text(args.strip())))
    return out or None


def parse_kimi(body: str) -> list[Call] | None:
    """The calls of one Kimi-K2 section: `functions.NAME:IDX` ids, JSON arguments."""
    begin, end, sep = KIMI_CALL
    out = []
    for call in _calls(body, begin, end) or ():
        head, found, args = call.partition(sep)
        m = re.fullmatch(r"\s*(?:functions\.)?([A-Za-z0-9_.-]{1,64}?)(?::\d+)?\s*", head)
        if not found or m is None:
            return None
        out.append((m.group(1), _json_or_text(args.strip())))
    return out or None


MINIMAX_INVOKE = re.compile(r'<invoke name="([^"]*)">(.*?)</invoke>', re.S)
MINIMAX_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.S)


def parse_minimax(body: str) -> list[Call] | None:
    """The invokes of one MiniMax-M2 section."""
    out = []
    for name, params in MINIMAX_INVOKE.findall(body):
        if not NAME.fullmatch(name) or MINIMAX_PARAMETER.sub("", params).strip():
            return None
        out.append((name, {k: _json_or_text(v.strip()) for k, v in MINIMAX_PARAMETER.findall(params)}))
    if not out or MINIMAX_INVOKE.sub("", body).strip():
        return None
    return out
