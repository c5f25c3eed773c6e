"""The tokenizer and chat template a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`),
rebuilt as a `tokenizers.Tokenizer` that splits text as llama.cpp's `llama-vocab.cpp` does.

- `tokenizer.ggml.model = "gpt2"`: byte-level BPE with the file's merges, after the split regexes
  llama.cpp uses for `tokenizer.ggml.pre` (applied one after another, as it does).
- `"llama"`: SentencePiece-style tokens with scores: BPE whose merges are ordered by the score of
  the merged piece (what llama.cpp's SPM tokenizer merges first), byte fallback to `<0xXX>`,
  spaces as U+2581 and a leading one unless `tokenizer.ggml.add_space_prefix` is false.
Control and user-defined tokens (token types 3 and 4) are matched whole, as added tokens.

Every key is read with the type we expect and the arrays are checked against each other (as many
token types and scores as tokens, each merge two known tokens joined by a space, special token ids
inside the vocabulary) before anything is built: a bad header is one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...base.errors import OffloadMoeError
from .reader import GGUFFile

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM = ["[\r\n]",
                 "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                 "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$", "[一-龥ࠀ-一가-퟿]+", "\\p{N}+"]
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]
# tokenizer.ggml.pre -> the regexes llama.cpp splits with (llama-vocab.cpp, llm_tokenizer_bpe)
PRE_SPLITS = {"gpt-2": [_GPT2], "olmo": [_GPT2], "mpt": [_GPT2], "phi-2": [_GPT2],
              "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "llama-v3": [_LLAMA3],
              "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2], "deepseek-llm": _DEEPSEEK_LLM,
              "gpt-4o": [_GPT4O], "default": _DEFAULT}
CONTROL, USER_DEFINED = 3, 4
MAX_MERGED_PIECE = 256  # longer SentencePiece pieces get no merges (real vocabularies stay under ~50 chars)


@dataclass
class TokenizerParts:
    """What `text.Tokenizer.from_parts` takes: a `tokenizers.Tokenizer`, special tokens, the template."""
    backend: object
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    source: str

    def files(self) -> dict[str, str]:
        """tokenizer.json and tokenizer_config.json that `text.Tokenizer` reads back the same."""
        import json

        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template}
        return {"tokenizer.json": self.backend.to_str(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def tokenizer_parts(f: GGUFFile) -> TokenizerParts:
    """The header's tokenizer (`tokenizer.ggml.*`) and chat template."""
    tokens = f.typed("tokenizer.ggml.tokens", "a list of strings")
    model = f.typed("tokenizer.ggml.model", "a string")
    if not tokens:
        raise OffloadMoeError(f"{f.path}: no tokenizer.ggml.tokens, so text cannot be tokenized")
    types = _per_token(f, "tokenizer.ggml.token_type", "a list of integers", tokens) or [1] * len(tokens)
    if model == "gpt2":
        backend = _bpe(f, tokens)
    elif model == "llama":
        backend = _spm(f, tokens, types)
    else:
        raise OffloadMoeError(f"{f.path}: tokenizer.ggml.model = {model!r} is not supported "
                              "(supported: gpt2, llama)")
    from tokenizers import AddedToken

    special = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
               for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    backend.add_special_tokens(special)
    bos, eos = (f.typed(f"tokenizer.ggml.{k}_token_id", "a non-negative integer") for k in ("bos", "eos"))
    bos_token = tokens[bos] if isinstance(bos, int) and bos < len(tokens) else None
    eos_token = tokens[eos] if isinstance(eos, int) and eos < len(tokens) else None
    # BOS / EOS as llama.cpp adds them with `add_special` (tokenizer.ggml.add_bos_token, ...)
    from tokenizers import processors

    add_bos = f.typed("tokenizer.ggml.add_bos_token", "a bool", model == "llama") and bos_token is not None
    add_eos = f.typed("tokenizer.ggml.add_eos_token", "a bool", False) and eos_token is not None
    if add_bos or add_eos:
        single = " ".join([f"{bos_token}:0"] * add_bos + ["$A:0"] + [f"{eos_token}:0"] * add_eos)
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B:1",
            special_tokens=[(bos_token, bos)] * add_bos + [(eos_token, eos)] * add_eos)
    return TokenizerParts(backend, bos_token, eos_token, f.typed("tokenizer.chat_template", "a string"),
                          f"{f.path} (tokenizer.chat_template)")


def _bpe(f: GGUFFile, tokens: list[str]):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    merges = f.typed("tokenizer.ggml.merges", "a list of strings", [])
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for i, m in enumerate(merges):
        pair = tuple(m.split(" ", 1))
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise OffloadMoeError(f"{f.path}: tokenizer.ggml.merges[{i}] = {m[:40]!r}, expected two tokens of "
                                  "the vocabulary joined by a space, whose join is a token too")
        pairs.append(pair)
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=False))
    pre = f.typed("tokenizer.ggml.pre", "a string") or "default"
    if pre not in PRE_SPLITS:
        raise OffloadMoeError(f"{f.path}: tokenizer.ggml.pre = {pre!r} is not known here "
                              f"(known: {', '.join(sorted(PRE_SPLITS))})")
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm(f: GGUFFile, tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    scores = _per_token(f, "tokenizer.ggml.scores", "a list of numbers", tokens) or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    # Merges as transformers' SentencePieceExtractor derives them: every split of a piece into two
    # pieces, ordered by the merged piece's score (higher first).
    merges = []
    for piece in sorted((t for i, t in enumerate(tokens) if types[i] == 1), key=lambda t: -scores[vocab[t]]):
        if len(piece) > MAX_MERGED_PIECE:  # its splits cost len**2: a corrupt 20 KB token would take seconds
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda p: (vocab[p[0]], vocab[p[1]]))
    unk = f.typed("tokenizer.ggml.unknown_token_id", "a non-negative integer", 0)
    if unk >= len(tokens):
        raise OffloadMoeError(f"{f.path}: tokenizer.ggml.unknown_token_id = {unk}, expected an id below the "
                              f"vocabulary's {len(tokens)} tokens")
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                                 byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    prefix = f.typed("tokenizer.ggml.add_space_prefix", "a bool", True)
    if prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    parts = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(parts)
    return tok


def _per_token(f: GGUFFile, key: str, kind: str, tokens: list[str]) -> list | None:
    """An array with one entry per token (token_type, scores), or None when the file has none."""
    values = f.typed(key, kind)
    if values is not None and len(values) != len(tokens):
        raise OffloadMoeError(f"{f.path}: {key} has {len(values):,} entries, expected one per token "
                              f"({len(tokens):,}, tokenizer.ggml.tokens)")
    return values
