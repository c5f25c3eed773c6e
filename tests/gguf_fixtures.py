"""GGUF files for tests, written by the gguf package's own `GGUFWriter` the way llama.cpp's
`convert_hf_to_gguf.py` lays them out: its tensor-name table (`gguf.get_tensor_name_map`), experts
stacked per layer, llama's q/k rows permuted, the same metadata keys. Blocks come from
`gguf.quants.quantize` where the package has a quantizer, else (k-quants) random valid blocks.
`llamacpp_convert` runs the real converter instead, when a llama.cpp checkout is available."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from offload_moe.checkpoints.checkpoint import Checkpoint

T = gguf.GGMLQuantizationType
ARCH = {"mixtral": gguf.MODEL_ARCH.LLAMA, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
        "olmoe": gguf.MODEL_ARCH.OLMOE, "deepseek_v2": gguf.MODEL_ARCH.DEEPSEEK2, "gpt_oss": gguf.MODEL_ARCH.GPT_OSS}


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf): RoPE pairs -> halves, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(shape: tuple[int, ...], qtype, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    """Random but valid blocks of `qtype` for a float tensor of `shape` (fp16 fields set to ~scale)."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) // bs
    raw = rng.integers(0, 256, size=(n, ts), dtype=np.uint8)
    fp16 = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
    for off in fp16:
        raw[:, off:off + 2] = (rng.uniform(0.5, 1.5, size=n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(*shape[:-1], shape[-1] // bs * ts)


def encode(data: np.ndarray, qtype, seed: int = 0) -> np.ndarray:
    if qtype == T.MXFP4:
        return gguf.quants.quantize(data.astype(np.float32), qtype)
    if qtype in (T.F32, T.F16):
        return data.astype(np.float32 if qtype == T.F32 else np.float16)
    if qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        scale = float(np.abs(data).max()) / 500 or 0.01  # d · sc · q then spans about the data
        return random_blocks(data.shape, qtype, seed, scale)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def write_gguf(src: str | Path, out: str | Path, *, experts=T.F32, attention=T.F32, embeddings=T.F32,
               tokenizer: bool = True, chat_template: str | None = None, version: int | None = None,
               split_max_tensors: int = 0) -> Path:
    """Convert checkpoint directory `src` (our tiny transformers checkpoints) into GGUF file `out`
    (with split_max_tensors, a split set `out-0000i-of-0000N.gguf`; the first file is returned)."""
    ckpt = Checkpoint(src)
    c = ckpt.config
    arch = ARCH[c.model_type]
    names = gguf.get_tensor_name_map(arch, c.num_layers)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch], split_max_tensors=split_max_tensors)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.dense_intermediate_size or c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k)
    w.add_vocab_size(c.vocab_size)
    if c.model_type == "mixtral":
        w.add_rope_dimension_count(c.head_dim)
    elif c.mla:  # DeepseekV2Model.set_gguf_parameters
        m = c.mla
        w.add_leading_dense_block_count(len(c.dense_layers))
        if m.q_lora_rank:
            w.add_q_lora_rank(m.q_lora_rank)
        w.add_kv_lora_rank(m.kv_lora_rank)
        w.add_key_length(m.kv_lora_rank + m.qk_rope_head_dim)
        w.add_value_length(m.kv_lora_rank)
        w.add_key_length_mla(m.qk_nope_head_dim + m.qk_rope_head_dim)
        w.add_value_length_mla(m.v_head_dim)
        w.add_expert_feed_forward_length(c.intermediate_size)
        w.add_expert_shared_count(c.shared_expert_size // c.intermediate_size)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        if c.norm_topk_prob:
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(m.qk_rope_head_dim)
        if c.n_group > 1:
            w.add_expert_group_count(c.n_group)
            w.add_expert_group_used_count(c.topk_group)
    else:
        w.add_expert_feed_forward_length(c.intermediate_size)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if c.shared_expert_size:
        w.add_expert_shared_feed_forward_length(c.shared_expert_size)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if c.rope_scaling:
        y = c.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y["factor"])
        w.add_rope_scaling_orig_ctx_len(y["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if y.get(key) is not None:
                add(y[key])
        if y.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * y["mscale_all_dim"])
    if c.clip_qkv:
        w.add_clamp_kqv(c.clip_qkv)
    if c.model_type == "qwen3_moe":
        w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer and (Path(src) / "tokenizer.json").exists():
        add_tokenizer(w, Path(src))
    if chat_template:
        w.add_chat_template(chat_template)

    seed = 0
    for name, shape in ckpt.expected_shapes().items():
        base, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):  # gpt-oss's self_attn.sinks
            base, suffix = name, "weight"
        gname = f"{names.get_name(base) or gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_layers).get_name(base)}.{suffix}"
        data = ckpt.get(name).float().numpy()
        if name.endswith("kv_b_proj.weight"):  # split as DeepseekV2Model.modify_tensors does
            m = c.mla
            kv_b = data.reshape(c.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
            k_b, v_b = kv_b[:, :m.qk_nope_head_dim], kv_b[:, m.qk_nope_head_dim:]
            w.add_tensor(gname.replace("attn_kv_b", "attn_k_b"), np.ascontiguousarray(k_b.transpose(0, 2, 1)))
            w.add_tensor(gname.replace("attn_kv_b", "attn_v_b"), np.ascontiguousarray(v_b))
            continue
        if c.model_type == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = llama_permute(data, c.num_heads if ".q_proj." in name else c.num_kv_heads)
        qtype = T.F32
        if data.ndim == 2 and not name.endswith(("gate.weight", "shared_expert_gate.weight")) \
                and name.removesuffix("weight") + "bias" not in ckpt.expected_shapes():
            qtype = embeddings if "embed_tokens" in name or name.startswith("lm_head") else attention
            qtype = qtype if ".self_attn." in name or qtype == embeddings else T.F32
        seed += 1
        w.add_tensor(gname, encode(data, qtype, seed), raw_dtype=qtype)
    for i in c.moe_layers:
        parts = [ckpt.expert(i, e) for e in range(c.num_experts)]
        for m, b, stem in (("w1", "b1", "ffn_gate_exps"), ("w3", "b3", "ffn_up_exps"), ("w2", "b2", "ffn_down_exps")):
            seed += 1
            stacked = np.stack([p[m].float().numpy() for p in parts])
            w.add_tensor(f"blk.{i}.{stem}.weight", encode(stacked, experts, seed), raw_dtype=experts)
            if b in parts[0]:  # gpt-oss
                w.add_tensor(f"blk.{i}.{stem}.bias", np.stack([p[b].float().numpy() for p in parts]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        first = sorted(Path(out).parent.glob(Path(out).stem + "-00001-of-*.gguf"))
        return first[0]
    if version is not None:  # a header version we do not read
        with open(out, "r+b") as f:
            f.seek(4)
            f.write(int(version).to_bytes(4, "little"))
    return Path(out)


def add_tokenizer(w: gguf.GGUFWriter, src: Path) -> None:
    """tokenizer.json (byte-level BPE) -> tokenizer.ggml.* as the converter's `_set_vocab_gpt2` writes it."""
    import json

    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t["content"], gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").exists() else {}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id)):
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in tokens:
            add(tokens.index(tok))
    w.add_add_bos_token(True)


# ---------------------------------------------------------------- llama.cpp itself, when available

def llamacpp_dir() -> Path | None:
    """A llama.cpp checkout with built binaries: $LLAMA_CPP_DIR (its build/bin holds llama-cli & co)."""
    d = os.environ.get("LLAMA_CPP_DIR")
    return Path(d) if d and (Path(d) / "convert_hf_to_gguf.py").exists() else None


def llamacpp_bin(name: str) -> Path | None:
    d = llamacpp_dir()
    exe = d / "build" / "bin" / name if d else None
    return exe if exe and exe.exists() else None


CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
sys.argv[0] = src + "/convert_hf_to_gguf.py"
from conversion import base
pre = base.TextModel.get_vocab_base_pre
def known_pre(self, tokenizer):  # the demo's BPE is GPT-2's, but not one llama.cpp knows by hash
    try:
        return pre(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
spm = base.TextModel._set_vocab_sentencepiece
def spm_or_skip(self, *a, **k):  # no tokenizer.model: go on to the BPE path without sentencepiece
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("tokenizer.model")
    return spm(self, *a, **k)
base.TextModel.get_vocab_base_pre = known_pre
base.TextModel._set_vocab_sentencepiece = spm_or_skip
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llamacpp_convert(src: Path, out: Path, outtype: str = "f32", *options: str) -> Path:
    subprocess.run([sys.executable, "-c", CONVERT, str(llamacpp_dir()), str(src), "--outtype", outtype,
                    "--outfile", str(out), *options], check=True, capture_output=True)
    return out


def write_spm_vocab(out: Path, corpus: str) -> Path:
    """A vocabulary-only llama GGUF with a SentencePiece-style vocabulary (tokens, scores, types) as a
    trained one has it: every character of the corpus a piece, byte fallback for the rest, and the
    frequent substrings of its U+2581-prefixed words, scored by rank."""
    import re

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    counts: dict[str, int] = {}
    for word in re.findall(r"\S+", corpus):
        w = "\u2581" + word
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + 5) + 1):
                counts[w[i:j]] = counts.get(w[i:j], 0) + 1
    chars = sorted({c for c in corpus.replace(" ", "\u2581") if ord(c) < 0x2000 or c == "\u2581"})  # not CJK/emoji
    pieces = chars + [p for p in sorted(counts, key=lambda p: (-counts[p] * len(p), p)) if set(p) <= set(chars)][:600]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(2)
    w.add_expert_used_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def gguf_tokenizer(path):
    """`text.Tokenizer` from a GGUF header alone (no weights needed: vocabulary-only files too)."""
    from offload_moe.checkpoints.gguf import GGUFFile, tokenizer_parts
    from offload_moe.generation.text import Tokenizer

    p = tokenizer_parts(GGUFFile(path))
    return Tokenizer.from_parts(p.backend, p.bos_token, p.eos_token, p.chat_template, p.source)


def tiny_mixtral_gguf(tmp_path_factory, name: str, qtype) -> Path:
    """A tiny Mixtral (rows of 256: whole blocks of every type) as a GGUF whose experts and attention
    are `qtype`, its token table Q8_0."""
    from conftest import tiny_mixtral

    d = tmp_path_factory.mktemp("hf")
    tiny_mixtral(hidden_size=256, intermediate_size=256).save_pretrained(d)
    return write_gguf(d, tmp_path_factory.mktemp("gguf") / name, experts=qtype, attention=qtype,
                      embeddings=gguf.GGMLQuantizationType.Q8_0)
