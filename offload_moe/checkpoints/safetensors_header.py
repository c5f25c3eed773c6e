"""Reading one safetensors header, trusting nothing in it.

The header is JSON written by whoever made the file. Every rule safetensors itself enforces when a
tensor is read later is checked here, at open, so a bad file is one line naming the file and the
tensor instead of a `SafetensorError` traceback in the middle of loading: an 8-byte length that fits
the file, a JSON object of objects, a known dtype, a shape of non-negative integers, two ordered
offsets whose span is exactly shape × dtype size, tensors packed end to end from offset 0 with
neither overlap nor gap, and the last one ending where the file ends (shorter: "truncated").
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import OffloadMoeError
from ..base.user_files import regular_file

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str          # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0     # where its bytes begin in the file (after the 8-byte length and the header)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header; check every tensor's entry and that its bytes are in the file."""
    file = Path(file)
    size = regular_file(file, "safetensors file").st_size

    def bad(why: str):
        return OffloadMoeError(f"{file}: not a safetensors file ({why})")

    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("header unreadable or truncated: shorter than 8 bytes")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise bad(f"header unreadable or truncated: its length {n:,} exceeds the file's {size:,} bytes"
                          if n > size - 8 else f"header of {n:,} bytes exceeds the limit of {MAX_HEADER_BYTES:,}")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise OffloadMoeError(f"{file}: cannot read ({e.strerror})") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad("header unreadable or truncated: not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, expected an object")
    data_size = size - 8 - n
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                raise bad("'__metadata__' is not an object")
            continue
        if not isinstance(meta, dict):
            raise bad(f"tensor {name!r}: entry is {type(meta).__name__}, expected an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"tensor {name!r}: dtype {dtype!r}, expected one of {', '.join(DTYPE_SIZES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {shape!r}, expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r}: data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise bad(f"tensor {name!r}: data_offsets span {end - begin:,} bytes, but {dtype} {shape} "
                      f"needs {expected:,}")
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort()
    position = 0
    tensors = {}
    for begin, end, name, dtype, shape in entries:
        if begin != position:
            raise bad(f"tensor {name!r}: data_offsets begin at {begin:,}, expected {position:,} "
                      f"({'overlapping the tensor before' if begin < position else 'a gap before it'})")
        if end > data_size:
            raise OffloadMoeError(f"{file}: truncated: tensor {name!r} needs bytes up to {8 + n + end:,} "
                                  f"but the file has {size:,}")
        position = end
        tensors[name] = TensorInfo(file, dtype, shape, end - begin, 8 + n + begin)
    if position != data_size:
        raise bad(f"{data_size - position:,} bytes after the last tensor's data")
    return tensors
