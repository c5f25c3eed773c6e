"""`quantize(src, dst)`: write a quantized copy of a checkpoint, streaming one layer at a time.

Why streaming: Mixtral-8x7B is 93 GB in bf16, so the converter must never hold the model. Source
tensors are read lazily through `Checkpoint` (safetensors mmap), in layer order, each exactly once;
an expert's three matrices are quantized and dropped before the next expert is read, so what lives
in memory is one source expert plus the *quantized* tensors of the current layer, written to that
layer's own shard before the next layer starts.

Output layout (the format itself is quant/format.py):

    dst/config.json                                 source config.json + "quantization_config"
    dst/model.safetensors.index.json                {"metadata": {"total_size": N}, "weight_map": {...}}
    dst/model-00001-of-000NN.safetensors            layer 0 (attention, norms, router, its experts)
    ...
    dst/model-000{L}-of-000NN.safetensors           layer L-1
    dst/model-000NN-of-000NN.safetensors            embed_tokens, final norm, lm_head (NN = L + 1)
    dst/tokenizer.json, tokenizer_config.json, ...  copied when present (a symlink's target), never with a
                                                    wider mode than the source has (`copy_source`)

Experts are always written in the family's per-expert layout (Mixtral:
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`, router `block_sparse_moe.gate.weight`), whichever
layout the source used. Which tensors a setting covers is `format.tensor_kind`; only 2-D `.weight`
matrices are quantized. Norms, routers, biases and tensors of no kind (shared experts, dense-layer
MLPs) are copied as stored; a float setting (bf16/fp16/fp32) converts its kind's matrices to that
dtype. Families whose experts have no per-expert layout (gpt-oss) are refused.

Atomicity: everything is written into `dst.parent/.{dst.name}.partial-<pid>`, every file fsynced,
and the directory renamed to `dst` as the very last step. Any failure removes the temporary
directory (and the parent directories this call made), so `dst` either does not exist or is complete. An existing `dst` is never overwritten.
SIGTERM and SIGHUP remove the temporary directory too (`owned_paths`); one left by a run killed
outright (SIGKILL, power loss) is removed by the next quantize to the same `dst` (its PID is dead).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import errno
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..checkpoints import families as arch
from ..base import owned_paths
from ..base.runtime import resolve_device
from ..checkpoints.checkpoint import Checkpoint
from ..api.sources import open_checkpoint
from ..base.errors import OffloadMoeError
from ..kernels.format import FLOAT_SETTINGS, QuantSpec, check_setting, tensor_kind
from ..kernels.groupwise import METHODS, nbytes_for
from ..kernels.groupwise import quantize as quantize_weight

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
EXPERT_MATRICES = ("w1", "w3", "w2")
FLOAT_DTYPES = {setting: getattr(torch, name) for setting, name in FLOAT_SETTINGS.items()}

Progress = Callable[[str, int, int], None]  # (what, done, total)


def shard_name(index: int, count: int) -> str:
    """1-based shard file name, Hugging Face style: model-00001-of-00033.safetensors."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class QuantizeOptions:
    """experts / attention / embeddings: "int2", "int3", "int4", "int8" (groupwise, packed) or "bf16",
    "fp16", "fp32" (stored as floats of that dtype). group_size: input weights per fp16 scale/zero
    (must divide every quantized input width). method: "hqq" (default) or "rtn"."""
    experts: str = "int3"
    attention: str = "int4"
    embeddings: str = "bf16"
    group_size: int = 64
    method: str = "hqq"


