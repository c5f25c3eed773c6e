"""Tokenizer, chat template (against transformers' renderer) and UTF-8-safe streaming."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from offload_moe import OffloadMoeError
from offload_moe.generation.text import StreamDecoder, Tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]"
            "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}"
            "{{ eos_token }}{% endif %}{% endfor %}")
TEXT = ["héllo wörld, naïve café 日本語のテキスト 🙂🎉 and plain ascii words " * 3, "ümlaut ßtraße Ωmega ✓ done"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE}))
    return d


def test_stream_pieces_are_valid_and_join_to_the_full_text(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    text = "naïve 日本語 🙂🎉 straße ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters are split across tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def test_chat_template_renders_like_transformers(tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>")
    expected = reference.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    assert Tokenizer(tokenizer_dir).render_chat(messages) == expected


def test_bad_message_is_a_clear_error(tokenizer_dir):
    with pytest.raises(OffloadMoeError, match="message 1"):
        Tokenizer(tokenizer_dir).render_chat([{"role": "user", "content": "x"}, {"role": "user"}])


def test_unreadable_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(OffloadMoeError, match="tokenizer.json"):
        Tokenizer(tmp_path)
