"""`offload-moe chat`: the real program in a pseudo-terminal (pexpect), piped mode, history trimming,
and the bad-input paths; plus `ChatSession` on its own."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from chat_fixtures import build_tiny_chat_checkpoint
from offload_moe import OffloadMoeError, load
from offload_moe.api.chat_session import ChatSession
from offload_moe.cli import chat as chat_cli
from offload_moe.cli.main import main
from offload_moe import Placement

pexpect = pytest.importorskip("pexpect")

ENV = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "200",
       "PYTHONUNBUFFERED": "1"}
ENV.pop("FORCE_COLOR", None)
STATUS = re.compile(r"\d+ tokens? · prefill [\d.]+ s \(\d+ tok\) · [\d.]+ tok/s · (RSS|VRAM) [\d.]+ [KMGT]?B")
SGR = re.compile(r"\x1b\[([0-9;]*)m")
TRIM_MESSAGES = ["To be, or not to be", "Shall I compare thee to a summer day?", "The quick brown fox",
                 "What is the question?", "Hello there"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load(tiny, device="cpu")


def spawn(*args, timeout=30):
    child = pexpect.spawn(sys.executable, ["-m", "offload_moe", "chat", *map(str, args)], env=ENV,
                          encoding="utf-8", timeout=timeout, dimensions=(50, 200))
    child.logfile_read = io.StringIO()
    return child


def finish(child, status: int = 0) -> str:
    child.expect(pexpect.EOF)
    child.close()
    out = child.logfile_read.getvalue()
    assert child.exitstatus == status, out
    assert "Traceback" not in out
    return out


def no_colors(text: str) -> bool:
    """NO_COLOR: styles (dim, bold) may stay, colours (SGR 30-49, 90-107) may not."""
    for params in SGR.findall(text):
        for p in params.split(";"):
            if p and (30 <= int(p) <= 49 or 90 <= int(p) <= 107):
                return False
    return True


def test_interactive_session_in_a_terminal(tiny, tmp_path):
    transcript = tmp_path / "chat.json"
    child = spawn("--model", tiny, "--max-new-tokens", 3000, "--ignore-eos", "--seed", 1, "--system", "Be brief.")
    child.expect(r"2 layers × 4 experts, top-2 · context 4096 tokens")   # the load summary
    child.expect(">>> ")
    child.sendline("Hello there")
    child.expect("Hello there\r\n")                                      # the echo of what was typed
    child.expect(r"\S{6}")              # the reply streams: text shows up long before 3000 tokens are done
    child.sendintr()                                                     # Ctrl-C mid-reply
    child.expect("reply interrupted \\(partial reply kept\\)")
    child.expect(STATUS)
    n_tokens = int(child.match.group(0).split()[0])
    assert 1 <= n_tokens < 3000
    child.expect(">>> ")                                                 # the session goes on
    child.sendline("/stats")
    child.expect(r"generation\.new_tokens\s+│\s+(\d+)")
    assert int(child.match.group(1)) == n_tokens
    child.expect("1 turn in context")
    child.expect(">>> ")
    child.sendline(f"/save {transcript}")
    child.expect("saved 3 messages")
    child.expect(">>> ")
    child.sendline("/bogus")
    child.expect("unknown command '/bogus'")
    child.expect("/save FILE")                                           # the help follows
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect(">>> ")
    child.sendline("/help")
    child.expect("/system TEXT")
    child.expect(">>> ")
    child.sendline("/exit")
    out = finish(child)
    assert no_colors(out)

    saved = json.loads(transcript.read_text())
    system, user, reply = saved["messages"]
    assert system == {"role": "system", "content": "Be brief."} and user == {"role": "user", "content": "Hello there"}
    assert reply["role"] == "assistant" and reply["interrupted"] is True and reply["content"]
    assert reply["content"] in out                                       # what was kept is what was shown
    assert saved["settings"]["max_new_tokens"] == 3000 and saved["settings"]["seed"] == 1


def test_piped_input_prints_only_the_reply(tiny, tiny_model):
    message = "Hello there, how are you today?"
    args = ["--temperature", "0.9", "--seed", "7", "--max-new-tokens", "24", "--system", "Be brief."]
    done = subprocess.run([sys.executable, "-m", "offload_moe", "chat", "--model", str(tiny), *args],
                          input=(message + "\n").encode(), capture_output=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    expected = tiny_model.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": message}],
                               temperature=0.9, seed=7, max_new_tokens=24).text
    assert expected
    assert done.stdout == (expected + "\n").encode()
    assert STATUS.search(done.stderr.decode())


def test_long_history_is_trimmed_and_the_chat_goes_on(tiny, tmp_path):
    transcript = tmp_path / "trimmed.json"
    child = spawn("--model", tiny, "--context-length", 64, "--max-new-tokens", 8, "--temperature", 0)
    child.expect(">>> ")
    for i, message in enumerate(TRIM_MESSAGES):
        child.sendline(message)
        if i == 2:
            child.expect("dropped the oldest turn to fit the context of 64 tokens")
        child.expect(STATUS)
        child.expect(">>> ")
    child.sendline("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer" * 2)
    child.expect("error: this message makes a prompt of \\d+ tokens, which leaves no room")
    child.expect(">>> ")
    child.sendline(f"/save {transcript}")
    child.expect(">>> ")
    child.sendintr()                                                     # Ctrl-C at the prompt: exit 130
    out = finish(child, 130)
    assert out.count("dropped the oldest turn") == 3

    # The same conversation through the library: the same replies, the same trimming.
    model = load(tiny, Placement(context_length=64), device="cpu")
    session = ChatSession(model, max_new_tokens=8, temperature=0.0)
    for message in TRIM_MESSAGES:
        for _ in session.send(message):
            pass
        assert len(model.chat_ids(session.messages())) <= 64
    saved = json.loads(transcript.read_text())
    assert saved["messages"] == session.transcript()["messages"]
    assert saved["trimmed_turns"] == session.trimmed_turns == 3
    assert saved["messages_in_context"] == len(session.messages()) == 4


def test_session_trimming_keeps_the_system_prompt(tiny):
    model = load(tiny, Placement(context_length=100), device="cpu")
    session = ChatSession(model, system="You are a helpful assistant.", max_new_tokens=4, temperature=0.0)
    context = model.context_length
    session.history = [{"role": "user", "content": "To be, or not to be"},
                       {"role": "assistant", "content": "that is the question"}] * 8
    assert len(model.chat_ids(session.messages())) > context
    turn = session.send("Hello there")
    assert turn.dropped_turns > 0
    assert len(turn.prompt_ids) + 4 <= context
    reply = "".join(turn)
    assert session.messages()[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert turn.prompt_ids == model.chat_ids(session.messages()[:-1])   # the prompt is what the history keeps
    assert session.messages()[-2:] == [{"role": "user", "content": "Hello there"},
                                       {"role": "assistant", "content": reply}]
    roles = [m["role"] for m in session.messages()[1:]]
    assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_session_caps_the_reply_or_refuses_a_message_that_does_not_fit(tiny):
    model = load(tiny, Placement(context_length=40), device="cpu")
    session = ChatSession(model, max_new_tokens=30, temperature=0.0)
    turn = session.send("Shall I compare thee to a summer day?")   # about 20 tokens: 30 new ones do not fit
    assert turn.capped and turn.max_new_tokens == 40 - len(turn.prompt_ids)
    turn.close()                                                    # never started: nothing joins the history
    assert session.history == []
    with pytest.raises(OffloadMoeError, match="leaves no room in the context of 40 tokens"):
        session.send("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer")
    with pytest.raises(OffloadMoeError, match="empty"):
        session.send("  ")


def test_session_keeps_a_partial_reply_and_drops_an_empty_one(tiny_model):
    session = ChatSession(tiny_model, max_new_tokens=50, temperature=0.0, ignore_eos=True)
    turn = session.send("Hello there")
    pieces = iter(turn)
    first = next(pieces)
    turn.close()                                                    # what Ctrl-C does
    assert session.history == [{"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": first, "interrupted": True}]
    assert session.messages()[-1] == {"role": "assistant", "content": first}  # the flag stays out of the prompt
    session.send("To be").close()
    assert len(session.history) == 2
    session.reset()
    assert session.history == [] and session.transcript()["messages"] == []


def lines(*items):
    it = iter(items)

    def read_line():
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read_line


def test_errors_during_a_turn_are_printed_and_the_session_goes_on(tiny_model, monkeypatch, capsys):
    real_stream = tiny_model.stream
    failures = iter([OffloadMoeError("expert store went away"), RuntimeError("CUDA out of memory (simulated)")])

    def flaky_stream(prompt, **kwargs):
        failure = next(failures, None)
        for i, piece in enumerate(real_stream(prompt, **kwargs)):
            if failure is not None and i == 2:
                raise failure
            yield piece
    monkeypatch.setattr(tiny_model, "stream", flaky_stream)
    session = ChatSession(tiny_model, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    loop = chat_cli.ChatLoop(session)
    assert loop.interactive(lines("Hello there", "To be", "/nope", "What is the question?")) == 0  # Ctrl-D ends
    out, err = capsys.readouterr()
    assert "error: expert store went away" in err
    assert "error: RuntimeError: CUDA out of memory (simulated)" in err
    assert "unknown command '/nope'" in err and "/help" in err
    assert "Traceback" not in err
    assert len(STATUS.findall(err)) == 3
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 3  # partial replies kept
    assert session.history[-1] == {"role": "assistant", "content": out.rstrip("\n").splitlines()[-1]}


def test_missing_model_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(tmp_path / "nope")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("offload-moe: error: ") and "nope" in err


def test_empty_piped_input_is_an_error(tiny, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["chat", "--model", str(tiny)]) == 1
    assert "stdin is empty" in capsys.readouterr().err


def test_profile_reaches_the_loader_and_its_refusal_is_clear(tiny, monkeypatch, capsys):
    seen = {}

    def refuse(path, **kwargs):
        seen.update(kwargs, path=path)
        raise OffloadMoeError(f"profile {kwargs.get('profile')!r}: needs 9.20 GB of VRAM, the budget is 4.00 GB")
    monkeypatch.setattr(chat_cli, "load", refuse)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(tiny), "--profile", "rtx3060-12gb", "--context-length", "128"]) == 1
    assert seen["profile"] == "rtx3060-12gb" and seen["placement"].context_length == 128 and seen["path"] == str(tiny)
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "offload-moe: error: profile 'rtx3060-12gb': needs 9.20 GB of VRAM, the budget is 4.00 GB\n"


def test_a_profile_the_loader_refuses_is_one_line_and_exit_1(tiny, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(tiny), "--device", "cpu", "--profile", "no-such-profile"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("offload-moe: error: ") and "no-such-profile" in err
