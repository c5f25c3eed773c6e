"""Chat templates as transformers finds and renders them: checkpoints written by `save_pretrained`
(`chat_template.jinja`), Mixtral-, Qwen3- and gpt-oss-style templates, and the order of precedence.
The oracle is transformers' `apply_chat_template(..., add_generation_prompt=True)` on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

from conftest import tiny_mixtral
from offload_moe import OffloadMoeError, load
from offload_moe.generation.text import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"

# Mixtral-8x7B-Instruct-v0.1's template (its tokenizer_config.json): an optional system message, then
# strictly alternating user/assistant turns, anything else refused through raise_exception.
MIXTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

STYLES = {  # name: (template, special tokens, tokenizer_config's bos/eos/pad)
    "mixtral": (MIXTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    "qwen3": ((TEMPLATES / "qwen3.jinja").read_text(),
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"],
              dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
    "gpt-oss": ((TEMPLATES / "gpt-oss.jinja").read_text(),
                ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|channel|>",
                 "<|return|>", "<|call|>", "<|constrain|>"],
                dict(bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>")),
}
TEXT = ["You are a helpful assistant. Be brief. Hello there, how are you today? I am well, thank you.",
        "What is the capital of France? Paris is the capital of France. Tell me more, please!",
        "Reasoning: medium. Knowledge cutoff: 2024-06. Current date: system developer user assistant final"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"},
            {"role": "assistant", "content": "I am well, thank you."},
            {"role": "user", "content": "What is the capital of France?"}]


def hf_tokenizer(style: str):
    """A small byte-level BPE as a transformers fast tokenizer, with the style's special tokens."""
    from transformers import PreTrainedTokenizerFast

    template, specials, tokens = STYLES[style]
    raw = RawTokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(TEXT * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **tokens)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=sorted(STYLES))
def saved(request, tmp_path_factory):
    """(style, directory): a tiny Mixtral and its tokenizer, both written by transformers' save_pretrained."""
    directory = tmp_path_factory.mktemp(f"saved-{request.param}")
    tok = hf_tokenizer(request.param)
    tok.save_pretrained(directory)
    tiny_mixtral(vocab_size=len(tok), num_hidden_layers=2, num_local_experts=4,
                 max_position_embeddings=1024).save_pretrained(directory)
    return request.param, directory


def oracle_ids(directory, messages) -> list[int]:
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(directory).apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_save_pretrained_keeps_the_template_in_chat_template_jinja(saved):
    _, directory = saved
    assert (directory / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((directory / "tokenizer_config.json").read_text())


def test_prompt_ids_equal_transformers_apply_chat_template(saved):
    style, directory = saved
    model = load(directory, device="cpu")
    for messages in (MESSAGES, MESSAGES[1:2]):
        assert model.chat_ids(messages) == oracle_ids(directory, messages), style


def test_a_saved_checkpoint_chats(saved):
    _, directory = saved
    reply = load(directory, device="cpu").chat(MESSAGES, temperature=0, max_new_tokens=4, ignore_eos=True)
    assert len(reply.token_ids) == 4


def test_mixtral_template_refuses_two_user_turns_in_one_line(tmp_path):
    hf_tokenizer("mixtral").save_pretrained(tmp_path)
    with pytest.raises(OffloadMoeError) as e:
        Tokenizer(tmp_path).render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    message = str(e.value)
    assert "\n" not in message and "chat_template.jinja" in message and "must alternate" in message


# ---------------------------------------------------------------- precedence


def write_tokenizer(directory: Path, config: dict) -> Path:
    """tokenizer.json of the Mixtral style, and the given tokenizer_config.json."""
    hf_tokenizer("mixtral").backend_tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", **config}))
    return directory


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, {"chat_template": "CONFIG {{ messages[0]['content'] }}"})
    (tmp_path / "chat_template.jinja").write_text("JINJA {{ messages[0]['content'] }}")
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES[1:2], tokenize=False)
    assert expected.startswith("JINJA")
    assert Tokenizer(tmp_path).render_chat(MESSAGES[1:2], add_generation_prompt=False) == expected


def test_named_templates_take_the_default(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                                 {"name": "default", "template": "DEFAULT {{ bos_token }}"}]})
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES[1:2], tokenize=False)
    assert Tokenizer(tmp_path).render_chat(MESSAGES[1:2]) == expected == "DEFAULT <s>"


def test_additional_chat_templates_directory(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, {"chat_template": "CONFIG"})
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("RAG")
    (tmp_path / "chat_template.jinja").write_text("JINJA")
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES[1:2], tokenize=False)
    tok = Tokenizer(tmp_path)
    assert tok.render_chat(MESSAGES[1:2]) == expected == "JINJA"
    assert tok.template.names == ("default", "rag")


def test_legacy_chat_template_json_when_nothing_else_has_one(tmp_path):
    write_tokenizer(tmp_path, {})
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "LEGACY {{ bos_token }}"}))
    assert Tokenizer(tmp_path).render_chat(MESSAGES[1:2]) == "LEGACY <s>"
    write_tokenizer(tmp_path, {"chat_template": "CONFIG"})
    assert Tokenizer(tmp_path).render_chat(MESSAGES[1:2]) == "CONFIG"


def test_named_templates_without_a_default_say_so(tmp_path):
    write_tokenizer(tmp_path, {"chat_template": [{"name": "tool_use", "template": "TOOLS"}]})
    with pytest.raises(OffloadMoeError, match="none called 'default'"):
        Tokenizer(tmp_path).render_chat(MESSAGES[1:2])
