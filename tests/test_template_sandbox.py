"""The chat template sandbox's limits (offload_moe/generation/template_sandbox.py): each runaway template of
the bad-input reports ends in one line naming the limit, in under 5 s and under 256 MB more memory,
and the wall-clock limit holds when rendering runs in a worker thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from offload_moe import OffloadMoeError
from offload_moe.generation import template_sandbox
from offload_moe.generation.text import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SQUARING = ("{% set ns = namespace(x=2**64) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
            "{{ ns.x }}")
RUNAWAY = {
    "nested range loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "nested loops, filtered": "{% for i in range(99999) %}{% for j in range(99999) if false %}{% endfor %}"
                              "{% endfor %}",
    "lipsum(n=1000000)": "{{ lipsum(n=1000000) }}",
    "center(3e9)": "{{ 'a'|center(3e9) }}",
    "center(3e8)": "{{ 'a'|center(300000000) }}",
    "indent(2e9)": "{{ 'a\nb'|indent(2e9) }}",
    "'%03000000000d'|format(1)": "{{ '%03000000000d'|format(1) }}",
    "'%03000000000d' % 1": "{{ '%03000000000d' % 1 }}",
    "'{:>3000000000}'.format(1)": "{{ '{:>3000000000}'.format(1) }}",
    "wordwrap(1) on 20 MB": "{{ ('ab ' * 7000000)|wordwrap(1) }}",
    "big-integer squaring": SQUARING,
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "'x' * 10**9": "{{ 'x' * 1000000000 }}",
    "2 ** 10**8": "{{ 2 ** 100000000 }}",
    "~ doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                  "{{ ns.s }}",
    "+ doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
                  "{{ ns.s }}",
    "ljust(10**10)": "{{ 'x'.ljust(10000000000) }}",
    "split into 10**7 words": "{{ ('ab ' * 10000000).split() }}",
    "replace growing": "{{ ('a' * 1000000)|replace('a', 'b' * 60) }}",
    "join with a huge separator": "{{ range(100000)|join('x' * 10000) }}",
    "batch(10**9)": "{{ [1]|batch(1000000000, 'x')|list }}",
    "tojson(indent=10**9)": "{{ messages|tojson(indent=1000000000) }}",
    "output over 32 MiB": "{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}",
}


@pytest.fixture(scope="module")
def runaway_results():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "template_limits_runner.py")],
                          input=json.dumps(list(RUNAWAY.values())), capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(RUNAWAY, json.loads(done.stdout)))


@pytest.mark.parametrize("case", list(RUNAWAY))
def test_runaway_template_is_one_line_fast_and_small(runaway_results, case):
    r = runaway_results[case]
    assert r["error"] is not None and r["error"].startswith("OffloadMoeError: "), r
    assert "\n" not in r["error"] and "ckpt/tokenizer_config.json" in r["error"], r["error"]
    assert "stopped by the sandbox" in r["error"], r["error"]
    assert r["seconds"] < 5, r          # the limits stop it, not the machine
    assert r["added_mb"] < 256, r


def test_wall_clock_limit_holds_in_a_worker_thread():
    """No signal involved: the server renders in a worker thread, where SIGALRM cannot reach."""
    tok = Tokenizer.from_parts(None, None, None, RUNAWAY["nested loops, filtered"], "t")
    caught = []

    def render():
        try:
            tok.render_chat([{"role": "user", "content": "hi"}])
        except OffloadMoeError as e:
            caught.append(str(e))

    worker = threading.Thread(target=render)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert len(caught) == 1 and f"longer than {template_sandbox.MAX_SECONDS:g} s" in caught[0], caught


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['role'] }}: {{ m['content']|center(9) }}{% endfor %}",
    "{{ '%05d|%-3s|' % (7, 'a') }}{{ '{:>4}'.format('b') }}{{ 'a b'.split()|join(',') }}",
    "{{ 'x\ny'|indent(2, true) }}|{{ 'a a'|replace('a', 'bb') }}|{{ 3 ** 40 }}|{{ 'ab cd'|wordwrap(3) }}",
    "{% macro f(n) %}{% if n %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}|{{ [1, 2, 3]|batch(2)|list }}",
    "{{ messages|tojson(indent=2) }}{{ 'a\tb'.expandtabs(4) }}{{ 'x'.rjust(3, '-') }}",
])
def test_ordinary_templates_render_as_plain_jinja(template):
    """The limits change nothing below them: the same text as jinja's own sandbox renders."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "user", "content": "hi"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    plain.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    assert template_sandbox.render(template, messages=messages) == plain.from_string(template).render(messages=messages)
