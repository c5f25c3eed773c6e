"""The bad-input table: every bad input we know of, one row each, and what it must get.

Command lines, the Python API and the server. A command line must exit non-zero with exactly one
error line on stderr, `offload-moe: error: ...` (the last line; chat prints a summary of the model
it loaded before it renders a template), naming the file, key or value (the row's `needles`), and
no traceback, hang or memory blow-up (all command-line rows run in one subprocess, `bad_input_runner`,
with an address-space cap and a per-case alarm). An API call must raise `OffloadMoeError` with a
one-line message holding the needles. A server request must get the row's 4xx, with the needles
in the message and no absolute path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe import Placement

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "offload_moe" / "demo"
PROMPT = "ROMEO. What light"


# ---------------------------------------------------------------- building broken inputs


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def demo_copy(root: Path, name: str, *, weights: str = "link") -> Path:
    """A copy of the demo checkpoint whose files are symlinks (cheap) unless replaced."""
    d = root / name
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / f, d / f)
    if weights == "link":
        (d / "model.safetensors").symlink_to(DEMO / "model.safetensors")
    return d


def edit_json(file: Path, **changes):
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


def with_header(root, name, header, data=b""):
    d = demo_copy(root, name, weights="none")
    (d / "model.safetensors").write_bytes(safetensors_bytes(header, data))
    return d


def sharded(root, name, weight_map_text: str | bytes):
    d = demo_copy(root, name, weights="none")
    (d / "model-00001-of-00001.safetensors").symlink_to(DEMO / "model.safetensors")
    data = weight_map_text if isinstance(weight_map_text, bytes) else weight_map_text.encode()
    (d / "model.safetensors.index.json").write_bytes(data)
    return d


def poisoned(root, name, value: float, tensor="model.layers.2.self_attn.o_proj.weight"):
    d = demo_copy(root, name, weights="none")
    weights = load_file(DEMO / "model.safetensors")
    weights[tensor][3, 5] = value
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


def with_template(root, name, template):
    d = demo_copy(root, name)
    edit_json(d / "tokenizer_config.json", chat_template=template)
    return d


def one_weight_map(name: str) -> str:
    return json.dumps({"weight_map": {"model.embed_tokens.weight": name}})


F32_8 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# ---------------------------------------------------------------- the command-line rows
# (id, builder(root) -> argv (with "{d}" for the built directory) and stdin, needles)

def cli_rows(root: Path, tiny: Path):
    def header(name, h, data=b"\0" * 16):
        return lambda: (["info", str(with_header(root, name, h, data))], "")

    def config(name, **changes):
        def build():
            d = demo_copy(root, name)
            edit_json(d / "config.json", **changes)
            return ["info", str(d)], ""
        return build

    def gen(*args, model=None, stdin=""):
        return lambda: (["generate", *args, "--max-new-tokens", "4", "--device", "cpu",
                         *(["--model", str(model() if callable(model) else model)] if model else [])], stdin)

    def chat_with(name, template):
        return lambda: (["chat", "--model", str(with_template(root, name, template)), "--max-new-tokens", "2",
                         "--temperature", "0", "--device", "cpu"], "Speak.\n")

    def special(kind):
        def build():
            d = demo_copy(root, f"special-{kind}", weights="none" if kind.startswith("shard") else "link")
            target = d / ("model.safetensors" if kind.startswith("shard") else "config.json")
            if target.exists():
                target.unlink()
            if kind.endswith("dir"):
                target.mkdir()
            else:
                os.mkfifo(target)
            return ["info", str(d)], ""
        return build

    def tokenizer_bigger_than_model():
        d = root / "tiny-with-demo-tokenizer"
        shutil.copytree(tiny, d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO / f, d / f)
        return d

    def non_utf8_tokenizer_config():
        d = demo_copy(root, "tokcfg-latin1")
        (d / "tokenizer_config.json").write_bytes(b'{"bos_token": "\xe9"}')
        return d

    def big_profile():
        f = root / "huge.toml"
        f.write_text((ROOT / "profiles" / "cpu.toml").read_text().replace("context_length = 4096",
                                                                          "context_length = " + "9" * 400))
        return ["plan", str(DEMO), "--profile", str(f)], ""

    def bench_json_exists():
        out = root / "bench-existing.json"
        out.write_text("mine\n")
        return ["bench", "--json", str(out), "--tokens", "4", "--device", "cpu"], ""

    def empty_file():
        (root / "empty-key").write_text("\n")
        return root / "empty-key"

    def huge_array_gguf():  # issue 28, point 1: 118 bytes that claimed 2**60 items
        f = root / "h.gguf"
        if not f.exists():
            s = lambda b: struct.pack('<Q', len(b)) + b  # noqa: E731 - the reproducer, verbatim
            f.write_bytes(b'GGUF' + struct.pack('<IQQ', 3, 0, 2) + s(b'general.architecture') + struct.pack('<I', 8)
                          + s(b'llama') + s(b'tokenizer.ggml.token_type') + struct.pack('<IIQ', 9, 5, 2**60))
        return f

    def huge(command):
        def build():
            f = str(huge_array_gguf())
            argv = {"info": ["info", f], "plan": ["plan", f, "--profile", "cpu"],
                    "generate": ["generate", "x", "--model", f, "--device", "cpu"],
                    "chat": ["chat", "--model", f, "--device", "cpu"],
                    "serve": ["serve", "--model", f, "--port", "0", "--device", "cpu"]}[command]
            return argv, "Speak.\n" if command == "chat" else ""
        return build

    def gguf_with(name, key, value, command="generate"):
        def build():
            from fuzz_gguf import rewrite_metadata, tiny_gguf

            f = root / f"{name}.gguf"
            f.write_bytes(rewrite_metadata(tiny_gguf("gpt2"), key, value))
            if command == "info":
                return ["info", str(f)], ""
            return ["generate", "ab", "--model", str(f), "--device", "cpu", "--max-new-tokens", "1"], ""
        return build

    def nines_profile():
        f = root / "nines.toml"
        f.write_text((ROOT / "profiles" / "cpu.toml").read_text().replace("vram_budget = 0",
                                                                          f'vram_budget = "{"9" * 400}GB"'))
        return ["plan", str(DEMO), "--profile", str(f)], ""

    deep = b'{"a": ' + b'[' * 100000 + b']' * 100000 + b'}'
    return [
        # ---- point 4: safetensors headers of the wrong shape
        ("header is a list", header("h-list", []), ["model.safetensors", "JSON list"]),
        ("header entry is an int", header("h-int", {"a": 5}), ["model.safetensors", "'a'", "int"]),
        ("data_offsets missing", header("h-nooff", {"a": {"dtype": "F32", "shape": [2]}}),
         ["model.safetensors", "'a'", "data_offsets"]),
        ("data_offsets a string", header("h-stroff", {"a": {"dtype": "F32", "shape": [2], "data_offsets": "0,8"}}),
         ["model.safetensors", "data_offsets '0,8'"]),
        ("header nested 100000 deep", lambda: (["info", str(with_header(root, "h-deep", deep))], ""),
         ["model.safetensors", "not UTF-8 JSON"]),
        ("header not UTF-8", lambda: (["info", str(with_header(root, "h-latin1", b'{"\xe9": 1}'))], ""),
         ["model.safetensors", "not UTF-8 JSON"]),
        ("offsets overlap", header("h-overlap", {"a": F32_8, "b": {**F32_8, "data_offsets": [4, 12]}}),
         ["model.safetensors", "'b'", "overlapping"]),
        ("offsets reversed", header("h-reversed", {"a": {**F32_8, "data_offsets": [8, 0]}}),
         ["model.safetensors", "'a'", "[8, 0]"]),
        ("offsets negative", header("h-negative", {"a": {**F32_8, "data_offsets": [-8, 0]}}),
         ["model.safetensors", "'a'", "[-8, 0]"]),
        ("dtype disagrees with byte length", header("h-dtype", {"a": {"dtype": "F32", "shape": [4],
                                                                      "data_offsets": [0, 8]}}),
         ["model.safetensors", "'a'", "needs 16"]),
        ("unknown dtype", header("h-unknown", {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}),
         ["model.safetensors", "'Q4'"]),
        ("bytes after the last tensor", header("h-trailing", {"a": F32_8}, b"\0" * 12),
         ["model.safetensors", "after the last tensor"]),
        # ---- point 4: the wrong kind of file
        ("shard is a directory", special("shard-dir"), ["model.safetensors", "a directory"]),
        ("shard is a FIFO", special("shard-fifo"), ["model.safetensors", "not a regular file"]),
        ("config.json is a directory", special("config-dir"), ["config.json", "a directory"]),
        ("config.json is a FIFO", special("config-fifo"), ["config.json", "not a regular file"]),
        ("index not UTF-8", lambda: (["info", str(sharded(root, "idx-latin1", b'{"weight_map": {"\xe9": 1}}'))], ""),
         ["model.safetensors.index.json", "UTF-8"]),
        ("weight_map a list", lambda: (["info", str(sharded(root, "idx-list", '{"weight_map": ["a"]}'))], ""),
         ["model.safetensors.index.json", "weight_map"]),
        ("weight_map value not a string", lambda: (["info", str(sharded(root, "idx-int",
                                                                          '{"weight_map": {"a": 3}}'))], ""),
         ["model.safetensors.index.json", "weight_map['a'] = 3"]),
        # ---- point 7: shard names outside the checkpoint
        ("absolute shard name", lambda: (["info", str(sharded(root, "idx-abs", one_weight_map("/etc/passwd")))], ""),
         ["model.safetensors.index.json", "'/etc/passwd'", "plain file name"]),
        ("../ shard name", lambda: (["info", str(sharded(root, "idx-up", one_weight_map("../model.safetensors")))],
                                    ""),
         ["model.safetensors.index.json", "'../model.safetensors'", "plain file name"]),
        # ---- point 2: config values that would size loops and tables
        ("num_hidden_layers 10**9", config("c-layers", num_hidden_layers=10**9),
         ["config.json", "num_hidden_layers", "1000000000"]),
        ("num_hidden_layers more than present", config("c-layers8", num_hidden_layers=8),
         ["config.json", "num_hidden_layers = 8", "4 layers"]),
        ("num_local_experts 10**8", config("c-experts", num_local_experts=10**8),
         ["config.json", "num_local_experts", "100000000"]),
        ("num_local_experts more than present", config("c-experts16", num_local_experts=16),
         ["config.json", "16 experts", "have 8"]),
        # ---- point 3: non-finite config floats
        ("rms_norm_eps NaN", config("c-eps", rms_norm_eps=math.nan), ["config.json", "rms_norm_eps", "nan"]),
        ("rope_theta NaN", config("c-theta", rope_theta=math.nan), ["config.json", "rope_theta", "nan"]),
        ("rope_theta Infinity", config("c-theta-inf", rope_theta=math.inf), ["config.json", "rope_theta", "inf"]),
        # ---- point 2: sizes before memory
        ("--context-length 1000000", gen(PROMPT, "--context-length", "1000000"),
         ["context_length = 1000000", "max_position_embeddings = 256", "--force-context"]),
        ("--context-length 100000000 --force-context", gen(PROMPT, "--context-length", "100000000",
                                                           "--force-context"),
         ["context_length = 100000000", "KV cache"]),
        ("chat template 'x' * 10**9", chat_with("t-huge", "{{ 'x' * 1000000000 }}"),
         ["tokenizer_config.json", "stopped by the sandbox"]),
        # ---- point 3: NaN and Inf weights
        ("NaN weight, greedy", gen(PROMPT, "--temperature", "0", model=lambda: poisoned(root, "w-nan", math.nan)),
         ["layer 2", "model.layers.2.self_attn.o_proj.weight"]),
        ("NaN weight, sampling", gen(PROMPT, "--temperature", "0.8", "--seed", "1",
                                     model=lambda: poisoned(root, "w-nan2", math.nan)),
         ["layer 2", "model.layers.2.self_attn.o_proj.weight"]),
        ("Inf weight", gen(PROMPT, "--temperature", "0",
                           model=lambda: poisoned(root, "w-inf", math.inf, "model.layers.1.self_attn.q_proj.weight")),
         ["layer 1", "model.layers.1.self_attn"]),
        # ---- point 4: tokenizer and templates
        ("tokenizer ids beyond the vocabulary", gen(PROMPT, model=tokenizer_bigger_than_model),
         ["tokenizer.json", "outside the model's vocabulary of 96"]),
        ("tokenizer_config not UTF-8", gen(PROMPT, model=non_utf8_tokenizer_config),
         ["tokenizer_config.json", "UTF-8"]),
        ("template does not parse", chat_with("t-syntax", "{% for %}"), ["tokenizer_config.json", "does not parse"]),
        ("template undefined variable", chat_with("t-undef", "{{ nothing.here }}"),
         ["tokenizer_config.json", "'nothing' is undefined"]),
        ("template escapes the sandbox", chat_with("t-sandbox", "{{ messages.__class__.__mro__ }}"),
         ["tokenizer_config.json", "unsafe"]),
        # ---- point 4: arguments
        ("--temperature nan", gen(PROMPT, "--temperature", "nan"), ["temperature = nan"]),
        ("--top-p inf", gen(PROMPT, "--top-p", "inf"), ["top_p = inf"]),
        ("--seed 10**30", gen(PROMPT, "--seed", str(10**30)), ["seed = 1000000000000000000000000000000"]),
        ("prompt on stdin not UTF-8", gen("-", stdin="ROMEO\xff\xfe"), ["stdin", "byte 5", "UTF-8"]),
        ("400-digit number in a profile", big_profile, ["context_length", "huge.toml"]),
        # ---- point 6: the server's key
        ("--api-key-file missing", lambda: (["serve", "--api-key-file", str(root / "no-such-key"), "--port", "0"], ""),
         ["no-such-key", "API key file not found"]),
        ("--api-key-file empty", lambda: (["serve", "--api-key-file", str(empty_file()), "--port", "0"], ""),
         ["empty-key", "empty"]),
        # ---- point 5: overwrites
        ("bench --json onto an existing file", bench_json_exists, ["bench-existing.json", "already exists", "--force"]),
        # ---- issue 28 (each within 10 s and 1 GB: ISSUE_28 below)
        # point 1: a GGUF count beyond the file, in every command that opens it
        *[(f"118-byte GGUF, {c}", huge(c), ["h.gguf", "'tokenizer.ggml.token_type'", "1,152,921,504,606,846,976", "bytes left"])
          for c in ("info", "plan", "generate", "chat", "serve")],
        # point 2: metadata of the wrong type or inconsistent length
        ("GGUF embedding_length a string", gguf_with("g-embd", "llama.embedding_length", "32", "info"),
         ["g-embd.gguf", "'llama.embedding_length'", "a str ('32')", "expected a non-negative integer"]),
        ("GGUF token_type shorter than the tokens", gguf_with("g-types", "tokenizer.ggml.token_type", [1, 1, 1]),
         ["g-types.gguf", "tokenizer.ggml.token_type has 3 entries", "one per token (16"]),
        ("GGUF token_type a bool", gguf_with("g-typebool", "tokenizer.ggml.token_type", True),
         ["g-typebool.gguf", "'tokenizer.ggml.token_type'", "a bool", "expected a list of integers"]),
        ("GGUF merges an int", gguf_with("g-merges", "tokenizer.ggml.merges", 5),
         ["g-merges.gguf", "'tokenizer.ggml.merges'", "expected a list of strings"]),
        ("GGUF merge naming an unknown token", gguf_with("g-merge-unk", "tokenizer.ggml.merges", ["a b", "a zz"]),
         ["g-merge-unk.gguf", "tokenizer.ggml.merges[1] = 'a zz'", "two tokens of the vocabulary"]),
        ("GGUF pre a list", gguf_with("g-pre", "tokenizer.ggml.pre", ["gpt-2"]),
         ["g-pre.gguf", "'tokenizer.ggml.pre'", "expected a string"]),
        ("GGUF chat_template an array", gguf_with("g-tpl", "tokenizer.chat_template", ["{{ x }}"]),
         ["g-tpl.gguf", "'tokenizer.chat_template'", "expected a string"]),
        # point 3: templates that spin or fill memory
        *[(f"template {name}", chat_with(f"t28-{i}", template), ["tokenizer_config.json", "stopped by the sandbox"])
          for i, (name, template) in enumerate([
              ("nested range(99999) loops",
               "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"),
              ("lipsum(n=1000000)", "{{ lipsum(n=1000000) }}"),
              ("center(3e9)", "{{ 'a'|center(3e9) }}"),
              ("center(3e8)", "{{ 'a'|center(300000000) }}"),
              ("indent(2e9)", "{{ messages[0]['content']|indent(2e9) }}"),
              ("'%03000000000d'|format(1)", "{{ '%03000000000d'|format(1) }}"),
              ("wordwrap(1) on 20 MB", "{{ ('ab ' * 7000000)|wordwrap(1) }}"),
              ("big-integer squaring", "{% set ns = namespace(x=2**64) %}{% for i in range(64) %}"
                                       "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}"),
          ])],
        # point 5: allocation failures under an address-space limit (ulimit -v)
        ("KV cache under ulimit -v", gen(PROMPT, "--context-length", "2000000", "--force-context"),
         ["KV cache", "GB"]),
        # point 8: sizes too large for a float
        ("--ram-budget of 400 nines GB", gen(PROMPT, "--cache-slots", "2", "--ram-budget", "9" * 400 + "GB"),
         ["ram_budget", "below 2**63 bytes"]),
        ("profile vram_budget of 400 nines GB", nines_profile, ["nines.toml", "vram_budget", "below 2**63 bytes"]),
    ]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("bad-input")
    rows = cli_rows(root, Path(tiny_checkpoint[0]))
    cases = []
    for case_id, build, _ in rows:
        argv, stdin = build()
        cases.append({"argv": argv, "stdin": stdin, **CASE_OPTIONS.get(case_id, {})})
    # CPU only: the runner caps its address space, which CUDA's initialisation would exceed
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(root), "NO_COLOR": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "bad_input_runner.py")],
                          input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return {row[0]: (case, result) for row, case, result in zip(rows, cases, json.loads(done.stdout))}


CLI_IDS = [row[0] for row in cli_rows(Path("/nonexistent"), Path("/nonexistent"))]
NEEDLES = {row[0]: row[2] for row in cli_rows(Path("/nonexistent"), Path("/nonexistent"))}
# issue 28's reproducers: each must end within 10 s (the case's alarm) and 1 GB more resident memory
ISSUE_28 = CLI_IDS[CLI_IDS.index("118-byte GGUF, info"):]
CASE_OPTIONS = {case: {"timeout": 10} for case in ISSUE_28}
CASE_OPTIONS["KV cache under ulimit -v"]["address_space"] = 2 * 2**30


@pytest.mark.parametrize("case", CLI_IDS)
def test_command_line(cli_results, case):
    argv, result = cli_results[case]
    assert result["escaped"] is None, f"{argv}: escaped main(): {result['escaped']}"
    assert result["rc"] not in (0, -1), f"{argv}: exit status {result['rc']}"
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    # one error line, the last thing said (chat may have printed its one-line summary of the model before)
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("offload-moe: error: "), \
        result["stderr"]
    assert "Traceback" not in result["stderr"]
    for needle in NEEDLES[case]:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"
    if case in ISSUE_28:  # the alarm above ends a case at 10 s; memory is measured
        assert result["added_mb"] < 1024, f"{argv}: {result['added_mb']:.0f} MB more resident memory"


# ---------------------------------------------------------------- the Python API rows


def raises_one_line(call, *needles):
    with pytest.raises(OffloadMoeError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def demo_model():
    return offload_moe.load(device="cpu")


@pytest.mark.parametrize("kwargs, needles", [
    (dict(stop=""), ["stop = ''", "empty stop string"]),
    (dict(stop=["ok", ""]), ["stop = ''"]),
    (dict(stop=[3]), ["stop = [3]"]),
    (dict(temperature=math.nan), ["temperature = nan"]),
    (dict(temperature=math.inf), ["temperature = inf"]),
    (dict(top_p=math.nan), ["top_p = nan"]),
    (dict(seed=10**30), ["seed = 1000000000000000000000000000000"]),
    (dict(seed=True), ["seed = True"]),
    (dict(max_new_tokens=1.5), ["max_new_tokens = 1.5"]),
], ids=["stop empty", "stop list with empty", "stop not a string", "temperature NaN", "temperature Inf",
        "top_p NaN", "seed 10**30", "seed bool", "max_new_tokens float"])
def test_generation_arguments(demo_model, kwargs, needles):
    raises_one_line(lambda: demo_model.generate(PROMPT, **kwargs), *needles)


@pytest.mark.parametrize("template", [
    "{{ 'x' * 1000000000 }}",
    "{{ 2 ** 100000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 'x'.ljust(10000000000) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
], ids=["repeat", "power", "concat doubling", "plus doubling", "ljust", "nested loops"])
def test_runaway_chat_templates(tmp_path, template):
    from offload_moe.generation.text import Tokenizer

    d = with_template(tmp_path, "t", template)
    raises_one_line(lambda: Tokenizer(d).render_chat([{"role": "user", "content": "hi"}]),
                    "tokenizer_config.json", "stopped by the sandbox")


def test_lone_surrogate_prompt(demo_model):
    raises_one_line(lambda: demo_model.generate("a\ud800b"), "lone surrogate", "character 1")


def test_save_refuses_to_overwrite(demo_model, tmp_path):
    from offload_moe.api.chat_session import ChatSession

    existing = tmp_path / "mine.json"
    existing.write_text("mine\n")
    session = ChatSession(demo_model)
    raises_one_line(lambda: session.save(existing), "mine.json", "already exists", "--force")
    assert existing.read_text() == "mine\n"
    session.save(existing, force=True)
    assert json.loads(existing.read_text())["format"].startswith("offload-moe-chat-transcript")


@pytest.mark.parametrize("damage", ["truncate", "truncate_and_regrow_same_mtime"])
def test_disk_tier_file_damaged_while_running(tiny_checkpoint, tmp_path, damage):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=1, offload="disk", offload_dir=tmp_path),
                             device="cpu")
    victim = Path(model.settings.offload_dir) / "layer-002.experts"
    st = victim.stat()
    with open(victim, "r+b") as f:
        f.truncate(st.st_size // 3)
        if damage != "truncate":
            f.truncate(st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    raises_one_line(lambda: model.generate([1, 5, 9, 12], max_new_tokens=8, temperature=0),
                    "layer-002.experts", "truncated" if damage == "truncate" else "changed after it was written")


def test_disk_tier_full_disk(tiny_checkpoint, tmp_path, monkeypatch):
    from offload_moe.experts import disk_dir

    real_write, written = os.write, []

    def write(fd, data):  # the second layer file meets a full disk
        written.append(fd)
        if len(written) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(disk_dir.os, "write", write)
    message = raises_one_line(lambda: offload_moe.load(tiny_checkpoint[0],
                                                       Placement(cache_slots=1, offload="disk", offload_dir=tmp_path),
                                                       device="cpu"),
                              "disk full", "needs")
    assert "MB" in message or "GB" in message
    assert list(tmp_path.iterdir()) == []  # nothing of ours left, partial or whole


def test_disk_tier_not_enough_free_space(tiny_checkpoint, tmp_path, monkeypatch):
    from offload_moe.experts import disk_dir

    monkeypatch.setattr(disk_dir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    raises_one_line(lambda: offload_moe.load(tiny_checkpoint[0],
                                             Placement(cache_slots=1, offload="disk", offload_dir=tmp_path),
                                             device="cpu"), "needs", "only 0.00 MB is free")
    assert list(tmp_path.iterdir()) == []


def test_ram_tier_larger_than_available_ram(tiny_checkpoint, monkeypatch):
    import offload_moe.base.runtime

    monkeypatch.setattr(offload_moe.base.runtime, "available_ram", lambda: 100_000)  # above the KV cache, below the RAM tier
    raises_one_line(lambda: offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=1, offload="ram"),
                                             device="cpu"),
                    "RAM tier", "only 0.1 MB is available", "--ram-budget")


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-300), dict(top_p=1e-45), dict(repetition_penalty=1e-40),
                                    dict(temperature=1e-300, repetition_penalty=1e-40, top_p=1e-45)],
                         ids=["temperature 1e-300", "top_p 1e-45", "repetition_penalty 1e-40", "all three"])
def test_tiny_sampling_values_are_not_a_crash(demo_model, kwargs):
    """Issue 28, point 4: below 1e-5 a temperature is greedy (documented in `Sampling`); tiny top_p
    and repetition_penalty stay finite in float32. The tokens equal greedy decoding's where greedy."""
    out = demo_model.generate(PROMPT, max_new_tokens=6, seed=0, ignore_eos=True, **kwargs)
    assert len(out.token_ids) == 6
    if "temperature" in kwargs and "repetition_penalty" not in kwargs:
        assert out.token_ids == demo_model.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids


