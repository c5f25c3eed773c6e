"""Llama 4's chat template (as transformers ships it with `Llama4Processor`) renders here as
transformers' `apply_chat_template` renders it, tools and tool turns included, and its JSON tool
calls come back as `tool_calls`."""

from __future__ import annotations

import json

import pytest

from chat_fixtures import small_bpe
from offload_moe.server.tools import LLAMA4, ToolCallParser, tool_format
from offload_moe.generation.text import Tokenizer

SPECIALS = ["<|begin_of_text|>", "<|eot|>", "<|header_start|>", "<|header_end|>", "<|python_start|>",
            "<|python_end|>", "<|finetune_right_pad|>"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = {
    "plain": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
              {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is 2 + 2?"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": "{\"temperature\": 21}", "tool_call_id": "call_1"}],
    "tools_and_system": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Paris?"}],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small BPE with Llama 4's special tokens and its template, written by save_pretrained."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.llama4.processing_llama4 import chat_template

    raw = small_bpe(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot|>")
    tok.chat_template = chat_template
    directory = tmp_path_factory.mktemp("llama4-chat")
    tok.save_pretrained(directory)
    return tok, directory


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_template_renders_as_transformers(saved, name):
    tok, directory = saved
    messages, tools = CONVERSATIONS[name], TOOLS if name.startswith("tools") else None
    expected = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert Tokenizer(directory).render_chat(messages, tools=tools) == expected
    assert tool_format(Tokenizer(directory).chat_template) == LLAMA4


def parse(pieces: list[str]) -> tuple[str, list[dict]]:
    parser, content, calls = ToolCallParser(LLAMA4), "", []
    for piece in pieces:
        text, new = parser.feed(piece)
        content, calls = content + text, calls + new
    text, new = parser.finish()
    return content + text, calls + new


def pieces(text: str) -> list[str]:
    return [text[i:i + 3] for i in range(0, len(text), 3)]


@pytest.mark.parametrize("reply,expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ('<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
     '{"name": "get_weather", "parameters": {"city": "Rome"}}',
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ('  {"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', [("a", {}), ("b", {"x": 1})]),
])
def test_json_calls_parse_into_tool_calls(reply, expected):
    content, calls = parse(pieces(reply))
    assert content == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected


@pytest.mark.parametrize("reply", ["It is sunny in Paris {\"name\": 1}.", "{not json at all}",
                                   "<|python_start|>print(1)<|python_end|>"])
def test_other_replies_are_content(reply):
    assert parse(pieces(reply)) == (reply, [])