def quantize(src, dst, options: QuantizeOptions | None = None, *, progress: Progress | None = None,
             device: str = "auto", **given) -> Path:
    """Write a quantized copy of checkpoint directory `src` to the new directory `dst`; returns dst.

    options: the widths, group size and method (`QuantizeOptions`), its fields replaced by those given
    as keywords (`quantize(src, dst, experts="int4")`; an unknown one is a TypeError).
    progress(what, done_bytes, total_bytes) is called as source bytes are converted.
    device: where the quantization arithmetic runs ("auto": CUDA when available; HQQ on a CPU does
    roughly 1-3 M weights/s, hours for Mixtral-8x7B). Only one matrix at a time is moved there; on
    another device the codes may differ in rare rounding ties.
    Raises OffloadMoeError (one line) for bad arguments, an existing dst, a source that is not a
    checkpoint or is already quantized, and a full disk; dst is then left as it was."""
    unknown = sorted(set(given) - {f.name for f in fields(QuantizeOptions)})
    if unknown:
        raise TypeError(f"quantize() got an unexpected keyword argument {unknown[0]!r}")
    o = replace(options or QuantizeOptions(), **given)
    experts, attention, embeddings, group_size, method = o.experts, o.attention, o.embeddings, o.group_size, o.method
    settings = {"experts": experts, "attention": attention, "embeddings": embeddings}
    for kind, value in settings.items():
        check_setting(kind, value, "quantize")
    if method not in METHODS:
        raise OffloadMoeError(f"quantize: method = {method!r} is not known (expected one of {', '.join(METHODS)})")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise OffloadMoeError(f"quantize: group_size = {group_size!r}, expected a positive integer such as 64")
    compute = resolve_device(device)
    dst = Path(dst)
    _check_new(dst)
    ckpt = open_checkpoint(src)
    if ckpt.quant is not None and not hasattr(ckpt, "float_expert"):  # a GGUF file is dequantized
        q = ckpt.quant.settings
        raise OffloadMoeError(f"{ckpt.path}: already quantized (experts={q['experts']}, attention={q['attention']}, "
                              f"embeddings={q['embeddings']}); quantize the original checkpoint instead")
    if getattr(ckpt, "published", None) is not None:  # FP8 blocks, pack-quantized, GPTQ: computed as stored
        raise OffloadMoeError(f"{ckpt.path}: already quantized ({ckpt.published.stored}, read as published); "
                              "quantize the original checkpoint instead")
    fam = ckpt.config.family
    if "per_expert" not in fam.layouts or fam.expert_bias:
        raise OffloadMoeError(f"{ckpt.path}: {ckpt.config.model_type} experts have no per-expert layout, which "
                              "the quantized format requires, so this family cannot be quantized yet")
    spec = QuantSpec(settings, group_size, method)
    check_group_size(ckpt, spec)

    report = progress or (lambda what, done, total: None)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    writer = _Writer(tmp, dst)
    made = [d for d in (dst.parent, *dst.parent.parents) if not os.path.lexists(d)]  # ours to remove on failure
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            owned_paths.remove_stale(dst.parent, re.compile(re.escape(f".{dst.name}.partial-") + r"(?P<pid>\d+)"))
            if tmp.exists():  # left by a crashed run of a process with our pid
                shutil.rmtree(tmp)
            tmp.mkdir()
            owned_paths.own(tmp)  # removed on SIGTERM / SIGHUP / exit unless renamed to dst first
        except OSError as e:
            raise writer.error(e, tmp) from None
        _convert(ckpt, spec, writer, report, compute)
        writer.finish()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # the parents this call created (deepest first), if still empty
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    finally:
        owned_paths.release(tmp)  # after the rename there is nothing left at tmp
    return dst


def check_group_size(ckpt: Checkpoint, spec: QuantSpec) -> None:
    """Every input width of a matrix that will be quantized must be a multiple of the group size."""
    c = ckpt.config
    widths = {}  # input width -> the first tensor that has it
    for name, shape in output_shapes(ckpt).items():
        if _bits(name, shape, spec):
            widths.setdefault(shape[1], name)
    if not widths:
        return
    common = math.gcd(*widths)
    powers = [d for d in (128, 64, 32, 16, 8) if common % d == 0]  # a power of two where one fits
    suggestion = powers[0] if powers else max(d for d in range(1, min(common, 128) + 1) if common % d == 0)
    labels = {c.num_heads * c.head_dim: "num_attention_heads × head_dim", c.intermediate_size: "intermediate_size",
              c.hidden_size: "hidden_size"}  # later keys win when sizes coincide
    for width, name in sorted(widths.items(), key=lambda kv: kv[0] % spec.group_size == 0):
        if width % spec.group_size:
            dim = f"{labels[width]} {width}" if width in labels else f"the input width {width}"
            raise OffloadMoeError(f"quantize: group_size {spec.group_size} does not divide {dim} (the input "
                                  f"width of {name}); expected a divisor of it, e.g. --group-size {suggestion}")


