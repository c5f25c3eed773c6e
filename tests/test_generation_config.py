"""generation_config.json: its stop ids and sampling defaults, applied by the API, the CLI and the server;
what the user sets explicitly wins. The oracle for stopping is transformers' `generate`, which reads
the same file."""

from __future__ import annotations

import io
import json
import shutil
import sys

import httpx
import pytest
import torch

import offload_moe
from chat_fixtures import build_tiny_chat_checkpoint
from conftest import save, tiny_mixtral
from offload_moe import OffloadMoeError
from offload_moe.cli.main import main
from offload_moe.generation.defaults import GenerationDefaults

PROMPT_IDS = [1, 5, 7]


def with_generation_config(src, dst, **config):
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny Mixtral (config.json eos 2) and its greedy continuation of PROMPT_IDS."""
    directory = save(tiny_mixtral(), tmp_path_factory.mktemp("plain"))
    ids = offload_moe.load(directory, device="cpu").generate(PROMPT_IDS, temperature=0, max_new_tokens=12).token_ids
    assert len(ids) == 12 and 2 not in ids
    return directory, ids


def test_an_eos_id_only_in_generation_config_stops_generation(plain, tmp_path):
    from transformers import MixtralForCausalLM

    directory, ids = plain
    stop = ids[4]
    j = ids.index(stop)
    d = with_generation_config(directory, tmp_path / "eos", bos_token_id=1, eos_token_id=[2, stop])
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == 2   # config.json does not know it
    ours = offload_moe.load(d, device="cpu").generate(PROMPT_IDS, temperature=0, max_new_tokens=12)
    assert ours.finish_reason == "stop" and ours.token_ids == ids[:j]
    reference = MixtralForCausalLM.from_pretrained(d).generate(torch.tensor([PROMPT_IDS]), max_new_tokens=12,
                                                               do_sample=False)
    assert reference[0, len(PROMPT_IDS):].tolist() == ids[:j] + [stop]   # transformers keeps the eos token


def test_sampling_defaults_apply_and_explicit_arguments_win(plain, tmp_path):
    directory, greedy = plain
    d = with_generation_config(directory, tmp_path / "topk1", do_sample=True, temperature=1.0, top_k=1)
    model = offload_moe.load(d, device="cpu")
    assert model.generation.sampling() == (1.0, 0.95, 1)
    assert model.generate(PROMPT_IDS, max_new_tokens=12, seed=3).token_ids == greedy   # top-k 1 is greedy
    assert model.generate(PROMPT_IDS, max_new_tokens=12, seed=3, top_k=0).token_ids != greedy
    assert "temperature 1, top-k 1 (generation_config.json)" in model.settings.sampling


def test_do_sample_false_means_greedy_unless_told_otherwise(plain, tmp_path):
    directory, greedy = plain
    model = offload_moe.load(with_generation_config(directory, tmp_path / "greedy", do_sample=False), device="cpu")
    assert model.generate(PROMPT_IDS, max_new_tokens=12, seed=3).token_ids == greedy
    assert model.generate(PROMPT_IDS, max_new_tokens=12, seed=3, temperature=1.0).token_ids != greedy


@pytest.mark.parametrize("config, words", [
    ({"eos_token_id": "</s>"}, "eos_token_id = '</s>'"),
    ({"eos_token_id": [2, -1]}, "eos_token_id"),
    ({"top_p": 0}, "top_p = 0"),
    ({"temperature": "hot"}, "temperature = 'hot'"),
    ({"top_k": 2.5}, "top_k = 2.5"),
])
def test_bad_generation_config_is_one_line(tmp_path, config, words):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(OffloadMoeError) as e:
        GenerationDefaults.load(tmp_path)
    assert "generation_config.json" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the CLI and the server


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """The tiny chat checkpoint, with a generation_config.json recommending top-k 1 (so: greedy)."""
    d = build_tiny_chat_checkpoint(tmp_path_factory.mktemp("chat"))
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.9, "top_k": 1}))
    return d


def run_cli(monkeypatch, capsys, *argv, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out


def test_cli_applies_and_shows_the_defaults_and_flags_override(chat_dir, monkeypatch, capsys):
    model = offload_moe.load(chat_dir, device="cpu")
    greedy = model.generate("Hello there", temperature=0, max_new_tokens=10).text
    out = run_cli(monkeypatch, capsys, "generate", "--model", chat_dir, "--max-new-tokens", 10, "--seed", 1,
                  "Hello there")
    assert out.out == greedy + "\n"
    out = run_cli(monkeypatch, capsys, "chat", "--model", chat_dir, "--max-new-tokens", 6, stdin="Hello there")
    assert "sampling temperature 0.9, top-k 1 (generation_config.json); top-p 0.95 (offload-moe default)" in out.err
    out = run_cli(monkeypatch, capsys, "chat", "--model", chat_dir, "--max-new-tokens", 6, "--temperature", 1.5,
                  stdin="Hello there")
    assert "sampling temperature 1.5 (as given); top-p 0.95 (offload-moe default); top-k 1 (generation_config.json)" \
        in out.err
    sampled = run_cli(monkeypatch, capsys, "generate", "--model", chat_dir, "--max-new-tokens", 10, "--seed", 1,
                      "--top-k", 0, "--temperature", 1.5, "Hello there")
    assert sampled.out != greedy + "\n"


def test_server_applies_the_same_defaults(chat_dir):
    from offload_moe.server import create_app
    from serve_fixtures import running_server

    model = offload_moe.load(chat_dir, device="cpu")
    greedy = model.generate("Hello there", temperature=0, max_new_tokens=10).text
    with running_server(create_app(model, model_name="tiny")) as base:
        def complete(**params):
            body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 10, "seed": 1, **params}
            return httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        assert complete() == greedy
        assert complete(temperature=1.5, top_k=0) != greedy
