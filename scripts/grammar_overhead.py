"""Per-token cost of constrained decoding with llguidance and xgrammar, side by side (issue 26).

For each vocabulary (the demo's 4,096 tokens, and a byte-level BPE of Qwen's size, 151,643 tokens,
trained here offline on Python source text), and each library: compile a JSON schema, then walk a
sampled path through it, timing per token (a) the mask computation into a preallocated bitmask and
(b) advancing the grammar by the sampled token. The path is drawn with a fixed seed among the tokens
the mask allows, alternately in the two libraries' runs (interleaved, so a shared machine's load hits
both alike). Prints medians and spreads; nothing here is imported by the package.

    .venv/bin/python scripts/grammar_overhead.py [--tokens 200] [--rounds 5] [--corpus DIR]
    .venv/bin/python scripts/grammar_overhead.py --e2e [--rounds 5]   # demo decode tok/s, constrained or not
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8},
                         "address": {"type": "object", "additionalProperties": False,
                                     "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
QWEN_VOCAB = 151_643


def big_tokenizer(corpus: Path, out: Path) -> Path:
    """A byte-level BPE of Qwen's vocabulary size, trained on the .py files under `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    file = out / "tokenizer.json"
    if file.exists():
        return file
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=QWEN_VOCAB, special_tokens=["<|endoftext|>"], min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = sorted(str(p) for p in corpus.rglob("*.py"))
    tok.train(files, trainer)
    tok.save(str(file))
    return file


class Llg:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int):
        import llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        self.setup = time.perf_counter() - t0
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, defaults={"whitespace_flexible": False})
        self.mod = llguidance

    def start(self):
        self.m = self.mod.LLMatcher(self.tok, self.grammar, log_level=0)
        assert not self.m.is_error(), self.m.get_error()

    def fill(self, mask: torch.Tensor):
        self.m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)

    def advance(self, token: int):
        assert self.m.consume_token(token), self.m.get_error()

    def done(self) -> bool:
        return self.m.is_stopped()


class Xgr:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int):
        import xgrammar
        from tokenizers import Tokenizer
        t0 = time.perf_counter()
        backend = Tokenizer.from_str(tokenizer_json)
        pieces = [backend.id_to_token(i) or "" for i in range(backend.get_vocab_size())]
        meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
        info = xgrammar.TokenizerInfo(pieces, meta["vocab_type"], vocab_size=vocab, stop_token_ids=[eos],
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        self.setup = time.perf_counter() - t0
        self.mod = xgrammar

    def start(self):
        self.m = self.mod.GrammarMatcher(self.compiled)

    def fill(self, mask: torch.Tensor):
        self.m.fill_next_token_bitmask(mask.view(1, -1))

    def advance(self, token: int):
        assert self.m.accept_token(token)

    def done(self) -> bool:
        return self.m.is_terminated()


def walk(lib, vocab: int, tokens: int, seed: int) -> tuple[list[float], list[float]]:
    """One constrained generation of up to `tokens` tokens: (mask seconds, advance seconds) per token."""
    rng = random.Random(seed)
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    bits = 1 << torch.arange(32, dtype=torch.int64)
    lib.start()
    masks, advances = [], []
    for _ in range(tokens):
        t0 = time.perf_counter()
        lib.fill(mask)
        t1 = time.perf_counter()
        allowed = ((mask.to(torch.int64)[:, None] & bits) != 0).flatten()[:vocab].nonzero().flatten().tolist()
        token = rng.choice(allowed)
        t2 = time.perf_counter()
        lib.advance(token)
        t3 = time.perf_counter()
        masks.append(t1 - t0)
        advances.append(t3 - t2)
        if lib.done():
            break
    return masks, advances


def end_to_end(rounds: int):
    """The demo's decode tok/s for 64 tokens, free and under a regex that cannot end sooner (through our
    Constraint, i.e. llguidance), alternating."""
    import offload_moe

    model = offload_moe.load(None, device="cpu")
    runs = {"free": dict(ignore_eos=True), "regex": dict(regex="[a-z ]{400}")}
    tps = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, kwargs in runs.items():
            result = model.generate("The king", max_new_tokens=64, temperature=1.0, seed=r, **kwargs)
            assert len(result.token_ids) == 64, (name, len(result.token_ids))
            if r:   # the first round warms up
                tps[name].append(result.stats["generation"]["decode_tokens_per_second"])
    print(f"threads {torch.get_num_threads()}")
    for name, values in tps.items():
        print(f"demo decode, {name:5s}: median {statistics.median(values):6.1f} tok/s "
              f"(rounds {min(values):.1f}-{max(values):.1f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--corpus", type=Path, default=Path(torch.__file__).parent)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bpe150k")
    args = ap.parse_args()
    if args.e2e:
        return end_to_end(args.rounds)
    args.cache.mkdir(exist_ok=True)
    demo = Path(__file__).resolve().parent.parent / "offload_moe" / "demo" / "tokenizer.json"
    t0 = time.perf_counter()
    big = big_tokenizer(args.corpus, args.cache)
    print(f"150k tokenizer: {big} ({time.perf_counter() - t0:.0f} s)")
    from tokenizers import Tokenizer
    for label, file in (("demo", demo), ("bpe-151643", big)):
        text = file.read_text()
        backend = Tokenizer.from_str(text)
        vocab = backend.get_vocab_size()
        eos = backend.token_to_id("</s>") or backend.token_to_id("<|endoftext|>") or 0
        libs = [Llg(text, vocab, eos), Xgr(text, vocab, eos)]
        results = {lib.name: {"mask": [], "advance": [], "tokens": []} for lib in libs}
        for r in range(args.rounds):
            for lib in libs:   # interleaved: each round runs both
                masks, advances = walk(lib, vocab, args.tokens, seed=r)
                res = results[lib.name]
                res["mask"].append(statistics.median(masks) * 1e6)
                res["advance"].append(statistics.median(advances) * 1e6)
                res["tokens"].append(len(masks))
        for lib in libs:
            res = results[lib.name]
            print(f"{label:11s} vocab {vocab:6d} {lib.name:10s} setup {lib.setup * 1e3:7.0f} ms | per token: "
                  f"mask median {statistics.median(res['mask']):7.1f} us (rounds {min(res['mask']):.1f}-"
                  f"{max(res['mask']):.1f}), advance {statistics.median(res['advance']):6.1f} us "
                  f"({min(res['advance']):.1f}-{max(res['advance']):.1f}); tokens per walk {res['tokens']}")


if __name__ == "__main__":
    main()
