"""Random-weight GGUF files with the real tensor shapes of Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b.

What a user downloads is a 17-26 GB GGUF; what the tests use is a few MB. This writes the former without
downloading it: every tensor has the name, shape and ggml type llama.cpp's own converter
(convert_hf_to_gguf.py) gives the real model, every block is a valid block of its type with small scales
(so a forward pass stays finite: matrices have a standard deviation of about 0.02, norms are 1), and
the metadata (architecture keys and a real tokenizer) is the converter's.

How the layout is found, so that nothing here restates llama.cpp's tables:
1. the converter's `--vocab-only` mode on a directory holding the published config.json and the demo's
   tokenizer (padded by the converter to the real vocabulary size with [PAD] tokens, as llama.cpp
   requires one token per embedding row) gives every key: architecture, hyper-parameters, tokenizer;
2. the converter on a tiny transformers model of the same architecture (the published config with
   small, pairwise distinct widths, one layer) gives the tensor names, their order and which stay F32;
3. each tiny width maps back to its real width (hidden 64 -> 2048, ...), and layer 0's tensors
   repeat for every layer.
Block bytes come straight from numpy (random bytes, then the fp16/E8M0 scale fields set), written
tensor by tensor in chunks of `CHUNK_BYTES` through GGUFWriter's streaming calls (add_tensor_info, then
write_tensor_data per tensor), so memory stays at a few chunks whatever the file size.

    python scripts/make_real_gguf.py qwen3-30b-a3b OUT.gguf --layers 12 --type Q4_0
    python scripts/make_real_gguf.py gpt-oss-20b OUT.gguf --type Q8_0          # experts MXFP4
    python scripts/make_real_gguf.py mixtral-8x7b OUT.gguf --llama-cpp LLAMA_CPP_DIR

llama.cpp's directory (the one holding convert_hf_to_gguf.py) comes from --llama-cpp or $LLAMA_CPP_DIR.
`--tiny` writes the tiny widths instead of the real ones (for tests: the same code path in a few MB).
Needs transformers (the test extra) for step 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "offload_moe" / "demo"
CHUNK_BYTES = 32 << 20
WEIGHT_STD = 0.02  # what a matrix's values spread by (transformers' initializer_range)


@dataclass(frozen=True)
class Family:
    """A published config, the overrides that make its tiny twin, and the widths tensors are built from."""
    config: str                     # tests/data file with the published config.json
    tiny: dict                      # config overrides for the tiny model the converter sees
    widths: tuple[str, ...]         # names of `widths_of` entries that appear as tensor dimensions
    expert_type: T | None = None    # the published experts' type, when it is fixed (gpt-oss: MXFP4)


FAMILIES = {
    "qwen3-30b-a3b": Family("qwen3-30b-a3b-config.json",
                            dict(hidden_size=64, moe_intermediate_size=32, num_experts=10, num_experts_per_tok=8,
                                 head_dim=8, num_attention_heads=12, num_key_value_heads=2, intermediate_size=128,
                                 num_hidden_layers=1, max_window_layers=1),
                            ("hidden", "expert_width", "experts", "head_dim", "q_width", "kv_width")),
    "mixtral-8x7b": Family("mixtral-8x7b-config.json",
                           dict(hidden_size=64, intermediate_size=96, num_local_experts=6, num_experts_per_tok=2,
                                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1),
                           ("hidden", "expert_width", "experts", "q_width", "kv_width")),
    "gpt-oss-20b": Family("gpt-oss-20b-config.json",
                          dict(hidden_size=64, intermediate_size=64, num_local_experts=6, num_experts_per_tok=2,
                               experts_per_token=2, head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=1, layer_types=["sliding_attention"], quantization_config=None),
                          ("hidden", "expert_width", "experts", "head_dim", "q_width", "kv_width", "heads"),
                          expert_type=T.MXFP4),
}

TYPES = {t.name: t for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K,
                             T.Q5_K, T.Q6_K, T.MXFP4)}
FILE_TYPE = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
             T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
             T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
             T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
             T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
             T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, T.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
             T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, T.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE}
# fp16 fields of each block: (byte offset of the scale, byte offset of the min or None)
SCALE_FIELDS = {T.Q4_0: (0, None), T.Q4_1: (0, 2), T.Q5_0: (0, None), T.Q5_1: (0, 2), T.Q8_0: (0, None),
                T.Q2_K: (80, 82), T.Q3_K: (108, None), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, None)}


class UserError(Exception):
    """Bad input: one line for the user."""


def widths_of(cfg: dict) -> dict[str, int]:
    """The widths a config gives its tensors (names shared by all three families)."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {"hidden": cfg["hidden_size"],
            "expert_width": cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
            "experts": cfg.get("num_experts") or cfg["num_local_experts"],
            "head_dim": head_dim, "heads": heads, "q_width": heads * head_dim,
            "kv_width": cfg["num_key_value_heads"] * head_dim, "vocab": cfg["vocab_size"]}


