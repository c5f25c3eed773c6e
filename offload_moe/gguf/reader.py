"""One GGUF file, or a split set (`name-00001-of-00003.gguf`), opened through the gguf package.

`GGUFReader` memory-maps each file once and parses its header (metadata and tensor table); tensor
bytes are numpy views of that one map, so nothing is read until a tensor is used, and what is read
stays file pages the kernel may reclaim (no anonymous copy). The map is copy-on-write (`mode="c"`):
writable views for `torch.from_numpy`, the file never written. Before handing a file to it
we check what it does not say in one line: the magic, the version, and that every tensor's bytes
lie inside the file.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OffloadMoeError
from .blocks import type_name

SUPPORTED_VERSIONS = (2, 3)
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


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
            reader = _open(file)
            if i == 0:
                self.fields = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise OffloadMoeError(f"{file}: tensor {t.name!r} is also in {self.tensors[t.name].file}")
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                self.tensors[t.name] = GGUFTensor(t.name, file, int(t.tensor_type), shape, int(t.n_bytes), t.data,
                                                     int(t.data_offset))
        expected = self.fields.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(self.tensors):
            raise OffloadMoeError(f"{self.path}: split set holds {len(self.tensors)} tensors, its header says "
                                  f"{expected} (a shard is missing or from another set)")

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


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


def _open(file: Path):
    """GGUFReader over one file, with one-line errors for what it would raise on or miss."""
    from gguf import GGUFReader

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise OffloadMoeError(f"{file}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if len(head) < 8:
        raise OffloadMoeError(f"{file}: truncated GGUF header ({size} bytes)")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in SUPPORTED_VERSIONS:
        raise OffloadMoeError(f"{file}: GGUF version {version} is not supported "
                              f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    try:
        reader = GGUFReader(file, "c")  # copy-on-write: views are writable, the file is not
    except ValueError as e:
        text = str(e)
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", text)
        if unknown:
            raise OffloadMoeError(f"{file}: a tensor has ggml type {unknown[1]}, which is not known "
                                  "(a newer GGUF than the installed gguf package reads?)") from None
        if "reshape" in text:  # a tensor's bytes run past the end of the map
            raise OffloadMoeError(f"{file}: truncated: tensor data runs past the end of the file "
                                  f"({size:,} bytes)") from None
        raise OffloadMoeError(f"{file}: corrupt or truncated GGUF header ({text})") from None
    except (IndexError, struct.error, UnicodeDecodeError, OverflowError, KeyError, TypeError) as e:
        raise OffloadMoeError(f"{file}: corrupt or truncated GGUF header ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise OffloadMoeError(f"{file}: truncated: tensor {t.name!r} ({type_name(t.tensor_type)}) needs "
                                  f"bytes up to {end:,} but the file has {size:,}")
    return reader


def _value(field):
    """A metadata field as a Python value (str, int, float, bool, or a list of them)."""
    from gguf import GGUFValueType

    main = field.types[0] if field.types else None
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return np.concatenate([field.parts[i] for i in field.data]).tolist() if field.data else []
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]][0]
    if main == GGUFValueType.FLOAT32:  # the shortest decimal that is this float32 (1e-05, not 9.99e-06)
        return float(np.format_float_positional(value, unique=True, trim="-"))
    return bool(value) if main == GGUFValueType.BOOL else value.item()
