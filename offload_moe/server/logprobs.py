"""Log-probabilities in OpenAI's two shapes, from `penalties.LogprobRecord` entries (each the
log-softmax of the logits the sampler used at that step):

- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`;
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`.

A token's text is its own bytes (a byte-level BPE token can be half a UTF-8 character: its `bytes`
are exact, its `token` string shows the undecodable part as U+FFFD)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """id -> (text, bytes) for one tokenizer, cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            self.cache[token_id] = self._compute(token_id)
        return self.cache[token_id]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            return str(token_id), list(str(token_id).encode())
        piece = self.tokenizer.backend.id_to_token(token_id)
        decoder = _byte_decoder()
        if piece is not None and not self.tokenizer.backend.get_added_tokens_decoder().get(token_id) \
                and all(c in decoder for c in piece):
            raw = bytes(decoder[c] for c in piece)
        else:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(entries: list[dict], text_of: TokenText) -> dict:
    def one(token_id, logprob):
        token, raw = text_of(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(i, lp) for i, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict], text_of: TokenText, offset: int = 0) -> dict:
    """`offset`: characters of the completion before these tokens (for streamed chunks)."""
    tokens, offsets = [], []
    for e in entries:
        token = text_of(e["token"])[0]
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
    tops = []
    for e in entries:  # keyed by text: of two ids with the same text, the likelier one is kept
        top: dict[str, float] = {}
        for i, lp in e["top"]:
            top.setdefault(text_of(i)[0], lp)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries], "top_logprobs": tops,
            "text_offset": offsets}