def width_map(family: Family, real: dict, tiny: dict) -> dict[int, int]:
    """{tiny width: real width}; refuses tiny overrides that would make one tiny width mean two real ones."""
    out: dict[int, int] = {}
    rw, tw = widths_of(real), widths_of(tiny)
    for name in (*family.widths, "vocab"):
        t, r = tw[name], rw[name]
        if out.setdefault(t, r) != r:
            raise AssertionError(f"tiny width {t} ({name}) stands for both {out[t]} and {r}: change the overrides")
    return out


# ---------------------------------------------------------------- the converter's view of the model

def convert(llama_cpp: Path, model_dir: Path, out: Path, *extra: str) -> Path:
    """Run llama.cpp's converter through scripts/gguf_convert.py (which names the demo's BPE for it)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "gguf_convert.py"), str(llama_cpp), str(model_dir),
           "--outfile", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else ''}")
    return out


def with_tokenizer(directory: Path, cfg: dict) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, directory / name)
    return directory


def tiny_model(directory: Path, cfg: dict) -> Path:
    """A random tiny transformers model of `cfg`'s architecture, saved with the demo's tokenizer."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    args = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    config = AutoConfig.for_model(args.pop("model_type"), **args)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(directory)
    with_tokenizer(directory / "tok", cfg)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(directory / "tok" / name, directory / name)
    shutil.rmtree(directory / "tok")
    return directory


@dataclass(frozen=True)
class Layout:
    """Everything the real file needs: its keys (from the vocab-only conversion) and its tensors."""
    name: str                                           # FAMILIES key
    arch: str
    layers: int                                         # the published model's layer count
    fields: list                                        # GGUFReader fields of the vocab-only file
    tiny_fields: list                                   # ... of the tiny model's file (for --tiny)
    tensors: list[tuple[str, tuple[int, ...], T]]       # (name, numpy shape, converter's type), layer 0 as blk.{}
    widths: dict[int, int]


def converter_layout(name: str, llama_cpp: Path, work: Path) -> Layout:
    family = FAMILIES[name]
    real = json.loads((ROOT / "tests" / "data" / family.config).read_text())
    tiny = {k: v for k, v in {**real, **family.tiny}.items() if v is not None}
    widths = width_map(family, real, tiny)
    vocab = convert(llama_cpp, with_tokenizer(work / "real", real), work / "vocab.gguf", "--vocab-only")
    small = convert(llama_cpp, tiny_model(work / "tiny", tiny), work / "tiny.gguf", "--outtype", "f16")
    fields = list(gguf.GGUFReader(vocab).fields.values())
    reader = gguf.GGUFReader(small)
    tiny_fields = list(reader.fields.values())
    tensors = []
    for t in reader.tensors:
        if t.name.startswith("blk.") and not t.name.startswith("blk.0."):
            raise AssertionError(f"tiny model has more than one layer: {t.name}")
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne -> numpy order
        tensors.append((t.name.replace("blk.0.", "blk.{}.", 1), shape, T(t.tensor_type)))
    arch = str(reader.fields["general.architecture"].contents())
    return Layout(name, arch, real["num_hidden_layers"], fields, tiny_fields, tensors, widths)


