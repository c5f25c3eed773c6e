"""Command-line conventions: exit codes, no abbreviated options, "did you mean", NO_COLOR and non-TTY
output free of styling, tables within 80 and 120 columns, help text with defaults for every option,
`info` taking what `plan` takes, a file given as --model named as such; and `generate`'s --stop,
--system, --chat, --ignore-eos and its context-full notice."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from chat_fixtures import build_tiny_chat_checkpoint
from offload_moe import load
from offload_moe.cli import common
from offload_moe.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "offload_moe" / "demo"
SGR = re.compile(r"\x1b\[[0-9;]*m")
ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "COLUMNS")}
ENV.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def cli(*args, env=None, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload_moe", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, input=stdin, timeout=120)


# ---------------------------------------------------------------- exit codes and usage errors


@pytest.mark.parametrize("args, suggestion", [
    (["chta"], "did you mean 'chat'?"),
    (["generate", "hi", "--max-new-token", "3"], "did you mean '--max-new-tokens'?"),   # no prefix matching
    (["generate", "hi", "--temprature", "0"], "did you mean '--temperature'?"),
    (["bench", "--tokenz", "3"], "did you mean '--tokens'?"),
    (["generate"], "PROMPT"),
])
def test_usage_errors_exit_2_with_one_line_and_a_suggestion(args, suggestion, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and suggestion in err and "--help" in err
    assert "usage:" not in err                                        # not the whole usage


def test_exit_codes_0_and_1_and_the_documentation(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    help_text = " ".join(build_parser().format_help().split())
    assert "2 a usage error" in help_text and "1 an error in the input" in help_text
    readme = (ROOT / "README.md").read_text()
    assert "exit status 2" in readme and "exit status 1" in readme


def all_parsers():
    root = build_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices.items())


@pytest.mark.parametrize("command, parser", all_parsers(), ids=[name for name, _ in all_parsers()])
def test_every_option_says_what_it_does_and_its_default(command, parser):
    assert parser.allow_abbrev is False
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help is not argparse.SUPPRESS, f"{command} {name}: no help"
        takes_value = action.option_strings and action.nargs != 0
        if takes_value:
            assert "default" in action.help.lower(), f"{command} {name}: help gives no default: {action.help!r}"


# ---------------------------------------------------------------- styling and widths


def test_no_styling_when_piped_or_with_no_color():
    for env in ({}, {"NO_COLOR": "1"}):
        out = cli("info", DEMO, env=env)
        assert out.returncode == 0 and "architecture" in out.stdout
        assert not SGR.search(out.stdout + out.stderr)


def test_no_color_in_a_terminal_has_no_escapes_at_all():
    pexpect = pytest.importorskip("pexpect")
    for args in (["info", str(DEMO)], ["plan", str(DEMO / "config.json"), "--profile", "cpu"]):
        child = pexpect.spawn(sys.executable, ["-m", "offload_moe", *args], env={**ENV, "NO_COLOR": "1", "TERM": "xterm"},
                              encoding="utf-8", timeout=60, dimensions=(40, 120))
        child.expect(pexpect.EOF)
        out = child.before
        child.close()
        assert child.exitstatus == 0, out
        assert "│" in out and not SGR.search(out), args   # a table, unstyled
        child = pexpect.spawn(sys.executable, ["-m", "offload_moe", *args], env={**ENV, "TERM": "xterm"},
                              encoding="utf-8", timeout=60, dimensions=(40, 120))
        child.expect(pexpect.EOF)
        child.close()
        assert SGR.search(child.before), "without NO_COLOR a terminal does get styling (the test can fail)"


@pytest.mark.parametrize("width", [80, 120])
def test_tables_fit_80_and_120_columns(width):
    for args in (["info", DEMO], ["plan", ROOT / "tests" / "data" / "qwen3-30b-a3b-config.json", "--profile", "12gb"]):
        out = cli(*args, env={"COLUMNS": str(width)})
        assert out.returncode == 0, out.stderr
        table = [line for line in out.stdout.splitlines() if line[:1] in "┌│├└"]
        assert table and max(len(line) for line in table) <= width


@pytest.mark.parametrize("width", [80, 120])
def test_bench_tables_fit_and_keep_row_names_whole(width):
    from offload_moe.bench import BenchOptions, run_bench
    from offload_moe.cli.bench import results_tables
    from offload_moe.checkpoints.synthetic import SyntheticCheckpoint

    result = run_bench(SyntheticCheckpoint("mixtral-8x7b", layers=1, scale=0.05),
                       BenchOptions(tokens=3, prompt_tokens=2, repeats=1), device="cpu")
    console = Console(width=width, record=True, color_system=None)
    for table in results_tables(result):
        console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= width
    for name in ("engine", "resident", "on demand", "LRU", "accelerate"):
        assert sum(line.lstrip().startswith(name) for line in lines) == (1 if name == "accelerate" else 2), name


# ---------------------------------------------------------------- what a command accepts


def test_info_accepts_a_config_file_as_plan_does():
    out = cli("info", DEMO / "config.json")
    assert out.returncode == 0 and "mixtral (4 layers, 8 experts, top-2)" in out.stdout
    assert "not read" in out.stdout


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["bench"], ["tune"], ["serve"]])
def test_a_file_given_as_model_is_named_as_such(command):
    out = cli(*command, "--model", ROOT / "README.md", stdin="")
    assert out.returncode == 1
    assert "--model" in out.stderr and "README.md: a file, not a checkpoint directory" in out.stderr


# ---------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny-gen"))


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load(tiny, device="cpu")


def generate(capsys, *args) -> tuple[str, str]:
    assert main(["generate", *map(str, args)]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_generate_chat_and_system_apply_the_template(tiny, tiny_model, capsys):
    base = ["--model", tiny, "--device", "cpu", "--temperature", 0, "--max-new-tokens", 12]
    messages = [{"role": "user", "content": "Hello there"}]
    out, _ = generate(capsys, "Hello there", "--chat", *base)
    assert out == tiny_model.chat(messages, temperature=0, max_new_tokens=12).text + "\n"
    out, _ = generate(capsys, "Hello there", "--system", "Be brief.", *base)
    expected = tiny_model.chat([{"role": "system", "content": "Be brief."}] + messages, temperature=0,
                               max_new_tokens=12).text
    assert out == expected + "\n"
    raw, _ = generate(capsys, "Hello there", *base)
    assert raw != out                                                # the template made a difference


def test_generate_stop_strings_repeatable(tiny, tiny_model, capsys):
    base = ["--model", tiny, "--device", "cpu", "--temperature", 0, "--max-new-tokens", 30, "--ignore-eos"]
    full = tiny_model.generate("To be, or not", temperature=0, max_new_tokens=30, ignore_eos=True).text
    assert len(full) > 12
    first, second = full[8:10], full[4:6]
    out, _ = generate(capsys, "To be, or not", *base, "--stop", first, "--stop", second)
    cut = min(i for i in (full.find(first), full.find(second)) if i >= 0)
    assert out == full[:cut] + "\n" and cut < len(full)


def test_generate_ignore_eos(tiny, tiny_model, capsys, monkeypatch):
    ids = tiny_model.generate("The quick brown", temperature=0, max_new_tokens=10, ignore_eos=True).token_ids
    real_load = common.load

    def load_with_eos(*args, **kwargs):   # the 4th greedy token plays end-of-sequence
        model = real_load(*args, **kwargs)
        model.eos_ids = frozenset({ids[3]})
        return model

    monkeypatch.setattr(common, "load", load_with_eos)
    base = ["--model", tiny, "--device", "cpu", "--temperature", 0, "--max-new-tokens", 10]
    stopped, _ = generate(capsys, "The quick brown", *base)
    kept, _ = generate(capsys, "The quick brown", *base, "--ignore-eos")
    decode = tiny_model.tokenizer.decode
    assert stopped == decode(ids[:ids.index(ids[3])]) + "\n"
    assert kept == decode(ids) + "\n"


def test_generate_says_when_the_context_ended_it(tiny, capsys):
    out, err = generate(capsys, "To be, or not to be", "--model", tiny, "--device", "cpu", "--temperature", 0,
                        "--context-length", 16, "--max-new-tokens", 100, "--ignore-eos")
    assert "the context of 16 tokens is full" in err and out.strip()
    _, err = generate(capsys, "To be", "--model", tiny, "--device", "cpu", "--max-new-tokens", 3, "--ignore-eos")
    assert "context" not in err


def test_seed_minus_one_is_a_random_seed_reported_for_a_rerun(tiny, capsys):
    """As llama.cpp: --seed -1 draws a seed and says which, and that seed repeats the run."""
    base = ["To be", "--model", tiny, "--device", "cpu", "--temperature", 1.5, "--max-new-tokens", 12, "--ignore-eos"]
    runs = [generate(capsys, *base, "--seed", -1) for _ in range(2)]
    seeds = [int(re.search(r"offload-moe: seed (\d+) \(--seed \1 repeats this run\)", err).group(1)) for _, err in runs]
    assert seeds[0] != seeds[1] and -1 not in seeds
    for (out, _), seed in zip(runs, seeds):
        again, err = generate(capsys, *base, "--seed", seed)
        assert again == out and "seed" not in err
    fixed = [generate(capsys, *base, "--seed", 5)[0] for _ in range(2)]
    assert fixed[0] == fixed[1] != generate(capsys, *base, "--seed", 6)[0]


# ---------------------------------------------------------------- what a newcomer tripped over (#31)


def test_info_without_a_path_describes_the_demo_as_every_command_defaults_to_it(capsys):
    assert main(["info"]) == 0
    assert "mixtral (4 layers, 8 experts, top-2)" in capsys.readouterr().out


def test_generate_stats_say_where_resident_experts_are(capsys):
    _, err = generate(capsys, "To be", "--device", "cpu", "--max-new-tokens", 3, "--seed", 0, "--stats")
    assert re.search(r"│ experts\s+│\s+all in RAM, computed by the CPU: no", err), err
    _, err = generate(capsys, "To be", "--device", "cpu", "--max-new-tokens", 3, "--seed", 0, "--stats",
                      "--cache-slots", 2)
    assert "experts.hits" in err and "no cache" not in err


def test_the_context_full_note_names_what_makes_room(tiny, capsys):
    _, err = generate(capsys, "To be", "--device", "cpu", "--max-new-tokens", 400, "--ignore-eos", "--seed", 0)
    assert "256 is the model's limit: --context-length N --force-context goes past it" in " ".join(err.split())
    _, err = generate(capsys, "To be", "--device", "cpu", "--max-new-tokens", 400, "--ignore-eos", "--seed", 0,
                      "--context-length", 16)
    assert "--context-length up to 256, the model's limit, makes room for more" in " ".join(err.split())


def test_the_chat_banner_speaks_words_not_setting_names():
    from offload_moe.cli.chat import describe_model

    line = describe_model(load(DEMO, device="cpu"))
    assert "all experts on the CPU" in line
    assert "cpu experts" not in line and "cpu layers" not in line and "experts cpu" not in line


def test_nf4_experts_on_a_quantized_gguf_names_its_types(tmp_path):
    from gguf_fixtures import T, write_gguf

    path = write_gguf(DEMO, tmp_path / "demo-q8_0.gguf", experts=T.Q8_0, attention=T.Q8_0)
    out = cli("generate", "hi", "--model", path, "--nf4-experts", "--max-new-tokens", 2)
    assert out.returncode == 1 and "quantization_config" not in out.stderr
    assert "its tensor types are F32, Q8_0; an F32, F16 or BF16 GGUF is a float one" in out.stderr
