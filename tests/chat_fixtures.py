"""A tiny chat checkpoint for the chat tests: a random Mixtral plus a small BPE tokenizer and a chat template.

The tokenizer's alphabet is only the characters of a few training sentences (no byte fallback), so
every token decodes to printable text and generated replies never contain control characters or
newlines: terminal tests can match them line by line. The model's vocabulary is exactly the
tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'system' %}[SYS] {{ m['content'] }} [/SYS]"
            "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

SENTENCES = [
    "[SYS] You are a helpful assistant. [/SYS] [INST] Hello there, how are you today? [/INST]",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs!",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "What is 1 + 2 - 3 * 4 / 5 = 6 7 8 9 0 (yes) and \"no\" or maybe... JSON files, #tags & @names.",
]


def build_tiny_chat_checkpoint(directory: str | Path, *, seed: int = 0, max_positions: int = 4096) -> Path:
    """Write a tiny fp32 Mixtral (hidden 32, 2 layers, 4 experts, top-2) with tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from conftest import tiny_mixtral

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TEMPLATE}))

    model = tiny_mixtral(seed, vocab_size=tok.get_vocab_size(), num_hidden_layers=2, num_local_experts=4,
                         max_position_embeddings=max_positions)
    model.save_pretrained(directory)
    return directory


def small_bpe(specials: list[str]):
    """A 300-token byte-level BPE (a `tokenizers.Tokenizer`) trained on one sentence, with `specials`
    as its special tokens: enough for a chat template's markers and a short conversation."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["Hello there, what is the weather in Paris? Be brief."] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return raw
