"""`offload-moe serve`: a real uvicorn server on a free localhost port, driven by the official `openai`
client (and raw HTTP for what a client library would refuse to send), against the Python API."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import offload_moe  # noqa: E402
from offload_moe.server import create_app  # noqa: E402
from serve_fixtures import HeldModel, free_port, running_server  # noqa: E402
from serve_fixtures import checkpoint, reference  # noqa: E402,F401  (fixtures)

NAME = "tiny-chat"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world, who are you?"}]
LONG = 64  # tokens asked for by the requests that are held (`HeldModel`) and then cancelled
HELD_AT = 4  # the held generation waits for its cancellation at this token


@pytest.fixture(scope="module")
def held(checkpoint):
    """The served model: generations run as usual unless a test arms `held.hold()`."""
    return HeldModel(offload_moe.load(checkpoint, device="cpu"))


@pytest.fixture(scope="module")
def url(held):
    app = create_app(held, model_name=NAME, max_queue=8)
    with running_server(app) as base:
        yield base


def client_for(base: str, key: str = "unused", timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=timeout)


@pytest.fixture
def client(url):
    return client_for(url)


# ---------------------------------------------------------------- raw HTTP helpers


def call(base, method, path, body=None, headers=None):
    """One request; returns (status, lower-cased headers, parsed JSON body or None)."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if raw else None


class OpenStream:
    """A streaming request read line by line, which the test can abandon mid-stream."""

    def __init__(self, base, path, body):
        u = urlsplit(base)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.conn.connect()
        self.sock = self.conn.sock
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("content-type").startswith("text/event-stream")

    def events(self):
        while True:
            line = self.response.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                assert self.response.readline() == b"\n"  # every event is `data: ...\n\n`
                yield line[len(b"data: "):].rstrip(b"\n")

    def until_text(self) -> str:
        """Read until some generated text arrives (so the request is running on the worker)."""
        for data in self.events():
            choice = json.loads(data)["choices"][0]
            text = choice.get("delta", {}).get("content") or choice.get("text")
            if text:
                return text
        raise AssertionError("the stream ended before any text")

    def disconnect(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.response.close()
        self.conn.close()


def metrics(base, headers=None):
    status, _, body = call(base, "GET", "/metrics", headers=headers)
    assert status == 200
    return body


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.02)


# ---------------------------------------------------------------- answers equal the Python API


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert call(url, "GET", "/health")[:3:2] == (200, {"status": "ok", "model": NAME})


def test_chat_equals_model_chat(client, reference):
    expected = reference.chat(MESSAGES, max_new_tokens=12, temperature=0)
    assert expected.token_ids, "the tiny model should say something"
    reply = client.chat.completions.create(model="any-name-is-fine", messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    assert reply.object == "chat.completion" and reply.model == NAME
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    prompt_tokens = len(reference.chat_ids(MESSAGES))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt_tokens, len(expected.token_ids), prompt_tokens + len(expected.token_ids))


