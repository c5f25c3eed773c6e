"""OpenAI tool calling: the request's `tools` / `tool_choice` checked, and the model's tool-call text
parsed back into `tool_calls`, for the formats the families' chat templates define:

- Qwen3 / Qwen2 (Hermes style): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number;
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3) or `[TOOL_CALLS]name[ARGS]{...}` (v11);
- gpt-oss (harmony): messages `<|channel|>commentary to=functions.NAME ... <|message|>{json}`, the
  `final` channel being the answer and `analysis` the reasoning (not returned as content);
- GLM-4.5 (`<tool_call>NAME<arg_key>..</arg_key><arg_value>..</arg_value></tool_call>`), DeepSeek-V3
  (`<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>`), Kimi-K2 (`<|tool_calls_section_begin|>...`) and
  MiniMax-M2 (`<minimax:tool_call><invoke name=..>...`): sections found here, their bodies read by
  `tool_bodies`;
- Llama 4: a reply that is `{"name": ..., "parameters": {...}}` (one or more, as its template asks),
  optionally after `<|python_start|>...<|python_end|>` as the template writes an assistant's calls.

Which format applies is read from the chat template itself (the markers it writes), never from a
file name. A parser is fed the generated text piece by piece (special tokens kept) and returns what
can be shown already: content text, and complete tool calls; text that may still turn into a
tool-call marker is held back until it is clear.
"""

from __future__ import annotations

import json
import re
import uuid

from .responses import bad
from .tool_bodies import parse_deepseek, parse_glm, parse_kimi, parse_minimax

HERMES, MISTRAL, HARMONY, GLM, DEEPSEEK, KIMI, MINIMAX, LLAMA4 = ("hermes", "mistral", "harmony", "glm", "deepseek",
                                                                  "kimi", "minimax", "llama4")
# the formats whose calls sit between a begin and an end marker: (begin, end, body -> [(name, args)] or None)
SECTIONS = {HERMES: ("<tool_call>", "</tool_call>", lambda body: _parse_json_call(body)),
            GLM: ("<tool_call>", "</tool_call>", parse_glm),
            DEEPSEEK: ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", parse_deepseek),
            KIMI: ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", parse_kimi),
            MINIMAX: ("<minimax:tool_call>", "</minimax:tool_call>", parse_minimax)}
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"


def tool_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template writes, or None when it defines none."""
    t = chat_template or ""
    if "<|channel|>" in t and "to=functions." in t:
        return HARMONY
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if PYTHON_START in t and '"parameters": ' in t:
        return LLAMA4
    if "tool▁calls▁begin" in t:
        return DEEPSEEK
    if "<|tool_calls_section_begin|>" in t:
        return KIMI
    if "<minimax:tool_call>" in t:
        return MINIMAX
    if "<tool_call>" in t and "<arg_key>" in t:
        return GLM
    if "<tool_call>" in t:
        return HERMES
    return None


def check_tools(name, value) -> list[dict]:
    if not isinstance(value, list):
        raise bad(f"{name}: expected a list of tools", name, "invalid_type")
    for i, tool in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad(f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", where)
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fn["name"]):
            raise bad(f"{where}.function.name: expected a name of 1-64 letters, digits, _ . -", f"{where}.function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise bad(f"{where}.function.parameters: expected a JSON Schema object", f"{where}.function.parameters")
    return value


def check_tool_choice(name, value):
    """"none", "auto", "required" or {"type": "function", "function": {"name": ...}} (the last two are
    forced through constrained decoding: `structured.forced_call`)."""
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str) and set(value) == {"type", "function"}:
        return value
    raise bad(f"{name} = {json.dumps(value)[:80]}: expected \"none\", \"auto\", \"required\" or "
              "{\"type\": \"function\", \"function\": {\"name\": ...}}", name)


def new_call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def _held(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    """Feed generated text; get back (content, [tool calls]) as they become certain."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.text = ""          # all generated text so far
        self.shown = 0          # for hermes / mistral: characters of text already returned as content
        self.calls: list[dict] = []
        self.final_shown = 0    # for harmony: characters of the final channel already returned
        self.messages_done = 0  # for harmony: complete messages already looked at

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        self.text += piece
        return self._parse(done=False)

    def finish(self) -> tuple[str, list[dict]]:
        return self._parse(done=True)

    def _parse(self, done: bool) -> tuple[str, list[dict]]:
        if self.fmt in SECTIONS:
            return self._sections(done, *SECTIONS[self.fmt])
        return getattr(self, f"_{self.fmt}")(done=done)

    # -- calls between a begin and an end marker (Hermes/Qwen: <tool_call> JSON </tool_call>; GLM; DeepSeek; Kimi)
    def _sections(self, done: bool, begin: str, end: str, parse) -> tuple[str, list[dict]]:
        content, calls = "", []
        while True:
            rest = self.text[self.shown:]
            start = rest.find(begin)
            if start < 0:
                keep = 0 if done else _held(rest, begin)
                content += rest[:len(rest) - keep]
                self.shown += len(rest) - keep
                break
            content += rest[:start]
            stop = rest.find(end, start)
            if stop < 0:
                if done:  # an unterminated section: parse what is there, else show it as text
                    found = _as_calls(parse(rest[start + len(begin):]))
                    if found is not None:
                        calls += found
                    else:
                        content += rest[start:]
                    self.shown = len(self.text)
                else:
                    self.shown += start
                break
            found = _as_calls(parse(rest[start + len(begin):stop]))
            if found is not None:
                calls += found
            else:
                content += rest[start:stop + len(end)]
            self.shown += stop + len(end)
        self.calls += calls
        # Qwen and GLM write a newline between content and each call: whitespace-only text around calls goes
        return ("" if self.calls and not content.strip() else content), calls

    # -- Mistral: [TOOL_CALLS] then a JSON list, or name[ARGS]{json} repeated
    def _mistral(self, done: bool) -> tuple[str, list[dict]]:
        rest = self.text[self.shown:]
        start = rest.find("[TOOL_CALLS]")
        if start < 0:
            keep = 0 if done else _held(rest, "[TOOL_CALLS]")
            self.shown += len(rest) - keep
            return rest[:len(rest) - keep], []
        content = rest[:start]
        self.shown += start
        if not done:
            return content, []
        body = self.text[self.shown:]
        calls = _parse_mistral(body[len("[TOOL_CALLS]"):])
        if calls is None:
            content += body
            calls = []
        self.shown = len(self.text)
        self.calls += calls
        return content, calls

    # -- Llama 4: the whole reply is the calls when it opens with `{` or <|python_start|>
    def _llama4(self, done: bool) -> tuple[str, list[dict]]:
        head = self.text.lstrip()
        opens_call = head.startswith(("{", PYTHON_START)) or (head and PYTHON_START.startswith(head))
        if self.shown == 0 and (not head or opens_call) and not done:
            return "", []                  # undecided, or a call still being written: hold it
        if self.shown == 0 and opens_call:
            content, calls = _parse_llama4(head)
            if calls:
                self.shown = len(self.text)
                self.calls += calls
                return content, calls
        content = self.text[self.shown:]   # plain text (or calls that do not parse): content as it comes
        self.shown = len(self.text)
        return content, []

    # -- gpt-oss harmony
    def _harmony(self, done: bool) -> tuple[str, list[dict]]:
        messages = _harmony_messages(self.text)
        final = "".join(body for header, body, _ in messages if "<|channel|>final" in header or not header)
        keep = 0 if done else _held(final, "<|")
        content = final[self.final_shown:len(final) - keep]
        self.final_shown = max(self.final_shown, len(final) - keep)
        calls = []
        for header, body, complete in messages[self.messages_done:]:
            if not (complete or done):
                break                      # only the last message can still be growing
            self.messages_done += 1
            m = re.search(r"to=functions\.([A-Za-z0-9_.-]+)", header)
            if m is None:
                continue
            try:
                arguments = json.loads(body) if body.strip() else {}
            except ValueError:
                arguments = body.strip()
            calls.append(new_call(m.group(1), arguments))
        self.calls += calls
        return content, calls


