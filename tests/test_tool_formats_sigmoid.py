"""Tool calls of GLM-4.5/4.6/4.7, DeepSeek-V3/R1/V3.1, Kimi-K2 and MiniMax-M2 parse into `tool_calls` (issue 27),
in the syntax their published chat templates write, fed piece by piece as generation streams it."""


import pytest

from offload_moe.server.tools import DEEPSEEK, GLM, HERMES, KIMI, MINIMAX, tool_format
from serve_fixtures import feed_all


# GLM-4.5 / 4.6: a newline after the name and after each value; strings raw, other values as JSON
GLM45 = ("Let me look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
         "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>units</arg_key>\n"
         '<arg_value>{"temp": "C"}</arg_value>\n</tool_call>')
# GLM-4.7: no newlines; two calls; a call without arguments
GLM47 = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>"
         "<tool_call>get_time</tool_call>")
# DeepSeek-V3-0324 / R1: function<sep>NAME then a ```json fence, calls in one section
DSV3 = ("Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
        "```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
# DeepSeek-V3.1: NAME<sep>{json}
DSV31 = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Oslo"}<｜tool▁call▁end｜>'
         "<｜tool▁calls▁end｜>")
# Kimi-K2: functions.NAME:IDX ids
KIMI_K2 = ("I'll check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
           '<|tool_call_argument_begin|>{"city": "Lima"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1'
           "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>")
# MiniMax-M2: invokes with parameters, strings raw
MINIMAX_M2 = ('Sure.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
              '<parameter name="days">2</parameter>\n</invoke>\n<invoke name="get_time">\n</invoke>\n'
              "</minimax:tool_call>")

CASES = {
    "glm-4.5": (GLM, GLM45, "Let me look.\n",
                [("get_weather", {"city": "Paris", "days": 3, "units": {"temp": "C"}})]),
    "glm-4.7": (GLM, GLM47, "", [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    "deepseek-v3": (DEEPSEEK, DSV3, "Checking.",
                    [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    "deepseek-v3.1": (DEEPSEEK, DSV31, "", [("get_weather", {"city": "Oslo"})]),
    "kimi-k2": (KIMI, KIMI_K2, "I'll check.", [("get_weather", {"city": "Lima"}), ("get_time", {})]),
    "minimax-m2": (MINIMAX, MINIMAX_M2, "Sure.\n", [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]),
}


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("case", CASES)
def test_calls_parse_whatever_the_pieces(case, size):
    fmt, text, content, calls = CASES[case]
    assert feed_all(fmt, text, size) == (content, calls)


@pytest.mark.parametrize("fmt,text", [(GLM, "Use <tool_call>not a name!</tool_call> here"),
                                      (DEEPSEEK, "<｜tool▁calls▁begin｜>garbage<｜tool▁calls▁end｜>"),
                                      (KIMI, "<|tool_calls_section_begin|>junk<|tool_calls_section_end|>"),
                                      (MINIMAX, '<minimax:tool_call><invoke name="a b"></invoke></minimax:tool_call>')])
def test_what_is_not_a_call_stays_text(fmt, text):
    assert feed_all(fmt, text) == (text, [])


def test_text_without_calls_streams_through():
    assert feed_all(GLM, "Plain answer, <tool no.") == ("Plain answer, <tool no.", [])


def test_the_format_is_read_from_the_template():
    """Snippets of the published templates: GLM's tool prompt writes both markers, DeepSeek's and Kimi's their own."""
    assert tool_format("<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>") == GLM
    assert tool_format("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'}}") == DEEPSEEK
    assert tool_format("<|tool_calls_section_begin|>{%- for tool_call in message.tool_calls -%}") == KIMI
    assert tool_format('<minimax:tool_call>\n<invoke name="tool-name-1">') == MINIMAX
    assert tool_format('<tool_call>\n{"name": <function-name>}\n</tool_call>') == HERMES
