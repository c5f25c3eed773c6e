"""A GGUF file's header (metadata and tensor table) parsed from its one mapping, in well under a second.

Why not `gguf.GGUFReader`: it builds a numpy memmap slice for every part of every field, which for a
real vocabulary (151,936 tokens and as many merges) takes 25-30 s before the first tensor is touched;
llama.cpp opens the same file in under one. Here the header is read with `struct` from the mapping
(strings as bytes slices, numeric arrays with one `np.frombuffer`), and each tensor's bytes are a
numpy view of the same mapping, shaped as GGUFReader shapes them (floats by element, other types as
rows of bytes), so nothing is read until a tensor is used.

The layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version (u32), tensor
count (u64), KV count (u64); KV pairs (string key, u32 value type, value); tensor infos (string name,
u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset); padding to `general.alignment` (32); data.
Strings are a u64 length and UTF-8 bytes; arrays a u32 item type, a u64 count and the items.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

# value type -> (struct code, numpy dtype) for the fixed-size scalars; 8 = string, 9 = array
SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
           5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
           12: ("d", np.float64)}
STRING, ARRAY, FLOAT32, BOOL = 8, 9, 6, 7
NUMPY_TYPES = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
               T.I32: np.int32, T.I64: np.int64}


class HeaderError(ValueError):
    """What is wrong with the header, in words; the caller names the file."""


class UnknownType(HeaderError):
    """A tensor's ggml type number is not one the gguf package knows."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int                    # ggml type
    shape: tuple[int, ...]       # torch order (ne reversed)
    offset: int                  # absolute byte offset in the file
    nbytes: int
    data: np.ndarray             # view of the mapping (floats by element, other types as rows of bytes)


@dataclass
class Header:
    version: int
    fields: dict[str, object]    # key -> Python value (str, int, float, bool, or a list of them)
    tensors: list[TensorInfo]
    data_offset: int
    mapping: mmap.mmap           # the file's one mapping (copy-on-write: views are writable, the file is not)


def read_header(path: Path) -> Header:
    """Parse `path`'s header from its mapping; HeaderError (or UnknownType) on anything malformed."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    size = len(mapping)
    p = _Parser(mapping, size)
    if p.bytes(4) != b"GGUF":
        raise HeaderError("not a GGUF file")
    version = p.scalar(4)
    n_tensors, n_kv = p.scalar(10), p.scalar(10)
    if n_tensors > size or n_kv > size:
        raise HeaderError(f"{n_tensors} tensors and {n_kv} keys cannot fit in {size:,} bytes")
    fields = {}
    for _ in range(n_kv):
        key = p.string()
        fields[key] = p.value(p.scalar(4))
    infos = []
    for _ in range(n_tensors):
        name = p.string()
        n_dims = p.scalar(4)
        if n_dims > 8:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions")
        ne = [p.scalar(10) for _ in range(n_dims)]
        raw_type, offset = p.scalar(4), p.scalar(10)
        infos.append((name, raw_type, ne, offset))
    align = fields.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise HeaderError(f"general.alignment = {align!r}, expected a power of two")
    data_offset = -(-p.at // align) * align
    whole = np.frombuffer(mapping, dtype=np.uint8)
    tensors, seen = [], set()
    for name, raw_type, ne, offset in infos:
        if name in seen:
            raise HeaderError(f"tensor {name!r} appears twice")
        seen.add(name)
        try:
            qtype = T(raw_type)
        except ValueError:
            raise UnknownType(str(raw_type)) from None
        bs, ts = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(ne, dtype=np.uint64)) if ne else 1
        if ne and ne[0] % bs:
            raise HeaderError(f"tensor {name!r}: rows of {ne[0]} weights are not whole {qtype.name} blocks of {bs}")
        nbytes = n // bs * ts
        start = data_offset + offset
        shape = tuple(int(d) for d in reversed(ne))
        if start + nbytes > size:
            tensors.append(TensorInfo(name, int(qtype), shape, start, nbytes, whole[:0]))  # reported by the caller
            continue
        raw = whole[start:start + nbytes]
        if qtype in NUMPY_TYPES:
            data = raw.view(NUMPY_TYPES[qtype]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] // bs * ts) if shape else raw
        tensors.append(TensorInfo(name, int(qtype), shape, start, nbytes, data))
    return Header(version, fields, tensors, data_offset, mapping)


class _Parser:
    """A cursor over the mapping; every read is bounds-checked (a truncated header is a HeaderError)."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.at = buf, size, 0

    def need(self, n: int) -> None:
        if n < 0 or self.at + n > self.size:
            raise HeaderError(f"the header runs past the end of the file at byte {self.at:,} (truncated)")

    def bytes(self, n: int) -> bytes:
        self.need(n)
        out = self.buf[self.at:self.at + n]
        self.at += n
        return out

    def scalar(self, vtype: int):
        code, _ = SCALARS[vtype]
        k = struct.calcsize(code)
        self.need(k)
        (v,) = struct.unpack_from("<" + code, self.buf, self.at)
        self.at += k
        return v

    def string(self) -> str:
        return self.bytes(self.scalar(10)).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary: 150k of them), in one tight loop."""
        buf, at, size, out = self.buf, self.at, self.size, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if at + 8 > size:
                self.at = at
                self.need(8)
            (n,) = length(buf, at)
            at += 8
            if at + n > size:
                self.at = at
                self.need(n)
            out.append(buf[at:at + n].decode("utf-8", errors="replace"))
            at += n
        self.at = at
        return out

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item, count = self.scalar(4), self.scalar(10)
            if count > self.size - self.at:
                raise HeaderError(f"an array of {count:,} items at byte {self.at:,} cannot fit in the file")
            if item == STRING:
                return self.strings(count)
            if item == ARRAY:
                return [self.value(ARRAY) for _ in range(count)]
            if item not in SCALARS:
                raise HeaderError(f"unknown array item type {item}")
            dtype = np.dtype(SCALARS[item][1]).newbyteorder("<")
            raw = self.bytes(count * dtype.itemsize)
            return np.frombuffer(raw, dtype=dtype).tolist()
        if vtype not in SCALARS:
            raise HeaderError(f"unknown value type {vtype} at byte {self.at:,}")
        v = self.scalar(vtype)
        if vtype == FLOAT32:  # the shortest decimal that is this float32 (1e-05, not 9.99e-06)
            return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))
        return bool(v) if vtype == BOOL else v