# ---------------------------------------------------------------- random blocks

@dataclass(frozen=True)
class Scales:
    """Field values that give one qtype's weights a mean near 0 and a standard deviation of WEIGHT_STD."""
    scale: float
    minimum: float = 0.0   # the min field (Q4_1, Q*_K with dmin), chosen to cancel the scale's mean


def calibrate(qtype: T, rng: np.random.Generator) -> Scales:
    """Measure, with gguf.quants.dequantize as the oracle, what scale fields give WEIGHT_STD."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(4096, ts), dtype=np.uint8)
    if qtype == T.MXFP4:
        raw[:, 0] = 127
        std = float(gguf.quants.dequantize(raw, qtype).std())
        return Scales(float(127 + round(math.log2(WEIGHT_STD / std))))

    def values(scale: float, minimum: float) -> np.ndarray:
        s_off, m_off = SCALE_FIELDS[qtype]
        raw[:, s_off:s_off + 2] = np.full((4096, 1), scale, np.float16).view(np.uint8)
        if m_off is not None:
            raw[:, m_off:m_off + 2] = np.full((4096, 1), minimum, np.float16).view(np.uint8)
        return gguf.quants.dequantize(raw, qtype).astype(np.float64)

    minimum = 0.0
    if SCALE_FIELDS[qtype][1] is not None:
        minimum = -float(values(1.0, 0.0).mean()) / float(values(0.0, 1.0).mean())
    std = float(values(1.0, minimum).std())
    return Scales(WEIGHT_STD / std, minimum * WEIGHT_STD / std)


class Noise:
    """Random bytes at memory speed: a pool of random bytes, read from a random offset and XORed with a
    random 64-bit word per chunk (numpy's generators make 0.3-2 GB/s; this keeps a 17 GB file at disk
    speed). Chunks are not independent draws, but no two share both offset and word: enough for weights
    whose values only need to be valid and spread."""

    POOL = 32 << 20

    def __init__(self, seed: int):
        self.pool = np.random.default_rng(seed).integers(0, 2**64, size=2 * self.POOL // 8, dtype=np.uint64)
        self.out = np.empty(self.POOL // 8, np.uint64)  # reused: fresh pages per chunk cost more than the XOR

    def bytes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n (<= POOL) fresh-looking random bytes, writable, valid until the next call."""
        words = -(-n // 8)
        start = int(rng.integers(0, self.POOL // 8))
        out = self.out[:words]
        np.bitwise_xor(self.pool[start:start + words], rng.integers(0, 2**64, dtype=np.uint64), out=out)
        return out.view(np.uint8)[:n]


class RandomTensor:
    """One tensor's bytes, made and written chunk by chunk (what GGUFWriter.write_tensor_data needs of an
    array: `nbytes` and `tofile`), so a 1 GB tensor never sits in memory."""

    def __init__(self, name: str, shape: tuple[int, ...], qtype: T, seed: int, scales: Scales | None,
                 noise: Noise):
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        self.name, self.shape, self.qtype, self.seed, self.scales, self.noise = name, shape, qtype, seed, scales, noise
        self.row_bytes = shape[-1] // bs * ts
        self.rows = math.prod(shape[:-1])
        self.nbytes = self.rows * self.row_bytes
        jitter = 0.5 + (np.arange(256) + 0.5) / 256
        if qtype == T.MXFP4:  # E8M0 exponents: the calibrated one, one below or one above
            self.tables = (np.uint8(scales.scale) + np.arange(256, dtype=np.uint8) % 3 - np.uint8(1),)
        elif scales is not None:  # fp16 scale, fp16 min
            self.tables = tuple((jitter * v).astype(np.float16).view(np.uint16) for v in (scales.scale, scales.minimum))

    def fill(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """`rows` rows of this tensor as bytes."""
        n = rows * self.row_bytes
        t, stem = self.qtype, self.name.rsplit(".", 2)[-2]
        if t == T.F32:  # norms (ones), sinks (zeros), router, biases: small tensors
            count = n // 4
            if stem.endswith("norm"):
                return np.ones(count, np.float32).view(np.uint8)
            if stem.endswith("sinks"):
                return np.zeros(count, np.float32).view(np.uint8)
            return (rng.standard_normal(count, dtype=np.float32) * WEIGHT_STD).view(np.uint8)
        bits = self.noise.bytes(rng, n)
        if t in (T.F16, T.BF16):  # random sign and mantissa, exponent 2^-7 or 2^-6: |x| in [0.008, 0.031)
            h = bits.view(np.uint16)
            if t == T.F16:  # exponent bits 10-14, bias 15: bit 10 random, bits 11-14 = 0b0100 -> 8 or 9
                h &= 0x87FF
                h |= 4 << 11
            else:  # exponent bits 7-14, bias 127: bit 7 random, bits 8-14 = 60 -> 120 or 121
                h &= 0x80FF
                h |= 60 << 8
            return bits
        # each block's scale: the asked one times a jitter in 0.5-1.5 that one of the block's own random
        # bytes picks from a 256-entry table (a gather, not a float conversion per block)
        blocks = bits.reshape(-1, gguf.GGML_QUANT_SIZES[t][1])
        if t == T.MXFP4:
            blocks[:, 0] = self.tables[0][blocks[:, 0]]
        else:
            s_off, m_off = SCALE_FIELDS[t]  # even offsets in even-sized blocks: address them as uint16
            words = bits.view(np.uint16).reshape(len(blocks), -1)
            pick = words[:, s_off // 2] & 0xFF
            words[:, s_off // 2] = self.tables[0][pick]
            if m_off is not None:
                words[:, m_off // 2] = self.tables[1][pick]
        return bits

    def tofile(self, fout) -> None:
        rng = np.random.default_rng(self.seed)
        step = max(1, min(CHUNK_BYTES, Noise.POOL) // self.row_bytes)
        for start in range(0, self.rows, step):
            self.fill(rng, min(step, self.rows - start)).tofile(fout)


def tensor_type(name: str, shape: tuple[int, ...], converted: T, qtype: T, expert_type: T) -> T:
    """The type a tensor gets: F32 where the converter kept F32 (norms, router, biases), else the chosen
    type; a row that is not a whole number of blocks falls back to Q8_0 (as llama-quantize falls back)."""
    if converted == T.F32 or len(shape) < 2:
        return T.F32
    t = expert_type if "_exps." in name else qtype
    if shape[-1] % gguf.GGML_QUANT_SIZES[t][0]:
        t = T.Q8_0 if shape[-1] % 32 == 0 else T.F16
    return t


# ---------------------------------------------------------------- the file

def write(layout: Layout, out: Path, *, layers: int | None, qtype: T, expert_type: T, tiny: bool,
          seed: int = 0, progress=None) -> dict:
    """Write the random-weight file; returns {'bytes': file size, 'seconds': time taken, 'tensors': n,
    'rss_before'/'rss_peak': this process's peak RSS before writing and after (bytes; equal when the
    writing itself needed no more memory than what came before it)}."""
    start = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    block_key = f"{layout.arch}.block_count"
    layers = layout.layers if layers is None else layers
    if not 1 <= layers <= layout.layers:
        raise UserError(f"--layers {layers}: expected 1..{layout.layers}")
    w = gguf.GGUFWriter(str(out), layout.arch)
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type",
            "general.name", block_key}
    for f in layout.tiny_fields if tiny else layout.fields:
        if f.name in skip:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    w.add_block_count(layers)
    w.add_file_type(FILE_TYPE[qtype])
    w.add_name(f"{layout.name}{' tiny' if tiny else ''} random weights, {layers} of {layout.layers} layers")

    scales, tensors = {}, []
    rng = np.random.default_rng(seed)
    noise = Noise(seed)
    names = [(n.format(i), shape, t) for n, shape, t in layout.tensors
             for i in (range(layers) if "{}" in n else [None])]
    for k, (name, shape, converted) in enumerate(names):
        if not tiny:
            if any(d not in layout.widths for d in shape):
                raise AssertionError(f"{name}{shape}: a width the tiny->real map does not know")
            shape = tuple(layout.widths[d] for d in shape)
        t = tensor_type(name, shape, converted, qtype, expert_type)
        if t not in (T.F32, T.F16, T.BF16) and t not in scales:
            scales[t] = calibrate(t, rng)
        tensor = RandomTensor(name, shape, t, seed * 100003 + k, scales.get(t), noise)
        w.add_tensor_info(name, (*shape[:-1], tensor.row_bytes), np.dtype(np.uint8), tensor.nbytes, raw_dtype=t)
        tensors.append(tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    done = 0
    for tensor in tensors:
        w.write_tensor_data(tensor)
        done += tensor.nbytes
        if progress:
            progress(tensor.name, done)
    w.close()
    return {"bytes": out.stat().st_size, "seconds": time.perf_counter() - start, "tensors": len(tensors),
            "rss_before": rss_before, "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def llama_cpp_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("LLAMA_CPP_DIR", ""))
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"{d}: no convert_hf_to_gguf.py there (give llama.cpp's directory with --llama-cpp "
                        "or $LLAMA_CPP_DIR)")
    return d


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(FAMILIES))
    p.add_argument("out", type=Path, help="GGUF file to write (refuses to overwrite)")
    p.add_argument("--type", default="Q4_0", choices=sorted(TYPES), help="type of every matrix (default Q4_0)")
    p.add_argument("--expert-type", choices=sorted(TYPES),
                   help="type of the expert tensors (default: --type; gpt-oss: MXFP4 as published)")
    p.add_argument("--layers", type=int, help="write only the first N layers (default: all)")
    p.add_argument("--tiny", action="store_true", help="tiny widths instead of the real ones (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-cpp", help="llama.cpp directory (default $LLAMA_CPP_DIR)")
    args = p.parse_args(argv)
    try:
        if args.out.exists():
            raise UserError(f"{args.out}: already exists (not overwritten)")
        if not args.out.parent.is_dir():
            raise UserError(f"{args.out.parent}: no such directory")
        family = FAMILIES[args.model]
        qtype = TYPES[args.type]
        expert_type = TYPES[args.expert_type] if args.expert_type else family.expert_type or qtype
        with tempfile.TemporaryDirectory(prefix="make_real_gguf-") as work:
            layout = converter_layout(args.model, llama_cpp_dir(args.llama_cpp), Path(work))
        part = args.out.with_name(args.out.name + ".part")
        try:
            last = [0.0]

            def progress(name: str, done: int) -> None:
                if time.perf_counter() - last[0] > 5:
                    last[0] = time.perf_counter()
                    print(f"  {done / 1e9:6.2f} GB  {name}", file=sys.stderr, flush=True)

            info = write(layout, part, layers=args.layers, qtype=qtype, expert_type=expert_type, tiny=args.tiny,
                         seed=args.seed, progress=progress)
            part.rename(args.out)
        finally:
            part.unlink(missing_ok=True)
    except UserError as e:
        sys.exit(f"make_real_gguf: {e}")
    print(f"{args.out}: {info['bytes'] / 1e9:.2f} GB, {info['tensors']} tensors, {info['seconds']:.0f} s "
          f"({info['bytes'] / 1e9 / max(info['seconds'], 1e-9):.2f} GB/s); peak RSS {info['rss_before'] / 2**20:.0f} MiB "
          f"before writing, {info['rss_peak'] / 2**20:.0f} MiB after")


if __name__ == "__main__":
    main()