def test_chat_stream_equals_model_chat(client, reference):
    expected = reference.chat(MESSAGES, max_new_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_equal_model_generate(client, reference):
    prompt = "The quick brown fox"
    expected = reference.generate(prompt, max_new_tokens=15, temperature=0)
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=15, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(reference.encode_prompt(prompt))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=15, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == expected.finish_reason


def test_token_id_prompt_and_max_tokens(client, reference):
    ids = reference.encode_prompt("Hello world")
    expected = reference.generate(ids, max_new_tokens=7, temperature=0, ignore_eos=True)
    reply = client.completions.create(model=NAME, prompt=ids, max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected.text
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (7, "length")


def test_stop_strings_and_seed(client, reference):
    prompt = "Mixture of experts"
    full = reference.generate(prompt, max_new_tokens=30, temperature=0, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = reference.generate(prompt, max_new_tokens=30, temperature=0, stop=[stop, "never-there"])
    for stream in (False, True):
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stream=stream,
                                          stop=[stop, "never-there"])
        chunks = list(reply) if stream else [reply]
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert stop not in expected.text
    sampled = reference.generate(prompt, max_new_tokens=12, temperature=1.2, top_p=0.9, seed=7).text
    for _ in range(2):
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.2, top_p=0.9,
                                          seed=7)
        assert reply.choices[0].text == sampled


def test_seed_minus_one_is_random(client):
    """seed -1 draws a fresh seed per request, as llama.cpp's server and our CLI's --seed -1 do
    (torch would take -1 as one fixed seed: the same text every time)."""
    texts = {client.completions.create(model=NAME, prompt="Mixture of experts", max_tokens=12, temperature=1.2,
                                       seed=-1).choices[0].text for _ in range(3)}
    assert len(texts) > 1


def test_raw_stream_is_server_sent_events(url, reference):
    s = OpenStream(url, "/v1/chat/completions", {"model": NAME, "messages": MESSAGES, "max_tokens": 5,
                                                  "temperature": 0, "stream": True})
    events = list(s.events())
    s.disconnect()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == reference.chat(MESSAGES, max_new_tokens=5, temperature=0).text


# ---------------------------------------------------------------- concurrency, queue, disconnects


def test_concurrent_clients_all_get_their_answers(url, reference):
    prompts = ["Hello world", "The quick brown fox", "Offloading keeps", "naïve café"]
    expected = [reference.generate(p, max_new_tokens=10, temperature=0).text for p in prompts]
    expected_chat = [reference.chat([{"role": "user", "content": p}], max_new_tokens=10, temperature=0).text
                     for p in prompts]
    served = metrics(url)["requests"]["served"]
    results: dict = {}

    def ask(i, prompt):
        c = client_for(url)
        if i % 2:
            chunks = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=10, temperature=0, stream=True)
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        else:
            results[i] = c.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: (expected_chat if i % 2 else expected)[i] for i in range(len(prompts))}
    assert metrics(url)["requests"]["served"] == served + len(prompts)


def test_disconnect_mid_stream_frees_the_worker(url, client, reference, held):
    before = metrics(url)["requests"]
    held.hold(after=HELD_AT)
    s = OpenStream(url, "/v1/completions", {"model": NAME, "prompt": "Hello", "max_tokens": LONG, "temperature": 0,
                                            "stream": True, "ignore_eos": True})
    s.until_text()
    assert held.reached.wait(30)   # the generation is waiting at its scripted step: still running
    s.disconnect()
    # one worker, first come first served: this answer comes after the cancelled request has ended
    expected = reference.chat(MESSAGES, max_new_tokens=8, temperature=0).text
    assert client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8,
                                          temperature=0).choices[0].message.content == expected
    assert held.held_tokens == HELD_AT   # stopped at the token where the disconnect found it
    m = metrics(url)
    assert m["requests"]["cancelled"] == before["cancelled"] + 1
    assert m["requests"]["served"] == before["served"] + 1
    assert not m["queue"]["busy"]


def test_disconnect_while_waiting_non_streamed(url, client, held):
    before = metrics(url)["requests"]
    held.hold(after=HELD_AT)
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": NAME, "prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"})
    assert held.reached.wait(30)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    client.completions.create(model=NAME, prompt="Hello", max_tokens=2, temperature=0)  # served after it
    assert held.held_tokens == HELD_AT
    m = metrics(url)["requests"]
    assert (m["cancelled"], m["served"]) == (before["cancelled"] + 1, before["served"] + 1)


