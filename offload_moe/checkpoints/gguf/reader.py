"""One GGUF file, or a split set (`name-00001-of-00003.gguf`), read by our own bounded parser.

The header (metadata, then the tensor table) is walked once with every count and length checked
against the bytes left in the file *before* anything is allocated or looped over, so a 118-byte
file claiming an array of 2**60 items is one line, not a hang that eats the machine (the gguf
package's `GGUFReader` trusts those counts). Tensors are numpy views of one copy-on-write memory map (writable views for
`torch.from_numpy`; the file is never written) that reserves no commit charge (`map_file`: a file bigger
than RAM maps), laid out as `GGUFReader` lays them out (float and integer types typed and shaped, quantized types
as uint8 rows of blocks), so nothing is read until a tensor is used. Limits follow llama.cpp's
`gguf.cpp`: at most 4 dimensions, a row a whole number of blocks, tensor offsets aligned to
`general.alignment` (a power of two, 32 by default), no arrays of arrays, no duplicate keys or
tensor names, every tensor's bytes inside the file. Each refusal names the file, the key or tensor
and what was expected.

`GGUFFile.fields` maps each key to a Python value (str, int, float, bool, or a list of one of
them); `typed()` reads one with the type we expect (config.py, tokenizer.py).
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...base.errors import OffloadMoeError
from ...base.user_files import advise_huge, regular_file
from .blocks import type_name

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
SUPPORTED_VERSIONS = (2, 3)
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_DIMS = 4                # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32      # GGUF_DEFAULT_ALIGNMENT
STRING, ARRAY, BOOL = 8, 9, 7
# GGUF value type -> numpy dtype of its scalar (little-endian); 8 (string) and 9 (array) aside
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
           10: "<u8", 11: "<i8", 12: "<f8"}
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
              7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
# ggml types read as typed arrays (GGUFReader's choice); every other type is uint8 rows of blocks
TYPED = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


def is_gguf(path) -> bool:
    """A path we read as GGUF: by its `.gguf` suffix (the file's magic is checked when it is opened)."""
    return str(path).lower().endswith(".gguf")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    file: Path
    type: int                 # ggml type (gguf.GGMLQuantizationType value)
    shape: tuple[int, ...]    # torch order: the last dimension is a row (ggml's ne reversed)
    nbytes: int
    data: np.ndarray          # the mmap'd bytes (uint8, or the float/int dtype of the type)
    offset: int = 0           # where the bytes start in `file` (a pread of an expert's range)


class GGUFFile:
    """Metadata (`fields`: key -> Python value) and tensors (name -> `GGUFTensor`) of a file or set."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise OffloadMoeError(f"{self.path}: no such GGUF file")
        self.files = split_files(self.path)
        self.fields: dict[str, object] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        for i, file in enumerate(self.files):
            fields, tensors = read_file(file)
            if i == 0:
                self.fields = fields
            for t in tensors:
                if t.name in self.tensors:
                    raise OffloadMoeError(f"{file}: tensor {t.name!r} is also in {self.tensors[t.name].file}")
                self.tensors[t.name] = t
        expected = self.fields.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(self.tensors):
            raise OffloadMoeError(f"{self.path}: split set holds {len(self.tensors)} tensors, its header says "
                                  f"{expected} (a shard is missing or from another set)")

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def typed(self, key: str, kind: str, default=None):
        """The value of `key` checked to be `kind` (see `KINDS`), or `default` when absent; a value
        of another type is a one-line error naming the file, the key and what was expected."""
        if key not in self.fields:
            return default
        value = self.fields[key]
        if not KINDS[kind](value):
            raise OffloadMoeError(f"{self.path}: metadata key {key!r} is {describe(value)}, expected {kind}")
        return value

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


KINDS = {
    "an integer": _int,
    "a non-negative integer": lambda v: _int(v) and v >= 0,
    "a number": _float,
    "a string": lambda v: isinstance(v, str),
    "a bool": lambda v: isinstance(v, bool),
    "a bool or an integer": lambda v: isinstance(v, (bool, int)),
    "a list of bools": lambda v: isinstance(v, list) and all(isinstance(x, bool) for x in v),
    "a non-negative integer or a list of them": lambda v: (_int(v) and v >= 0) or (
        isinstance(v, list) and bool(v) and all(_int(x) and x >= 0 for x in v)),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(_int(x) for x in v),
    "a list of numbers": lambda v: isinstance(v, list) and all(_float(x) for x in v),
}


def describe(value) -> str:
    """What a metadata value is, for a message: "a string ('abc')", "a list of 3 int"."""
    if isinstance(value, list):
        kinds = sorted({type(x).__name__ for x in value})
        return f"a list of {len(value)} {'/'.join(kinds) or 'items'}"
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{'a' if type(value).__name__[0] not in 'aeiou' else 'an'} {type(value).__name__} ({shown})"


def split_files(path: Path) -> list[Path]:
    """The files of a split set, in order (any one of them may be named), or [path]."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise OffloadMoeError(f"{path}: split set of {count} files, but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}")
    return files


