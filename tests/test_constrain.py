"""Constrained decoding (llguidance) and logit_bias through the Python API, on the bundled demo model:
sampled output always matches its JSON schema, regex or grammar; the oracle for the schema is the
`jsonschema` package, for the bias the model's own logits."""

from __future__ import annotations

import json
import re

import pytest
import torch

import offload_moe
from offload_moe.base.errors import OffloadMoeError

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "color", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}
# (every value bounded: an unbounded number lets a random model write digits until max_new_tokens)


@pytest.fixture(scope="module")
def demo():
    return offload_moe.load(None, device="cpu", threads=None)


def test_json_schema_output_validates_in_20_of_20_sampled_generations(demo):
    for seed in range(20):
        result = demo.generate("Once upon a time", json_schema=SCHEMA, temperature=1.0, seed=seed,
                               max_new_tokens=200)
        assert result.finish_reason == "stop", (seed, result.text)
        jsonschema.validate(json.loads(result.text), SCHEMA)


def test_json_object_and_schema_as_a_string(demo):
    result = demo.generate("The", json_schema=True, temperature=0.8, seed=1, max_new_tokens=150)
    if result.finish_reason == "stop":   # free-form JSON may run past max_new_tokens; when done it is an object
        assert isinstance(json.loads(result.text), dict)
    assert result.text.startswith("{")
    small = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["n"], "additionalProperties": False}
    assert re.fullmatch(r'\{"n":[1-9]\}', demo.generate("x", json_schema=json.dumps(small), seed=2).text)


def test_regex_and_lark_grammar(demo):
    for seed in range(5):
        text = demo.generate("Today", regex=r"[0-9]{2}-[a-z]{3}", temperature=1.0, seed=seed).text
        assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", text), text
        text = demo.generate("Answer:", grammar='start: "yes" | "no" | "maybe"', temperature=1.0, seed=seed).text
        assert text in ("yes", "no", "maybe")


def test_constrained_stream_equals_generate_and_stop_strings_apply(demo):
    kwargs = dict(json_schema=SCHEMA, temperature=1.0, seed=7, max_new_tokens=200)
    whole = demo.generate("Once", **kwargs).text
    assert "".join(demo.stream("Once", **kwargs)) == whole
    cut = demo.generate("Once", stop=['"age"'], **kwargs)
    assert cut.finish_reason == "stop" and cut.text == whole[:whole.index('"age"')]


def test_logit_bias_changes_the_logits_as_openai_defines(demo):
    prompt = demo.encode_prompt("The king said")
    logits = demo.logits(torch.tensor([prompt]))[0, -1]                 # (V,) the oracle
    top = int(logits.argmax())
    assert demo.generate(prompt, temperature=0, max_new_tokens=1).token_ids == [top]
    biased = logits.clone()
    biased[top] -= 100
    second = int(biased.argmax())
    got = demo.generate(prompt, temperature=0, max_new_tokens=1, logit_bias={top: -100}).token_ids
    assert got == [second] and second != top
    forced = demo.generate(prompt, temperature=1.0, seed=0, max_new_tokens=4, ignore_eos=True,
                           logit_bias={"77": 100})
    assert forced.token_ids == [77] * 4


@pytest.mark.parametrize("kwargs,words", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json_schema"),
    (dict(json_schema="{not json"), "not valid json"),
    (dict(json_schema=[1]), "json schema object"),
    (dict(regex="[0-9"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(json_schema=True, regex="a"), "one constraint"),
    (dict(logit_bias={5: 101}), "from -100 to 100"),
    (dict(logit_bias={"x": 1}), "not a token id"),
    (dict(logit_bias={99999: 1}), "not a token id"),
])
def test_bad_constraints_are_one_line_errors(demo, kwargs, words):
    with pytest.raises(OffloadMoeError) as e:
        demo.generate("x", max_new_tokens=2, **kwargs)
    assert words in str(e.value).lower() and "\n" not in str(e.value)


def test_load_threads(monkeypatch):
    from offload_moe.base.threads import set_threads

    monkeypatch.setattr("offload_moe.api.loader.set_threads", set_threads)   # the real one (conftest pins "auto")
    before = torch.get_num_threads()
    try:
        offload_moe.load(None, device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        monkeypatch.setattr("offload_moe.base.threads.default_threads", lambda: 2)
        offload_moe.load(None, device="cpu")        # default: "auto", the CLI's choice
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        offload_moe.load(None, device="cpu", threads=None)   # None leaves torch's setting
        assert torch.get_num_threads() == 1
        with pytest.raises(OffloadMoeError, match="threads = 'many'"):
            offload_moe.load(None, device="cpu", threads="many")
    finally:
        torch.set_num_threads(before)


def test_cli_generate_with_a_json_schema_file_and_bad_constraints(tmp_path, capsys):
    from offload_moe.cli.main import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["generate", "Once", "--json-schema", str(schema), "--temperature", "1", "--seed", "3",
                 "--device", "cpu", "--max-new-tokens", "200"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert main(["generate", "Once", "--regex", "[0-9", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("offload-moe: error: regex:") and err.count("\n") == 1
    assert main(["generate", "Once", "--json-schema", str(tmp_path / "missing.json"), "--device", "cpu"]) == 1
    assert "missing.json" in capsys.readouterr().err


def test_the_mask_forbids_exactly_the_tokens_the_grammar_rejects(demo):
    """Our unpacking of llguidance's bitmask on the device, against the matcher asked token by token."""
    from offload_moe.generation.constrain import Constraint, grammar_from

    c = Constraint(demo.grammar_tokenizer(), grammar_from(json_schema=SCHEMA), demo.device)
    for token in demo.encode_prompt('{"name":"Ann"'):   # a few steps into the document
        if token != 1:   # <s>
            c.advance(token)
    logits = torch.zeros(demo.config.vocab_size)
    allowed = set(torch.isfinite(c.apply(logits)).nonzero().flatten().tolist())
    expected = {t for t in range(demo.config.vocab_size) if c.matcher.validate_tokens([t]) == 1}
    assert allowed == expected and 0 < len(allowed) < demo.config.vocab_size
