"""The server's OpenAI surface beyond plain chat: fields accepted and ignored, logit_bias,
reasoning_effort, response_format (json_object / json_schema), a forced tool_choice, and /metrics in
Prometheus' format; driven by the official `openai` client against the Python API as the oracle."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

import offload_moe  # noqa: E402
from offload_moe.server import create_app  # noqa: E402
from serve_fixtures import running_server  # noqa: E402
from serve_fixtures import checkpoint, reference  # noqa: E402,F401  (fixtures)

NAME = "tiny-chat"
MESSAGES = [{"role": "user", "content": "Hello world, who are you?"}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rain"],
          "properties": {"city": {"type": "string", "maxLength": 10}, "rain": {"type": "boolean"},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


@pytest.fixture(scope="module")
def url(checkpoint):
    app = create_app(offload_moe.load(checkpoint, device="cpu", threads=None), model_name=NAME)
    with running_server(app) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_with_store_metadata_and_logit_bias_gets_200(client, reference, caplog):
    caplog.set_level(logging.INFO, logger="offload_moe.server")
    prompt_ids = reference.chat_ids(MESSAGES)
    bias = {"40": 100}
    expected = reference.generate(prompt_ids, max_new_tokens=3, temperature=0, logit_bias={40: 100}).token_ids
    for _ in range(2):
        reply = client.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=3, temperature=0, store=True, metadata={"run": "test"},
            logit_bias=bias, user="someone", service_tier="auto", reasoning_effort="low",
            stream_options=None, parallel_tool_calls=None)
        assert reply.choices[0].message.content == reference.tokenizer.decode(expected)
    assert expected == [40, 40, 40]
    logged = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert sorted(m.split("'")[1] for m in logged) == ["metadata", "service_tier", "store", "user"]  # once each


def test_reasoning_effort_reaches_the_template(reference):
    template = "{{ reasoning_effort | default('unset') }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    original = reference.tokenizer.chat_template
    try:
        reference.tokenizer.chat_template = template
        assert reference.chat_text(MESSAGES, reasoning_effort="high").startswith("high|")
        assert reference.chat_text(MESSAGES).startswith("unset|")
    finally:
        reference.tokenizer.chat_template = original


def test_response_format_json_schema_and_json_object(client):
    for seed in range(3):
        reply = client.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=120, temperature=0.7, seed=3,
                                           response_format={"type": "json_object"})
    text = reply.choices[0].message.content
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_streamed_json_schema(client):
    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=5, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_forced_tool_choice_named_and_required(client):
    for seed in range(3):
        reply = client.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed, tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=1,
                                            tools=[WEATHER, TIME], tool_choice="required", stream=True)
    calls, reasons = [], []
    for c in stream:
        if c.choices:
            calls += c.choices[0].delta.tool_calls or []
            reasons.append(c.choices[0].finish_reason)
    (call,) = calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert reasons[-1] == "tool_calls"


def _get(url, accept=None):
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.headers["content-type"], r.read().decode()


def test_metrics_in_prometheus_format(url, client):
    client.completions.create(model=NAME, prompt="Hello", max_tokens=2, temperature=0)
    kind, as_json = _get(f"{url}/metrics")
    assert kind == "application/json"
    served = json.loads(as_json)["requests"]["served"]
    assert served >= 1
    for address, accept in ((f"{url}/metrics?format=prometheus", None),
                            (f"{url}/metrics", "application/openmetrics-text;version=1.0.0,text/plain;q=0.5")):
        kind, text = _get(address, accept)
        assert kind.startswith("text/plain; version=0.0.4")
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        assert int(lines[f'offload_moe_requests_served{{model="{NAME}"}}']) == served
        assert f'offload_moe_context_length{{model="{NAME}"}}' in lines
        assert "# TYPE offload_moe_queue_waiting gauge" in text
