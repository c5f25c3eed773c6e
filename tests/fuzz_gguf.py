"""Fuzz the GGUF reader with mutated valid files: `python tests/fuzz_gguf.py [--examples N] [--seed S]`.

Two small valid files are the seeds: a Mixtral-shaped GGUF with a byte-level BPE tokenizer (gpt2,
merges, a chat template) and one with a SentencePiece-style tokenizer (llama, scores). Hypothesis
mutates them two ways: bytes (overwritten with counts and lengths that matter: 0, 1, 2**31, 2**60,
2**64 - 1, ...; flipped; the file cut short) mostly inside the header, and metadata rewritten (one
key's value replaced by a value of another type or length, as `GGUFWriter` would write it). Each
input is opened as `offload-moe info` opens it (`GGUFCheckpoint`, the config, the tokenizer).

Allowed: the file opens, or `OffloadMoeError` with a one-line message. Anything else fails: another
exception, an input that runs past `--timeout` seconds (SIGALRM), or memory past the address-space
cap (a MemoryError). Prints one summary line; exit status 0 when nothing else happened.
`tests/test_gguf_fuzz.py` runs this in the slow set.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ADDRESS_SPACE = 6 * 2**30
INTERESTING = [0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**60,
               2**63 - 1, 2**63, 2**64 - 1]


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


def tiny_gguf(tokenizer: str) -> bytes:
    """A valid Mixtral-shaped GGUF (hidden 32, 1 layer, 2 experts, 16 tokens) with a gpt2 or llama tokenizer."""
    import gguf

    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seed.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(32)
        w.add_feed_forward_length(32)
        w.add_head_count(2)
        w.add_head_count_kv(1)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_expert_count(2)
        w.add_expert_used_count(1)
        w.add_vocab_size(16)
        w.add_rope_dimension_count(16)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        letters = list("abcdefgh")
        if tokenizer == "gpt2":
            tokens = ["<s>", "</s>", *letters, "ab", "cd", "abcd", "ef", "gh", "efgh"]
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("gpt-2")
            w.add_token_merges(["a b", "c d", "ab cd", "e f", "g h", "ef gh"])
        else:
            tokens = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(3)], "\u2581", *letters[:5],
                      "\u2581a", "ab", "abc", "\u2581ab"]
            w.add_tokenizer_model("llama")
            w.add_token_scores([-float(i) for i in range(len(tokens))])
            w.add_unk_token_id(0)
        w.add_token_list(tokens)
        w.add_token_types([3, 3, *[1] * (len(tokens) - 2)] if tokenizer == "gpt2" else
                          [2, 3, 3, 6, 6, 6, *[1] * (len(tokens) - 6)])
        w.add_bos_token_id(tokens.index("<s>"))
        w.add_eos_token_id(tokens.index("</s>"))
        w.add_add_bos_token(True)
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

        def f32(*shape):
            return rng.normal(0, 0.1, shape).astype(np.float32)

        w.add_tensor("token_embd.weight", f32(16, 32))
        w.add_tensor("output_norm.weight", f32(32))
        w.add_tensor("output.weight", f32(16, 32))
        w.add_tensor("blk.0.attn_norm.weight", f32(32))
        w.add_tensor("blk.0.ffn_norm.weight", f32(32))
        for name, rows in (("attn_q", 32), ("attn_k", 16), ("attn_v", 16), ("attn_output", 32)):
            w.add_tensor(f"blk.0.{name}.weight", gguf.quants.quantize(f32(rows, 32), T.Q8_0), raw_dtype=T.Q8_0)
        w.add_tensor("blk.0.ffn_gate_inp.weight", f32(2, 32))
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            w.add_tensor(f"blk.0.{name}.weight", gguf.quants.quantize(f32(2, 32, 32), T.Q8_0), raw_dtype=T.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def _data_start(data: bytes) -> int:
    """Where the tensor data starts (byte mutations are biased to land before it)."""
    import gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return int(gguf.GGUFReader(f.name).data_offset)


def rewrite_metadata(seed: bytes, key_index: int | str, value) -> bytes:
    """The seed with one metadata key's value replaced (written by GGUFWriter: any type, any length);
    the key by name or by its index among the keys."""
    import gguf

    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "in.gguf", Path(d) / "out.gguf"
        src.write_bytes(seed)
        r = gguf.GGUFReader(src)
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        target = key_index if isinstance(key_index, str) else keys[key_index % len(keys)]
        w = gguf.GGUFWriter(str(out), None)
        for key, field in r.fields.items():
            if key.startswith("GGUF."):
                continue
            v = value if key == target else field.contents()
            vtype = None if key == target else field.types[0]
            if isinstance(v, list):
                w.add_array(key, v)
            elif vtype is None:
                w.add_key_value(key, v, _type_of(v))
            else:
                w.add_key_value(key, v, vtype)
        for t in r.tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return out.read_bytes()


def _type_of(v):
    import gguf

    V = gguf.GGUFValueType
    if isinstance(v, bool):
        return V.BOOL
    if isinstance(v, int):
        return V.INT64 if v < 0 else V.UINT64
    if isinstance(v, float):
        return V.FLOAT32
    return V.STRING


def open_like_info(path: Path) -> None:
    """What `offload-moe info FILE.gguf` reads: the checkpoint (header, config, types), the tokenizer."""
    from offload_moe.checkpoints.gguf import GGUFCheckpoint
    from offload_moe.generation.text import Tokenizer

    ckpt = GGUFCheckpoint(path)
    parts = ckpt.tokenizer_parts()
    if parts is not None:
        tok = Tokenizer.from_parts(parts.backend, parts.bos_token, parts.eos_token, parts.chat_template, parts.source)
        tok.decode(tok.encode("abcd efgh"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=20500)  # some rewrites GGUFWriter refuses: 20,000+ inputs
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=10)
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > ADDRESS_SPACE:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, hard))
    import hypothesis
    from hypothesis import HealthCheck, given, settings, strategies as st

    from offload_moe.base.errors import OffloadMoeError

    seeds = [tiny_gguf("gpt2"), tiny_gguf("llama")]
    for seed in seeds:  # imports (torch: seconds) happen here, not in the first input's time
        with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
            f.write(seed)
            f.flush()
            open_like_info(Path(f.name))
    ends = [_data_start(s) for s in seeds]
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-gguf-"))
    counts = {"inputs": 0, "opened": 0, "refused": 0}
    failures: list[str] = []
    slowest = [0.0]

    values = st.one_of(
        st.integers(-2**63, 2**64 - 1), st.sampled_from(INTERESTING), st.floats(allow_nan=True), st.booleans(),
        st.text(max_size=20), st.sampled_from(["llama", "gpt2", "yarn", "qwen3moe", "", "a b", "{{ x }}"]),
        st.lists(st.integers(0, 2**32 - 1), max_size=20), st.lists(st.text(max_size=6), max_size=20),
        st.lists(st.booleans(), max_size=20), st.lists(st.floats(allow_nan=False, width=32), max_size=20),
        st.just([]))
    byte_edit = st.tuples(st.sampled_from(["u8", "u32", "u64", "flip", "cut"]), st.floats(0, 1),
                          st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1)))

    @settings(max_examples=args.examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @given(which=st.integers(0, 1), header_bias=st.booleans(), edits=st.lists(byte_edit, max_size=4),
           rewrite=st.one_of(st.none(), st.tuples(st.integers(0, 63), values)))
    def one(which, header_bias, edits, rewrite):
        data = seeds[which]
        if rewrite is not None:
            try:
                data = rewrite_metadata(data, *rewrite)
            except Exception:  # noqa: BLE001 - a value GGUFWriter cannot write is not an input
                return
        data = bytearray(data)
        for kind, where, value in edits:
            span = ends[which] if header_bias else len(data)
            pos = int(where * max(span - 1, 0))
            if kind == "cut":
                del data[pos:]
            elif kind == "flip":
                if pos < len(data):
                    data[pos] ^= 1 << (value % 8)
            else:
                n = {"u8": 1, "u32": 4, "u64": 8}[kind]
                data[pos:pos + n] = (value % 2**(8 * n)).to_bytes(n, "little")
        path = scratch / f"in-{counts['inputs'] % 2}.gguf"
        path.write_bytes(bytes(data))
        counts["inputs"] += 1
        t0 = time.perf_counter()
        failed = len(failures)
        signal.alarm(args.timeout)
        try:
            open_like_info(path)
            counts["opened"] += 1
        except OffloadMoeError as e:
            counts["refused"] += 1
            if "\n" in str(e):
                failures.append(f"two-line message: {str(e)[:300]!r}")
        except Hang:
            failures.append(f"hang past {args.timeout}s")
        except BaseException as e:  # noqa: BLE001 - what the fuzz looks for
            import traceback

            failures.append(f"{type(e).__name__}: {str(e)[:200]}\n{traceback.format_exc()[-1500:]}")
        finally:
            signal.alarm(0)
        seconds = time.perf_counter() - t0
        if seconds > args.timeout and len(failures) == failed:  # the alarm cannot interrupt native code
            failures.append(f"took {seconds:.1f} s (limit {args.timeout} s)")
        if seconds > slowest[0]:
            slowest[0] = seconds
            path.with_name("slowest.gguf").write_bytes(bytes(data))
        if len(failures) > failed:
            path.with_name(f"failure-{len(failures)}.gguf").write_bytes(bytes(data))

    signal.signal(signal.SIGALRM, _alarm)
    hypothesis.seed(args.seed)(one)()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"fuzz_gguf: {counts['inputs']} inputs, {counts['opened']} opened, {counts['refused']} refused "
          f"with OffloadMoeError, {len(failures)} other outcomes; slowest input {slowest[0]:.2f} s, "
          f"peak RSS {rss:.0f} MB")
    for f in failures[:10]:
        print(f, file=sys.stderr)
    if failures:
        print(f"failing inputs kept in {scratch}", file=sys.stderr)
    else:
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
