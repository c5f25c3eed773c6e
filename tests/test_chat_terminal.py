"""`offload-moe chat` as llama.cpp and ollama users expect it, in a pseudo-terminal: the demo chat with
default options keeps its turns, a session seed seeds the session once, typed-ahead keys stay out of
the reply, multi-line input."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from chat_fixtures import build_tiny_chat_checkpoint
from offload_moe.cli.chat import read_message

pexpect = pytest.importorskip("pexpect")

ENV = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "200",
       "PYTHONUNBUFFERED": "1"}
ENV.pop("FORCE_COLOR", None)


def spawn(*args, timeout=60):
    child = pexpect.spawn(sys.executable, ["-m", "offload_moe", "chat", *map(str, args)], env=ENV,
                          encoding="utf-8", timeout=timeout, dimensions=(50, 200))
    child.logfile_read = io.StringIO()
    return child


def session(messages, transcript, *args) -> tuple[dict, str]:
    """Run one interactive demo session: send each message, then /stats and /save; return (transcript, output)."""
    child = spawn(*args)
    for message in messages:
        child.expect(">>> ")
        child.sendline(message)
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"(\d+) turns? in context · (\d+) trimmed")
    in_context, trimmed = int(child.match.group(1)), int(child.match.group(2))
    child.expect(">>> ")
    saved, out = save_and_exit(child, transcript)
    saved["in_context"], saved["trimmed"] = in_context, trimmed
    return saved, out


def save_and_exit(child, transcript, saved: str = "saved") -> tuple[dict, str]:
    """At the prompt: /save the transcript (expecting `saved`), /exit cleanly; (transcript, output)."""
    child.sendline(f"/save {transcript}")
    child.expect(saved)
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    out = child.logfile_read.getvalue()
    assert child.exitstatus == 0 and "Traceback" not in out, out
    return json.loads(transcript.read_text()), out


MESSAGES = ["Who is Hamlet?", "I love thee, Juliet.", "What news from Verona?"]


def test_default_demo_chat_keeps_three_turns_in_context(tmp_path):
    saved, out = session(MESSAGES, tmp_path / "t.json")
    assert saved["in_context"] == 3 and saved["trimmed"] == 0, out
    assert saved["messages_in_context"] == 6
    # no turn dropped, no context limited (a sampled reply may reach its budget: that notice is fine)
    assert "dropped" not in out and "limited" not in out, out


def test_a_session_seed_seeds_the_session_once_and_a_replay_repeats_it(tmp_path):
    first, _ = session(MESSAGES[:2], tmp_path / "a.json", "--seed", 0)
    again, _ = session(MESSAGES[:2], tmp_path / "b.json", "--seed", 0)
    replies = [m["content"] for m in first["messages"] if m["role"] == "assistant"]
    assert len(replies) == 2 and replies[0] != replies[1]                    # each turn draws afresh
    assert [m["content"] for m in again["messages"] if m["role"] == "assistant"] == replies


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


def test_keys_typed_during_a_reply_are_not_echoed_nor_sent(tiny, tmp_path):
    child = spawn("--model", tiny, "--max-new-tokens", 3000, "--ignore-eos", "--seed", 1)
    child.expect(">>> ")
    child.sendline("Hello there")
    child.expect("Hello there\r\n")
    child.expect(r"\S{6}")                     # the reply is streaming
    child.send("XQXQ")                         # typed ahead (the tiny tokenizer cannot produce X or Q)
    child.expect(r"\S{6}")                     # still streaming afterwards
    child.sendintr()
    child.expect("reply interrupted")
    child.expect(">>> ")
    saved, out = save_and_exit(child, tmp_path / "t.json", "saved 2 messages")
    assert "XQXQ" not in out
    assert all("XQXQ" not in m["content"] for m in saved["messages"])


def test_multi_line_messages_in_a_terminal(tiny, tmp_path):
    child = spawn("--model", tiny, "--max-new-tokens", 2, "--temperature", 0)
    child.expect(">>> ")
    child.sendline('"""first line')
    child.expect(r"\.\.\. ")
    child.sendline('second line"""')
    child.expect(">>> ")
    child.sendline("one \\")
    child.expect(r"\.\.\. ")
    child.sendline("two")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 't.json'}")
    child.expect("saved")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    users = [m["content"] for m in json.loads((tmp_path / "t.json").read_text())["messages"] if m["role"] == "user"]
    assert users == ["first line\nsecond line", "one \ntwo"]


@pytest.mark.parametrize("lines, message", [
    (["plain"], "plain"),
    (['"""a', "b", 'c"""'], "a\nb\nc"),
    (['"""one line"""'], "one line"),
    (["x\\", "y\\", "z"], "x\ny\nz"),
])
def test_read_message(lines, message):
    feed = iter(lines)
    assert read_message(lambda prompt: next(feed)) == message


# ---------------------------------------------------------------- Ctrl-C, as every command (README)

ENDLESS = ["--max-new-tokens", 100000, "--ignore-eos", "--force-context", "--context-length", 100000]  # minutes of text


def ended(child) -> tuple[int, str]:
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    out = child.logfile_read.getvalue()
    assert "Traceback" not in out, out
    return child.exitstatus, out


def test_ctrl_c_at_the_chat_prompt_exits_130_and_ctrl_d_exits_0():
    child = spawn()
    child.expect(">>> ")
    child.sendintr()
    assert ended(child)[0] == 130
    child = spawn()
    child.expect(">>> ")
    child.sendeof()
    assert ended(child)[0] == 0


def test_ctrl_c_mid_reply_stops_the_reply_and_a_later_ctrl_d_exits_0():
    child = spawn(*ENDLESS)
    child.expect(">>> ")
    child.sendline("Who is Hamlet?")
    child.expect("Who is Hamlet\\?\r\n")
    child.expect(r"\S{6}")                     # the reply is streaming
    child.sendintr()
    child.expect("reply interrupted")
    child.expect(">>> ")                       # the session goes on ...
    child.sendeof()
    assert ended(child)[0] == 0                # ... and ends as Ctrl-D ends it


def test_ctrl_c_mid_generate_exits_130():
    child = pexpect.spawn(sys.executable, ["-m", "offload_moe", "generate", "To be", *map(str, ENDLESS)], env=ENV,
                          encoding="utf-8", timeout=60, dimensions=(50, 200))
    child.logfile_read = io.StringIO()
    child.expect(r"\S{6}")                     # text is streaming
    child.sendintr()
    status, out = ended(child)
    assert status == 130 and "offload-moe: interrupted" in out


def test_ctrl_c_on_serve_exits_130_after_a_clean_shutdown():
    from serve_fixtures import free_port

    child = pexpect.spawn(sys.executable, ["-m", "offload_moe", "serve", "--device", "cpu", "--port", str(free_port())],
                          env=ENV, encoding="utf-8", timeout=60, dimensions=(50, 200))
    child.logfile_read = io.StringIO()
    child.expect("serving 'offload-moe-demo'")
    child.expect("Application startup complete")  # uvicorn's own signal handlers are in place
    child.sendintr()
    status, out = ended(child)
    assert status == 130 and "server stopped" in out