def test_tiny_temperature_on_the_command_line(capsys):
    from offload_moe.cli.main import main

    assert main(["generate", PROMPT, "--temperature", "1e-300", "--repetition-penalty", "1e-40", "--top-p", "1e-45",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0


def test_kv_cache_refused_inside_a_memory_cgroup(tmp_path, monkeypatch):
    """Issue 28, point 5: in a 700 MB cgroup a 1 GB KV cache is one line, not the OOM killer."""
    import functools

    import offload_moe.base.runtime

    (tmp_path / "cgroup").write_text("0::/box\n")
    box = tmp_path / "fs" / "box"
    box.mkdir(parents=True)
    (box / "memory.max").write_text(f"{700 * 10**6}\n")
    (box / "memory.current").write_text(f"{100 * 10**6}\n")
    real = offload_moe.base.runtime.available_ram
    monkeypatch.setattr(offload_moe.base.runtime, "available_ram", functools.partial(
        real, self_cgroup=tmp_path / "cgroup", cgroup_root=tmp_path / "fs"))
    assert offload_moe.base.runtime.available_ram() == 600 * 10**6
    raises_one_line(lambda: offload_moe.load(placement=Placement(context_length=400_000, force_context=True),
                                             device="cpu"),
                    "context_length = 400000", "KV cache of 1.02 GB", "0.60 GB of available RAM")


def test_kv_cache_allocation_failure_is_named(monkeypatch):
    """What torch's CPU allocator raises when a limit the checks cannot see stops it: one line."""
    from offload_moe.model import attention

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 640000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(attention.torch, "zeros", refuse)
    raises_one_line(lambda: offload_moe.load(device="cpu"), "KV cache", "cannot be allocated", "--context-length")


def test_refused_disk_tier_leaves_no_offload_dir_it_made(tiny_checkpoint, tmp_path, monkeypatch):
    """Issue 28, point 7: the free-space check refuses; the directories it created are gone."""
    from offload_moe.experts import disk_dir

    monkeypatch.setattr(disk_dir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(8 * 10**6, 8 * 10**6, 1000))
    raises_one_line(lambda: offload_moe.load(tiny_checkpoint[0],
                                             Placement(cache_slots=1, offload="disk", offload_dir=tmp_path / "made" / "here"),
                                             device="cpu"), "needs", "is free")
    assert list(tmp_path.iterdir()) == []


def _quantize(src, dst):
    from offload_moe.tools import convert

    return convert.quantize(src, dst, experts="int4", attention="bf16", group_size=16, method="rtn", device="cpu")


@pytest.mark.parametrize("where", ["hf_blobs", "elsewhere"])
def test_quantize_copies_linked_files_without_widening_modes(tiny_checkpoint, tmp_path, where):
    """Issue 28, point 6: a 0600 file linked into the checkpoint (from the Hugging Face cache's blobs/,
    or from anywhere else) is copied as a file, 0600 still, never 0644."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_checkpoint[0], snapshot)
    blob = repo / "blobs" / "0123abcd" if where == "hf_blobs" else tmp_path / "private" / "tokenizer_config.json"
    blob.parent.mkdir()
    blob.write_text('{"bos_token": "<s>"}')
    blob.chmod(0o600)
    (snapshot / "tokenizer_config.json").symlink_to(Path("../../blobs/0123abcd") if where == "hf_blobs" else blob)
    out = _quantize(snapshot, tmp_path / "q")
    copied = out / "tokenizer_config.json"
    assert not copied.is_symlink() and copied.read_text() == blob.read_text()
    assert copied.stat().st_mode & 0o777 == 0o600


def test_quantize_failure_removes_the_parents_it_made(tiny_checkpoint, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from offload_moe.tools import convert

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(StorageFull: No space left on device)")

    monkeypatch.setattr(convert, "save_file", full)
    raises_one_line(lambda: _quantize(tiny_checkpoint[0], tmp_path / "made" / "deeper" / "q"), "no space left")
    assert list(tmp_path.iterdir()) == []


def test_quantize_full_disk(tiny_checkpoint, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from offload_moe.tools import convert

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(convert, "save_file", full)
    raises_one_line(lambda: convert.quantize(tiny_checkpoint[0], tmp_path / "q", experts="int4", attention="bf16",
                                             group_size=16, device="cpu"),
                    "no space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the server rows

def needs_server_extra():
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A server on the demo model, one on a copy with a NaN weight, one with a broken template."""
    needs_server_extra()
    from serve_fixtures import running_server

    from offload_moe.server import create_app

    root = tmp_path_factory.mktemp("bad-input-server")
    bad_template = with_template(root, "t-undef", "{{ nothing.here }}")
    with running_server(create_app(offload_moe.load(device="cpu"), model_name="demo")) as good, \
            running_server(create_app(offload_moe.load(poisoned(root, "w-nan", math.nan), device="cpu"),
                                      model_name="nan")) as nan, \
            running_server(create_app(offload_moe.load(bad_template, device="cpu"), model_name="tpl")) as tpl:
        yield {"demo": good, "nan": nan, "tpl": tpl}


def post(base, path, body, headers=None):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw)


CHAT = {"model": "any", "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 4}
COMPLETION = {"model": "any", "prompt": PROMPT, "max_tokens": 4}


@pytest.mark.parametrize("server, path, body, headers, status, needles", [
    ("demo", "/v1/completions", b'{"model": "any", "prompt": "a\\ud800b", "max_tokens": 4}', None, 400,
     ["lone surrogate"]),
    ("demo", "/v1/completions", {**COMPLETION, "stop": ""}, None, 400, ["stop"]),
    ("demo", "/v1/completions", b'{"model": "any", "prompt": "a", "temperature": NaN}', None, 400,
     ["temperature"]),
    ("demo", "/v1/completions", json.dumps(COMPLETION).encode(), {"Content-Type": "text/plain"}, 415,
     ["Content-Type", "application/json"]),
    ("demo", "/v1/completions", COMPLETION, {"Origin": "http://evil.example"}, 403, ["http://evil.example"]),
    ("demo", "/v1/completions", COMPLETION, {"Host": "evil.example:8000"}, 421, ["evil.example"]),
    ("nan", "/v1/completions", {**COMPLETION, "temperature": 0}, None, 400, ["non-finite", "layer 2"]),
    ("nan", "/v1/chat/completions", {**CHAT, "temperature": 0.8}, None, 400, ["non-finite", "layer 2"]),
    ("tpl", "/v1/chat/completions", CHAT, None, 400, ["tokenizer_config.json", "'nothing' is undefined"]),
], ids=["lone surrogate", "empty stop", "temperature NaN", "text/plain body", "foreign Origin", "foreign Host",
        "NaN weights", "NaN weights, chat, sampling", "template error names no absolute path"])
def test_server(servers, server, path, body, headers, status, needles):
    got, reply = post(servers[server], path, body, headers)
    message = reply["error"]["message"]
    assert got == status, reply
    assert "\n" not in message and "/" + "tmp" not in message and str(ROOT) not in message, message
    for needle in needles:
        assert needle in message, message



def test_server_tiny_sampling_values_are_not_a_500(servers):
    """Issue 28, point 4: tiny temperature, top_p and repetition_penalty sample (as greedy where the
    temperature is below 1e-5) instead of a 500 from torch.multinomial."""
    body = {**COMPLETION, "temperature": 1e-300, "top_p": 1e-45, "repetition_penalty": 1e-40}
    status, reply = post(servers["demo"], "/v1/completions", body)
    assert status == 200, reply
    assert reply["choices"][0]["text"]


def test_server_accepts_its_own_and_allowed_origins(checkpoint_for_origins):
    needs_server_extra()
    from serve_fixtures import running_server

    from offload_moe.server import create_app

    app = create_app(checkpoint_for_origins, model_name="demo", allowed_origins=("https://app.example",))
    with running_server(app) as base:
        port = base.rsplit(":", 1)[1]
        for origin in (base, f"http://localhost:{port}", "https://app.example"):
            status, reply = post(base, "/v1/completions", {**COMPLETION, "max_tokens": 1}, {"Origin": origin})
            assert status == 200, (origin, reply)
        status, _ = post(base, "/v1/completions", COMPLETION, {"Origin": "https://app.example.evil"})
        assert status == 403


@pytest.fixture(scope="module")
def checkpoint_for_origins():
    return offload_moe.load(device="cpu")


def test_server_bug_is_a_generic_500(checkpoint_for_origins, monkeypatch):
    needs_server_extra()
    from serve_fixtures import running_server

    from offload_moe.server import endpoints as server_endpoints
    from offload_moe.server import create_app

    def broken(*args, **kwargs):
        raise RuntimeError(f"secret detail at {ROOT}")

    monkeypatch.setattr(server_endpoints, "completion_prompt", broken)
    with running_server(create_app(checkpoint_for_origins, model_name="demo")) as base:
        status, reply = post(base, "/v1/completions", COMPLETION)
    assert status == 500
    assert "secret" not in reply["error"]["message"] and "internal server error" in reply["error"]["message"]


def test_force_context_warns_and_runs(capsys):
    from offload_moe.cli.main import main

    assert main(["generate", PROMPT, "--context-length", "300", "--force-context", "--max-new-tokens", "2",
                 "--temperature", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "offload-moe: warning: context_length = 300 exceeds the model's max_position_embeddings = 256" in err
    model = offload_moe.load(placement=Placement(context_length=300, force_context=True), device="cpu")
    assert model.context_length == 300 and "--force-context" in model.settings.warning
