"""One GGUF file, or a split set (`name-00001-of-00003.gguf`), opened where it lies.

Each file is mapped once and its header (metadata and tensor table) parsed from the mapping
(`header.py`: the gguf package's reader takes ~30 s on a real vocabulary); tensor bytes are numpy
views of that one map, so nothing is read until a tensor is used, and what is read stays file pages
the kernel may reclaim (no anonymous copy). The map is copy-on-write: writable views for
`torch.from_numpy`, the file never written. Every fault is one line naming the file: the magic,
the version, a malformed or truncated header, an unknown type, tensor bytes past the end.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OffloadMoeError
from .blocks import type_name
from .header import Header, HeaderError, UnknownType, read_header

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
            header = _open(file)
            if i == 0:
                self.fields = header.fields
            for t in header.tensors:
                if t.name in self.tensors:
                    raise OffloadMoeError(f"{file}: tensor {t.name!r} is also in {self.tensors[t.name].file}")
                self.tensors[t.name] = GGUFTensor(t.name, file, t.type, t.shape, t.nbytes, t.data, t.offset)
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


def _open(file: Path) -> Header:
    """The header of one file (`header.read_header`), with one-line errors naming the file."""
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
        header = read_header(file)
    except UnknownType as e:
        raise OffloadMoeError(f"{file}: a tensor has ggml type {e}, which is not known "
                              "(a newer GGUF than the installed gguf package reads?)") from None
    except HeaderError as e:
        raise OffloadMoeError(f"{file}: corrupt or truncated GGUF header ({e})") from None
    for t in header.tensors:
        end = t.offset + t.nbytes
        if end > size:
            raise OffloadMoeError(f"{file}: truncated: tensor {t.name!r} ({type_name(t.type)}) needs "
                                  f"bytes up to {end:,} but the file has {size:,}")
    return header