def _as_calls(found) -> list[dict] | None:
    """A body parser's answer, [(name, arguments)] or None, as `tool_calls` entries."""
    return None if found is None else [new_call(name, arguments) for name, arguments in found]


def _parse_json_call(body: str) -> list[tuple[str, object]] | None:
    """Hermes: one JSON object {"name": ..., "arguments": {...}}."""
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return [(obj["name"], obj.get("arguments", obj.get("parameters", {})))]


def _parse_llama4(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a Llama 4 reply `[<|python_start|>content<|python_end|>]{call}[; {call}...]`,
    each call `{"name": str, "parameters": {...}}` (or a JSON list of them); no calls when any part
    does not parse."""
    content = ""
    if text.startswith(PYTHON_START):
        inner, _, text = text[len(PYTHON_START):].partition(PYTHON_END)
        if not text.strip():           # the calls themselves inside the python block
            inner, text = "", inner
        content = inner
    decoder, calls, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
        if at == len(text):
            break
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return "", []
        for item in obj if isinstance(obj, list) else [obj]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return "", []
            calls.append(new_call(item["name"], item.get("parameters", item.get("arguments", {}))))
    return content, calls


def _parse_mistral(body: str) -> list[dict] | None:
    body = body.strip()
    if body.startswith("["):
        try:
            items = json.loads(body)
        except ValueError:
            return None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or \
                not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
            return None
        return [new_call(i["name"], i.get("arguments", {})) for i in items]
    calls = []  # v11: name[ARGS]{json}[TOOL_CALLS]name[ARGS]{json}...
    for part in body.split("[TOOL_CALLS]"):
        name, sep, args = part.partition("[ARGS]")
        if not sep or not name.strip():
            return None
        try:
            arguments = json.loads(args)
        except ValueError:
            return None
        calls.append(new_call(name.strip(), arguments))
    return calls


def _harmony_messages(text: str) -> list[tuple[str, str, bool]]:
    """Split harmony output into (header, body, complete) messages; the `<|start|>assistant` between
    messages is dropped; a message is complete when its `<|end|>` (or `<|call|>`) came."""
    if "<|" not in text:    # plain text with no harmony markup (yet)
        return [("", text, False)] if text else []
    out = []
    for chunk in re.split(r"<\|start\|>", text):
        header, sep, body = chunk.partition("<|message|>")
        if not sep:         # a header still arriving
            continue
        complete = False
        for end in ("<|end|>", "<|call|>", "<|return|>"):
            if end in body:
                body, complete = body.split(end, 1)[0], True
                break
        out.append((header, body, complete))
    return out