def output_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the output holds, before quantization (per-expert layout)."""
    c = ckpt.config
    rename = _router_renames(ckpt)
    shapes = {rename.get(name, name): shape for name, shape in ckpt.expected_shapes().items()}
    for i in c.moe_layers:
        for e in range(c.num_experts):
            shapes |= dict(arch.expert_names(c, c.family, i, e).values())
    return shapes


def output_bytes(ckpt: Checkpoint, spec: QuantSpec) -> int:
    """Bytes of tensor data the quantized copy of `ckpt` holds (shard headers not included)."""
    source = {new: old for old, new in _router_renames(ckpt).items()}
    total = 0
    for name, shape in output_shapes(ckpt).items():
        bits, kind = _bits(name, shape, spec), _kind(name, shape)
        if bits:
            total += nbytes_for(shape, bits, spec.group_size)
        elif kind:
            total += math.prod(shape) * FLOAT_DTYPES[spec.settings[kind]].itemsize
        else:  # copied as stored (every expert matrix has a kind, so this is a source tensor)
            total += ckpt.tensors[source.get(name, name)].nbytes
    return total


def _kind(name: str, shape: tuple[int, ...]) -> str | None:
    """The setting a tensor follows: only 2-D `.weight` matrices of a kind; the rest is copied as stored."""
    return tensor_kind(name) if name.endswith(".weight") and len(shape) == 2 else None


def _bits(name: str, shape: tuple[int, ...], spec: QuantSpec) -> int | None:
    return spec.bits(_kind(name, shape))


def _router_renames(ckpt: Checkpoint) -> dict[str, str]:
    """Source router names -> the per-expert layout's (they differ for Mixtral's fused layout)."""
    c, out = ckpt.config, {}
    for i in c.moe_layers:
        old, new = ckpt.router_name(i), arch.router_name(c, c.family, "per_expert", i)
        if old != new:
            out[old] = new
            out[old.removesuffix("weight") + "bias"] = new.removesuffix("weight") + "bias"
    return out


# ---------------------------------------------------------------- the conversion


def _convert(ckpt: Checkpoint, spec: QuantSpec, writer: _Writer, report: Progress, device: torch.device) -> None:
    c = ckpt.config
    dense = ckpt.expected_shapes()
    total = sum(t.nbytes for t in ckpt.tensors.values()) if hasattr(ckpt, "float_expert") else \
        sum(ckpt.tensors[name].nbytes for name in [*dense, *ckpt.expert_shapes()])
    done = 0
    report("quantize", 0, total)
    shards = c.num_layers + 1
    rename = _router_renames(ckpt)
    by_layer: dict[int | None, list[str]] = {}
    for name in dense:
        by_layer.setdefault(_layer_of(name), []).append(name)

    def add(out: dict, name: str, w: torch.Tensor) -> None:
        nonlocal done
        out.update(_convert_weight(name, w, spec, device))
        done += w.numel() * w.element_size()

    for layer in range(c.num_layers):
        out: dict[str, torch.Tensor] = {}
        for name in by_layer.get(layer, []):
            add(out, rename.get(name, name), ckpt.get(name))
            report("quantize", done, total)
        if layer in c.moe_layers:
            for e in range(c.num_experts):
                names = arch.expert_names(c, c.family, layer, e)
                matrices = getattr(ckpt, "float_expert", ckpt.expert)(layer, e)  # GGUF: floats
                for m in EXPERT_MATRICES:
                    add(out, names[m][0], matrices.pop(m))  # each source matrix is dropped once quantized
                del matrices
                report("quantize", done, total)
        writer.shard(shard_name(layer + 1, shards), out)
        del out
    out = {}
    for name in by_layer.get(None, []):
        add(out, name, ckpt.get(name))
        report("quantize", done, total)
    writer.shard(shard_name(shards, shards), out)
    writer.index()
    if hasattr(ckpt, "config_json"):  # a GGUF source: its header as config.json, its own tokenizer
        raw = ckpt.config_json()
        tokenizer = ckpt.tokenizer_parts()
        for name, text in (tokenizer.files() if tokenizer else {}).items():
            writer.text(name, text)
    else:
        raw = json.loads((ckpt.path / "config.json").read_text())
    raw["quantization_config"] = spec.to_config()
    writer.text("config.json", json.dumps(raw, indent=2) + "\n")
    for file in TOKENIZER_FILES if ckpt.path.is_dir() else ():
        if (ckpt.path / file).is_file():
            writer.copy(ckpt.path / file, ckpt.path)


def _convert_weight(name: str, w: torch.Tensor, spec: QuantSpec, device: torch.device) -> dict[str, torch.Tensor]:
    kind = _kind(name, tuple(w.shape))
    bits = spec.bits(kind)
    if bits:
        qw = quantize_weight(w.to(device), bits, spec.group_size, spec.method)
        return {k: t.cpu() for k, t in qw.state_dict(name.removesuffix(".weight")).items()}
    if kind:
        w = w.to(FLOAT_DTYPES[spec.settings[kind]])
    return {name: w.contiguous()}  # norms, routers, biases: as stored


def _layer_of(name: str) -> int | None:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None


def _check_new(dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        raise OffloadMoeError(f"{dst}: already exists; quantize never overwrites (choose a new directory "
                              "or remove that one)")


# ---------------------------------------------------------------- atomic writing


class _Writer:
    """Files into the temporary directory, each fsynced; `finish` renames it to dst."""

    def __init__(self, tmp: Path, dst: Path):
        self.tmp, self.dst = tmp, dst
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        umask = os.umask(0)
        os.umask(umask)
        self.mode = 0o666 & ~umask  # safetensors creates files 0600; shards get a normal file's mode

    def error(self, e: OSError, file: Path) -> OffloadMoeError:
        if e.errno == errno.ENOSPC:
            return OffloadMoeError(f"no space left on device while writing {file}; nothing was written to {self.dst}")
        return OffloadMoeError(f"cannot write {file} ({e.strerror or e}); nothing was written to {self.dst}")

    def _guard(self, file: Path, write: Callable[[], None]) -> None:
        try:
            write()
            _fsync(file)
        except OSError as e:
            raise self.error(e, file) from None
        except SafetensorError as e:  # safetensors reports I/O errors as its own type
            full = "No space left" in str(e) or "StorageFull" in str(e)
            raise self.error(OSError(errno.ENOSPC if full else errno.EIO, str(e).splitlines()[0]), file) from None

    def shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        file = self.tmp / name

        def write():
            save_file(tensors, str(file), metadata={"format": "pt"})
            os.chmod(file, self.mode)

        self._guard(file, write)
        for key, t in tensors.items():
            self.weight_map[key] = name
            self.total_size += t.numel() * t.element_size()

    def index(self) -> None:
        body = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        self.text("model.safetensors.index.json", json.dumps(body, indent=2) + "\n")

    def text(self, name: str, content: str) -> None:
        self._guard(self.tmp / name, lambda: (self.tmp / name).write_text(content))

    def copy(self, file: Path, root: Path) -> None:
        """Copy a file of checkpoint `root` (see `copy_source`), never with a wider mode than it has."""
        source = copy_source(file, root)
        mode = stat.S_IMODE(source.stat().st_mode) & self.mode
        out = self.tmp / file.name

        def write():
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
                shutil.copyfileobj(src, dst)
            os.chmod(out, mode)  # the umask may have narrowed it further: keep the narrower of the two
        self._guard(out, write)


    def finish(self) -> None:
        try:
            _fsync(self.tmp)
            _check_new(self.dst)  # appeared while we were writing: still never overwrite
            os.rename(self.tmp, self.dst)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise OffloadMoeError(f"{self.dst}: already exists; quantize never overwrites") from None
            raise self.error(e, self.dst) from None
        try:
            _fsync(self.dst.parent)
        except OSError:
            pass  # the rename happened; a directory fsync is not possible on every filesystem


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_source(file: Path, root: Path) -> Path:
    """The file `quantize` copies for `file` of checkpoint directory `root`: the file itself or, for a
    symlink, its target, which must be a regular file (a FIFO would hang the copy, a directory
    cannot be one). A link into the Hugging Face cache's `blobs/` is the usual case; one pointing
    anywhere else is copied too (a tokenizer linked in from a base model is common), and either way
    the copy never gets a wider mode than the target has (`_Writer.copy`): a 0600 file stays 0600."""
    target = file.resolve()
    if not target.is_file():
        raise OffloadMoeError(f"{file}: not a regular file (expected a file to copy)")
    return target

__all__ = ["check_group_size", "output_bytes", "output_shapes", "quantize", "shard_name"]