class _Cursor:
    """A position in one file's bytes; every read is checked against the bytes left."""

    def __init__(self, file: Path, buf):
        self.file, self.buf, self.pos, self.size = file, buf, 0, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> int:
        if n > self.left():
            raise OffloadMoeError(f"{self.file}: {what} needs {n:,} bytes at offset {self.pos:,} but the file "
                                  f"has {self.left():,} left (truncated or corrupt GGUF)")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        start = self.need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str, strict: bool = False) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        start = self.need(n, f"{what} ({n:,} bytes)")
        raw = bytes(self.buf[start:start + n])
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise OffloadMoeError(f"{self.file}: {what} at offset {start:,} is not UTF-8") from None


def map_file(f) -> mmap.mmap:
    """The whole open file, private (copy-on-write: numpy and torch take it as writable memory; nothing
    writes to it) and without reserving commit charge (MAP_NORESERVE). Why: a private writable mapping is
    otherwise charged as if every page could be written, and the kernel's default overcommit heuristic
    refuses one larger than RAM + swap with ENOMEM (a 26 GB Mixtral on a 24 GB machine), though its
    pages are the file's, read on demand and reclaimable. Where reservation is enforced anyway
    (vm.overcommit_memory = 2), a read-only mapping (torch then warns once that the arrays are not writable)."""
    m = None
    if MAP_NORESERVE:
        try:
            m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE | MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            if e.errno != errno.ENOMEM:
                raise
    if m is None:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    advise_huge(m)
    return m