def test_full_queue_answers_429_then_recovers(checkpoint, reference):
    model = HeldModel(offload_moe.load(checkpoint, device="cpu"))
    app = create_app(model, model_name=NAME, max_queue=1)
    with running_server(app) as base:
        model.hold(after=HELD_AT)
        running = OpenStream(base, "/v1/chat/completions", {"model": NAME, "messages": MESSAGES, "max_tokens": LONG,
                                                            "temperature": 0, "stream": True, "ignore_eos": True})
        running.until_text()
        assert model.reached.wait(30)  # running until cancelled
        queued: dict = {}

        def wait_in_queue():
            queued["reply"] = client_for(base).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6,
                                                                       temperature=0)

        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        wait_for(lambda: metrics(base)["queue"]["waiting"] == 1)  # the other thread's request has arrived
        with pytest.raises(openai.RateLimitError) as e:
            client_for(base).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6)
        assert e.value.status_code == 429
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.code == "rate_limit_exceeded" and "busy" in e.value.message
        running.disconnect()  # the queued request runs next
        waiter.join(30)
        expected = reference.chat(MESSAGES, max_new_tokens=6, temperature=0).text
        assert queued["reply"].choices[0].message.content == expected
        assert model.held_tokens == HELD_AT
        m = metrics(base)["requests"]
        assert (m["rejected"], m["cancelled"], m["served"]) == (1, 1, 1)
        reply = client_for(base).completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- bad requests


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD = [  # (path, body, status, code, param, words in the message)
    ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, None, None, "could not parse the json"),
    ("/v1/chat/completions", b"\xff\xfe not utf-8", 400, None, None, "could not parse"),
    ("/v1/chat/completions", b"", 400, None, None, "could not parse"),
    ("/v1/chat/completions", [CHAT], 400, "invalid_type", None, "json object"),
    ("/v1/chat/completions", {"model": NAME}, 400, "missing_required_parameter", "messages", "messages"),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "missing_required_parameter", "model", "model"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, 400, "invalid_type", "messages", "list"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "invalid_type", "messages", "non-empty"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "missing_required_parameter",
     "messages[0].content", "content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value",
     "messages[0].role", "expected one of"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "invalid_value",
     "response_format.type", "expected one of"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "invalid_value",
     "response_format.json_schema", "expected"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, 400, None, None,
     "json_schema"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "invalid_value", "tool_choice",
     "needs `tools`"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}},
                              "tools": [{"type": "function", "function": {"name": "g"}}]}, 400, "invalid_value",
     "tool_choice", "not among"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias",
     "from -100 to 100"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"x": 1}}, 400, "invalid_value", "logit_bias", "not a token id"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"99999": 1}}, 400, "invalid_value", "logit_bias",
     "outside the vocabulary"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "extreme"}, 400, "unsupported_value", "reasoning_effort",
     "one of"),
    ("/v1/chat/completions", {**CHAT, "store": "yes"}, 400, "invalid_type", "store", "true or false"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "unsupported_value", "tools", "no tool-call format"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "invalid_value", "top_logprobs", "logprobs: true"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "invalid_value", "top_logprobs",
     "between 0 and 20"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, 400, "invalid_value", "presence_penalty", "<= 2"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "invalid_type", "temperature", "number"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "invalid_value", "temperature", "<= 2"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400, "invalid_value", "top_p", "<= 1"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "invalid_value", "max_tokens", ">= 1"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, 400, "invalid_type", "max_tokens", "integer"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2.5}, 400, "invalid_type", "max_tokens", "integer"),
    ("/v1/chat/completions", {**CHAT, "seed": "7"}, 400, "invalid_type", "seed", "integer"),
    ("/v1/chat/completions", {**CHAT, "stop": [1]}, 400, "invalid_type", "stop", "list of strings"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "invalid_type", "stream", "true or false"),
    ("/v1/chat/completions", {**CHAT, "tools": "x"}, 400, "invalid_type", "tools", "list of tools"),
    ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, 400, "unknown_parameter", "frobnicate", "unrecognized"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "unsupported_value", "n", "not supported"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 5000}, 400, "context_length_exceeded", "messages",
     "maximum context length is 4096 tokens"),
    ("/v1/completions", {"model": NAME, "prompt": 123}, 400, "invalid_type", "prompt", "string"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "invalid_value", "prompt", "empty"),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "unsupported_value", "prompt", "one per request"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 99999]}, 400, "invalid_value", "prompt", "token ids"),
    ("/v1/completions", {"model": NAME, "prompt": [5] * 5000}, 400, "context_length_exceeded", "prompt",
     "5000 in the prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "echo": True}, 400, "unsupported_value", "echo",
     "not supported"),
]


