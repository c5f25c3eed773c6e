"""Mistral-family chat templates as published (Mistral-Small-3.2, Ministral-3 Reasoning, Devstral) render
here as transformers' `apply_chat_template` renders them, tools, calls and results included, and the
calls they write (`[TOOL_CALLS]name[ARGS]{json}`) parse into `tool_calls`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_fixtures import small_bpe
from offload_moe.server.tools import MISTRAL, ToolCallParser, tool_format
from offload_moe.generation.text import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"
NAMES = ["mistral-small-3.2", "ministral-3-reasoning", "devstral-small-2507"]
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]",
            "[ARGS]", "[CALL_ID]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
            "[THINK]", "[/THINK]"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
CONVERSATIONS = {
    "plain": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
               {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is 2 + 2?"}], None),
    "tools": ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [CALL]},
               {"role": "tool", "content": "21 degrees", "tool_call_id": "abcDEF123", "name": "get_weather"},
               {"role": "assistant", "content": "It is 21 degrees."}, {"role": "user", "content": "And Rome?"}],
              TOOLS),
}


@pytest.fixture(scope="module", params=NAMES)
def saved(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    raw = small_bpe(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = (TEMPLATES / f"{request.param}.jinja").read_text()
    directory = tmp_path_factory.mktemp(request.param)
    tok.save_pretrained(directory)
    return tok, directory


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_template_renders_as_transformers(saved, name):
    tok, directory = saved
    messages, tools = CONVERSATIONS[name]
    expected = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ours = Tokenizer(directory)
    assert ours.render_chat(messages, tools=tools) == expected
    assert tool_format(ours.chat_template) == MISTRAL


@pytest.mark.parametrize("reply,content,expected", [
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    ('Let me look. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
     "Let me look. ", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
])
def test_calls_parse_into_tool_calls(reply, content, expected):
    parser, got, calls = ToolCallParser(MISTRAL), "", []
    for i in range(0, len(reply), 3):
        text, new = parser.feed(reply[i:i + 3])
        got, calls = got + text, calls + new
    text, new = parser.finish()
    assert got + text == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls + new] == expected