def read_file(file: Path) -> tuple[dict[str, object], list[GGUFTensor]]:
    """Metadata and tensors of one file, every count and length checked before it is used."""
    regular_file(file, "GGUF file")
    try:
        with open(file, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                f.seek(0)
                head = f.read(8)
                if len(head) < 4 or head[:4] != b"GGUF":
                    raise OffloadMoeError(f"{file}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
                raise OffloadMoeError(f"{file}: truncated GGUF header ({size} bytes)")
            buf = map_file(f)
    except OSError as e:
        raise OffloadMoeError(f"{file}: cannot read the GGUF file ({e.strerror or e})") from None
    if buf[:4] != b"GGUF":
        raise OffloadMoeError(f"{file}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    c = _Cursor(file, memoryview(buf))
    c.pos = 4
    version = c.scalar("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise OffloadMoeError(f"{file}: GGUF version {version} is not supported "
                              f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = c.scalar("<Q", "the tensor count")
    n_kv = c.scalar("<Q", "the metadata count")
    # each key/value takes at least 13 bytes (key length, type, one byte), each tensor 24
    if n_kv > c.left() // 13:
        raise OffloadMoeError(f"{file}: header says {n_kv:,} metadata keys, more than the {c.left():,} bytes "
                              "left can hold (corrupt GGUF)")
    fields: dict[str, object] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", strict=True)
        if key in fields:
            raise OffloadMoeError(f"{file}: metadata key {key!r} appears twice (corrupt GGUF)")
        fields[key] = _read_value(c, key, c.scalar("<I", f"the type of metadata key {key!r}"))
    if n_tensors > c.left() // 24:
        raise OffloadMoeError(f"{file}: header says {n_tensors:,} tensors, more than the {c.left():,} bytes "
                              "left can hold (corrupt GGUF)")
    align = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not _int(align) or align <= 0 or align & (align - 1):
        raise OffloadMoeError(f"{file}: metadata key 'general.alignment' is {describe(align)}, "
                              "expected a power of two")
    infos = [_read_tensor_info(c, i) for i in range(n_tensors)]
    data_start = -(-c.pos // align) * align
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors, names = [], set()
    for name, dims, ggml_type, offset in infos:
        if name in names:
            raise OffloadMoeError(f"{file}: tensor {name!r} appears twice in the tensor table (corrupt GGUF)")
        names.add(name)
        tensors.append(_tensor(file, data, data_start, align, name, dims, ggml_type, offset))
    return {k: v for k, v in fields.items() if not k.startswith("GGUF.")}, tensors


def _read_value(c: _Cursor, key: str, vtype: int):
    if vtype == STRING:
        return c.string(f"metadata key {key!r}")
    if vtype in SCALARS:
        return _scalars(c, key, vtype, 1)[0]
    if vtype != ARRAY:
        raise OffloadMoeError(f"{c.file}: metadata key {key!r} has value type {vtype}, which GGUF does not "
                              f"define (expected 0..12)")
    itype = c.scalar("<I", f"the item type of metadata key {key!r}")
    count = c.scalar("<Q", f"the length of metadata key {key!r}")
    if itype == STRING:
        if count > c.left() // 8:  # each string takes at least its 8-byte length
            raise OffloadMoeError(f"{c.file}: metadata key {key!r} says {count:,} strings, more than the "
                                  f"{c.left():,} bytes left can hold (corrupt GGUF)")
        return [c.string(f"item {j} of metadata key {key!r}") for j in range(count)]
    if itype in SCALARS:
        return _scalars(c, key, itype, count)
    what = "an array of arrays, which GGUF readers do not support" if itype == ARRAY else \
        f"items of type {itype}, which GGUF does not define"
    raise OffloadMoeError(f"{c.file}: metadata key {key!r} holds {what}")


def _scalars(c: _Cursor, key: str, vtype: int, count: int) -> list:
    dtype = np.dtype(SCALARS[vtype])
    if count > c.left() // dtype.itemsize:
        raise OffloadMoeError(f"{c.file}: metadata key {key!r} says {count:,} {TYPE_NAMES[vtype]} values, more "
                              f"than the {c.left():,} bytes left can hold (corrupt GGUF)")
    start = c.need(count * dtype.itemsize, f"metadata key {key!r}")
    values = np.frombuffer(c.buf, dtype=dtype, count=count, offset=start)
    if vtype == BOOL:
        return (values != 0).tolist()
    if vtype == 6:  # the shortest decimal that is this float32 (1e-05, not 9.99e-06)
        if count == 1:
            return [float(np.format_float_positional(values[0], unique=True, trim="-"))]
        return values.tolist()
    return values.tolist()


def _read_tensor_info(c: _Cursor, i: int) -> tuple[str, list[int], int, int]:
    name = c.string(f"the name of tensor #{i}", strict=True)
    n_dims = c.scalar("<I", f"the dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise OffloadMoeError(f"{c.file}: tensor {name!r} has {n_dims:,} dimensions, expected at most {MAX_DIMS}")
    dims = [c.scalar("<Q", f"the dimensions of tensor {name!r}") for _ in range(n_dims)]
    ggml_type = c.scalar("<I", f"the type of tensor {name!r}")
    offset = c.scalar("<Q", f"the offset of tensor {name!r}")
    return name, dims, ggml_type, offset


def _tensor(file: Path, data: np.ndarray, data_start: int, align: int, name: str, dims: list[int],
            ggml_type: int, offset: int) -> GGUFTensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise OffloadMoeError(f"{file}: tensor {name!r} has ggml type {ggml_type}, which is not known "
                              "(a newer GGUF than the installed gguf package reads?)") from None
    size = data.shape[0]
    if any(d > size * block for d in dims):  # a tensor of more elements than the file has bits is corrupt
        raise OffloadMoeError(f"{file}: tensor {name!r} has dimensions {dims}, larger than the file can hold")
    count = math.prod(dims)
    if dims and dims[0] % block:
        raise OffloadMoeError(f"{file}: tensor {name!r} ({type_name(ggml_type)}) has rows of {dims[0]:,} values, "
                              f"expected a multiple of its block of {block}")
    nbytes = count // block * type_size
    if offset % align:
        raise OffloadMoeError(f"{file}: tensor {name!r} starts at offset {offset:,}, expected a multiple of "
                              f"the alignment {align}")
    start = data_start + offset
    end = start + nbytes
    if end > size:
        raise OffloadMoeError(f"{file}: truncated: tensor {name!r} ({type_name(ggml_type)}) needs "
                              f"bytes up to {end:,} but the file has {size:,}")
    shape = tuple(reversed(dims))  # torch order
    raw = data[start:end]
    if ggml_type in TYPED:
        view = raw.view(TYPED[ggml_type]).reshape(shape)
    else:
        view = raw.reshape(*shape[:-1], shape[-1] // block * type_size) if shape else raw
    return GGUFTensor(name, file, ggml_type, shape, nbytes, view, start)