@pytest.mark.parametrize("path,body,status,code,param,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_request_is_a_clear_openai_error(url, path, body, status, code, param, words):
    got_status, _, got = call(url, "POST", path, body)
    assert got_status == status
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["type"] == "invalid_request_error"
    assert (got["error"]["code"], got["error"]["param"]) == (code, param)
    assert words in got["error"]["message"].lower()


def test_wrong_path_and_method(url):
    status, _, body = call(url, "GET", "/v1/nothing")
    assert status == 404 and "no such endpoint" in body["error"]["message"]
    status, headers, body = call(url, "POST", "/v1/models", b"{}")
    assert status == 405 and "GET" in headers["allow"] and body["error"]["code"] == "method_not_allowed"
    status, _, _ = call(url, "GET", "/v1/chat/completions")
    assert status == 405


def test_bad_requests_through_the_client_and_then_it_still_serves(client, reference):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4096)
    assert e.value.code == "context_length_exceeded" and "context length" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=MESSAGES, n=3)
    expected = reference.chat(MESSAGES, max_new_tokens=4, temperature=0).text
    assert client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4,
                                          temperature=0).choices[0].message.content == expected


def test_metrics(url):
    m = metrics(url)
    assert m["model"] == NAME and m["context_length"] == 4096
    assert m["requests"]["served"] >= 1 and m["queue"]["limit"] == 8
    assert set(m["tokens_per_second"]) == {"last_decode", "average"}
    assert "experts" in m["stats"] and "generation" in m["stats"]


# ---------------------------------------------------------------- API key


def test_api_key(checkpoint, reference):
    app = create_app(offload_moe.load(checkpoint, device="cpu"), model_name=NAME, api_key="sekret")
    with running_server(app) as base:
        assert call(base, "GET", "/health")[0] == 200  # stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT),
                                       ("GET", "/metrics", None)):
                status, _, got = call(base, method, path, body, headers)
                assert status == 401 and got["error"]["code"] == "invalid_api_key", (headers, path)
        with pytest.raises(openai.AuthenticationError):
            client_for(base, "wrong").models.list()
        good = client_for(base, "sekret")
        expected = reference.chat(MESSAGES, max_new_tokens=4, temperature=0).text
        assert good.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4,
                                            temperature=0).choices[0].message.content == expected
        assert call(base, "GET", "/metrics", headers={"Authorization": "Bearer sekret"})[0] == 200


# ---------------------------------------------------------------- the command line


def test_missing_dependency_is_a_one_line_error(monkeypatch, capsys, checkpoint):
    from offload_moe import OffloadMoeError
    from offload_moe.cli.main import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", str(checkpoint), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install starlette uvicorn" in err[0]
    monkeypatch.setitem(sys.modules, "starlette", None)
    with pytest.raises(OffloadMoeError, match=r"pip install starlette uvicorn"):
        create_app(None, model_name=NAME)


def test_busy_port_and_bad_arguments_are_one_line_errors(capsys, checkpoint):
    from offload_moe.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(checkpoint), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
    assert main(["serve", "--model", str(checkpoint), "--max-queue", "-1"]) == 1
    assert "--max-queue" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint), "--parallel", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parallel 0: expected an integer >= 1" in err[0]


@pytest.mark.parametrize("key_from", ["env", "file"])
def test_cli_serves_until_interrupted(checkpoint, tmp_path, key_from):
    port = free_port()
    env = {**os.environ, "NO_COLOR": "1"}
    key_args = []
    if key_from == "env":
        env["OFFLOAD_MOE_API_KEY"] = "k3y"
    else:
        (tmp_path / "key").write_text("k3y\n")
        key_args = ["--api-key-file", str(tmp_path / "key")]
    proc = subprocess.Popen([sys.executable, "-m", "offload_moe", "serve", "--model", str(checkpoint),
                             "--port", str(port), "--device", "cpu", "--model-name", NAME, *key_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return call(base, "GET", "/health")[0] == 200
            except OSError:
                return False
        wait_for(up, timeout=60)
        reply = client_for(base, "k3y").completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
        assert call(base, "GET", "/v1/models")[0] == 401  # the key came from $OFFLOAD_MOE_API_KEY or the file
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130  # Ctrl-C, as every command (README): after a clean shutdown
    assert b"server stopped" in err
    assert out == b""  # logs go to stderr
    assert f"at http://127.0.0.1:{port}/v1".encode() in err and b"POST /v1/completions" in err
